"""Train a tiny causal language model with context parallelism: each rank holds a shard of every sequence.

    torchrun --nproc_per_node 2 scripts/train_tiny_cp.py                       # ring attention, zigzag
    torchrun --nproc_per_node 2 scripts/train_tiny_cp.py --attn lightning      # LASP-2 lightning attention
    torchrun --nproc_per_node 4 scripts/train_tiny_cp.py --layout contiguous --steps 3

On CPU it uses gloo and sets TRITON_INTERPRET=1 before importing tileattn, so the Triton kernels run under
the interpreter (keep it tiny); ``--reference`` runs tileattn's float64 PyTorch path instead (no Triton).
On GPUs it uses NCCL, one GPU per rank (LOCAL_RANK).

The parameters are replicated (as in data parallelism); tokens, targets and position ids are sharded along
the sequence with ``tileattn.distributed.shard_sequence``. Each rank's loss is the sum of its tokens' losses
divided by the total token count, so the sum over ranks is the full-sequence mean loss and all-reducing
(summing) the gradients gives the full-sequence gradients. With ``--check`` (default) rank 0 also runs the
same model on the full sequence in one process and prints how far the loss and gradients are from it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_args = sys.argv[1:]
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0" if "--reference" in _args else "1"  # before tileattn / triton load

import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tileattn  # noqa: E402
from tileattn import distributed as tdist  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attn: str, layer: int, layers: int):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer("decay", tileattn.lightning_decay_rates(heads, layer_idx=layer, num_layers=layers),
                             persistent=False)

    def forward(self, x: torch.Tensor, cp: dict) -> torch.Tensor:
        """x: (B, N, C), the local shard when ``cp`` holds a layout (else the full sequence)."""
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.attn == "softmax":
            if cp:
                o = tdist.ring_attention(q, k, v, causal=True, layout=cp["layout"])
            else:
                o = tileattn.attention(q, k, v, causal=True)
        else:
            q, k = F.silu(q), F.silu(k)
            if cp:
                o = tdist.lightning_attention_cp(q, k, v, self.decay)
            else:
                o = tileattn.lightning_attention(q, k, v, self.decay)
        x = x + self.proj(o.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, max_len: int, attn: str):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attn, i, layers) for i in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def loss(self, tokens, targets, pos, n_total: int, cp: dict) -> torch.Tensor:
        """Sum of the cross-entropies of these tokens / n_total (the full-sequence mean when summed over ranks)."""
        x = self.emb(tokens) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, cp)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / n_total


def make_batch(batch: int, seq: int, vocab: int, step: int):
    """Sequences with structure to learn: a random start, then x_{t+1} = (3 x_t + 1) mod vocab."""
    g = torch.Generator().manual_seed(step)
    x = torch.empty(batch, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for t in range(seq):
        x[:, t + 1] = (3 * x[:, t] + 1) % vocab
    return x[:, :-1], x[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attn", choices=["softmax", "lightning"], default="softmax")
    ap.add_argument("--layout", choices=list(tdist.LAYOUTS), default="zigzag")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32, help="full sequence length (sharded over the ranks)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=61)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the single-process comparison on rank 0")
    ap.add_argument("--reference", action="store_true", help="CPU: tileattn's PyTorch path instead of the interpreter")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    layout = "contiguous" if args.attn == "lightning" else args.layout  # LASP-2 shards contiguously

    torch.manual_seed(0)  # same initial parameters on every rank
    model = TinyLM(args.vocab, args.dim, args.heads, args.layers, args.seq, args.attn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref = None
    if args.check and rank == 0:
        ref = TinyLM(args.vocab, args.dim, args.heads, args.layers, args.seq, args.attn).to(device)
        ref.load_state_dict(model.state_dict())
    if rank == 0:
        print(f"{world} ranks ({'nccl' if cuda else 'gloo'}), {args.attn} attention, {layout} layout, "
              f"sequence {args.seq} = {world} x {args.seq // world} tokens per rank", flush=True)

    for step in range(args.steps):
        tokens, targets = make_batch(args.batch, args.seq, args.vocab, step)
        pos = torch.arange(args.seq).expand(args.batch, -1)
        local = [tdist.shard_sequence(t.to(device), layout=layout, dim=1) for t in (tokens, targets, pos)]
        n_total = tokens.numel()
        loss = model.loss(*local, n_total, {"layout": layout})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # replicated parameters: sum the per-shard gradients
            dist.all_reduce(p.grad)
        full_loss = loss.detach().clone()
        dist.all_reduce(full_loss)
        if ref is not None:
            ref.zero_grad(set_to_none=True)
            ref_loss = ref.loss(tokens.to(device), targets.to(device), pos.to(device), n_total, {})
            ref_loss.backward()
            gerr = max((p.grad - r.grad).abs().max().item() / max(r.grad.abs().max().item(), 1e-12)
                       for p, r in zip(model.parameters(), ref.parameters()))
            print(f"step {step}: loss {full_loss.item():.4f} (single process {ref_loss.item():.4f}), "
                  f"max relative gradient difference {gerr:.2e}", flush=True)
        elif rank == 0:
            print(f"step {step}: loss {full_loss.item():.4f}", flush=True)
        opt.step()
        if ref is not None:  # the reference follows the context-parallel model's updates
            with torch.no_grad():
                for p, r in zip(model.parameters(), ref.parameters()):
                    r.copy_(p)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
