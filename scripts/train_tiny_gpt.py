"""Train a tiny GPT whose attention runs on tileattn, for a few steps, on text it generates itself.

The text comes from a small random grammar (subject - verb - object sentences with agreement and
punctuation), tokenised by word, so the loss has structure to learn and drops quickly.

    python scripts/train_tiny_gpt.py                     # softmax attention (tileattn.attention, causal)
    python scripts/train_tiny_gpt.py --attn lightning    # tileattn.nn.LightningAttention layers
    python scripts/train_tiny_gpt.py --steps 5 --dim 32 --layers 1 --seq 32 --batch 4   # CPU smoke size

Without CUDA it sets TRITON_INTERPRET=1 before importing tileattn, so the same Triton kernels run under
the interpreter (slow: keep it tiny).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from typing import List, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tileattn  # noqa: E402

# ------------------------------------------------------------------------------------------ data
_GRAMMAR = {
    "S": [["NP_s", "VP_s", "."], ["NP_p", "VP_p", "."], ["NP_s", "VP_s", "and", "NP_p", "VP_p", "."]],
    "NP_s": [["the", "N_s"], ["a", "ADJ", "N_s"], ["the", "ADJ", "N_s"]],
    "NP_p": [["the", "N_p"], ["some", "ADJ", "N_p"], ["the", "N_p", "of", "the", "N_s"]],
    "VP_s": [["V_s", "NP_s"], ["V_s", "NP_p"], ["sleeps"], ["V_s", "the", "N_s", "quickly"]],
    "VP_p": [["V_p", "NP_s"], ["V_p", "NP_p"], ["sleep"], ["V_p", "the", "N_p", "slowly"]],
    "N_s": [["cat"], ["dog"], ["bird"], ["robot"], ["kernel"]],
    "N_p": [["cats"], ["dogs"], ["birds"], ["robots"], ["kernels"]],
    "V_s": [["sees"], ["likes"], ["chases"], ["computes"]],
    "V_p": [["see"], ["like"], ["chase"], ["compute"]],
    "ADJ": [["small"], ["red"], ["fast"], ["fused"]],
}


def _expand(sym: str, rng: random.Random) -> List[str]:
    if sym not in _GRAMMAR:
        return [sym]
    out: List[str] = []
    for s in rng.choice(_GRAMMAR[sym]):
        out.extend(_expand(s, rng))
    return out


def make_corpus(n_tokens: int, seed: int = 0):
    """Word tokens from the grammar: returns (token ids (n_tokens,) int64, vocabulary list)."""
    rng = random.Random(seed)
    words: List[str] = []
    while len(words) < n_tokens:
        words.extend(_expand("S", rng))
    vocab = sorted({w for rule in _GRAMMAR.values() for alt in rule for w in alt if w not in _GRAMMAR})
    index = {w: i for i, w in enumerate(vocab)}
    return torch.tensor([index[w] for w in words[:n_tokens]], dtype=torch.long), vocab


# ------------------------------------------------------------------------------------------ model
class SoftmaxSelfAttention(nn.Module):
    """Causal multi-head self-attention on ``tileattn.attention`` (q, k, v taken as strided views of one
    projection, no copies)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        o = tileattn.attention(q, k, v, causal=True)  # (B, H, N, D)
        return self.proj(o.transpose(1, 2).reshape(B, N, E))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attn: str, layer_idx: int, num_layers: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if attn == "softmax":
            self.attn = SoftmaxSelfAttention(dim, heads)
        else:
            from tileattn.nn import LightningAttention

            self.attn = LightningAttention(dim, heads, layer_idx=layer_idx, num_layers=num_layers)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq: int, attn: str = "softmax"):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attn, i, layers) for i in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


# ------------------------------------------------------------------------------------------ training
def train(attn: str = "softmax", steps: int = 200, dim: int = 64, heads: int = 4, layers: int = 2,
          seq: int = 64, batch: int = 16, lr: float = 3e-3, device: Optional[str] = None,
          dtype: str = "float32", seed: int = 0, log_every: int = 10, quiet: bool = False) -> List[float]:
    """Train and return the per-step losses."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    data, vocab = make_corpus(max(20_000, 4 * seq * batch), seed)
    data = data.to(device)
    model = TinyGPT(len(vocab), dim, heads, layers, seq, attn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    losses: List[float] = []
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), device=device)
        idx = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        x, y = idx[:, :-1], idx[:, 1:]
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if not quiet and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.time() - t0:.1f}s)", flush=True)
    if not quiet:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform would be {math.log(len(vocab)):.3f}); "
              f"attention={attn}, device={device}")
    return losses


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", choices=["softmax", "lightning"], default="softmax")
    p.add_argument("--steps", type=int, default=None, help="default 200 on GPU, 20 on CPU")
    p.add_argument("--dim", type=int, default=None, help="default 128 on GPU, 32 on CPU")
    p.add_argument("--heads", type=int, default=None, help="default 4 on GPU, 2 on CPU")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="default 128 on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 32 on GPU, 4 on CPU")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="autocast dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    gpu = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    losses = train(
        attn=a.attn, steps=a.steps or (200 if gpu else 20), dim=a.dim or (128 if gpu else 32),
        heads=a.heads or (4 if gpu else 2), layers=a.layers, seq=a.seq or (128 if gpu else 32),
        batch=a.batch or (32 if gpu else 4), lr=a.lr, device=a.device,
        dtype=a.dtype or ("bfloat16" if gpu else "float32"), seed=a.seed,
        log_every=10 if gpu else 1,
    )
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
