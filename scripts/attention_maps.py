"""Plot the attention maps of a small randomly initialised model to a PNG.

The model is a stack of ``tileattn.nn.MultiheadAttention`` layers (causal) over random token embeddings
plus sinusoidal positions; the maps are the probabilities that ``need_weights=True`` returns, which the
Triton weights kernel rebuilds from q, k and the fused forward's LSE. A last column shows
``tileattn.attention_weights`` selecting one head and a block of query rows under a sliding window
(computed without materialising the other rows).

    python scripts/attention_maps.py --out attention_maps.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tileattn  # noqa: E402
import tileattn.nn  # noqa: E402
from tileattn.weights import attention_weights  # noqa: E402


def sinusoidal(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


def attention_maps(seq: int = 48, dim: int = 64, heads: int = 4, layers: int = 2, window: int = 8,
                   sharpness: float = 3.0, device: Optional[str] = None, seed: int = 0):
    """Run the random model; returns (per-layer weights (H, N, N) list, windowed slice (R, N), row offset)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    x = (torch.randn(seq, dim) * 0.5 + sinusoidal(seq, dim)).to(device)[None]  # (1, N, E)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)  # torch convention: True = blocked
    maps: List[torch.Tensor] = []
    q_last = k_last = None
    with torch.no_grad():
        for _ in range(layers):
            mha = tileattn.nn.MultiheadAttention(dim, heads, batch_first=True, device=device)
            mha.in_proj_weight.mul_(sharpness)  # sharper than the default init, so the maps show structure
            out, w = mha(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
            maps.append(w[0].float().cpu())
            q_last, k_last, _ = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
            x = torch.nn.functional.layer_norm(x + out, (dim,))
        # one head, the second half of the query rows, sliding window (window, 0): only these rows are computed
        q = q_last.unflatten(-1, (heads, dim // heads)).transpose(1, 2)
        k = k_last.unflatten(-1, (heads, dim // heads)).transpose(1, 2)
        r0 = seq // 2
        win = attention_weights(q, k, window=(window, 0), heads=[0], rows=slice(r0, seq))
    return maps, win[0, 0].float().cpu(), r0


def plot(maps, win, r0, window: int, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = len(maps), maps[0].shape[0]
    fig, axes = plt.subplots(layers, heads + 1, figsize=(2.6 * (heads + 1), 2.6 * layers), squeeze=False)
    for li, w in enumerate(maps):
        for h in range(heads):
            ax = axes[li][h]
            ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=max(float(w[h].max()), 1e-6))
            ax.set_title(f"layer {li} head {h}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
        ax = axes[li][heads]
        if li == layers - 1:
            n = win.shape[1]
            ax.imshow(win.numpy(), cmap="magma", extent=(-0.5, n - 0.5, n - 0.5, r0 - 0.5))
            ax.set_title(f"window ({window}, 0), head 0,\nrows {r0}..{n - 1} only", fontsize=9)
            ax.set_xlabel("key", fontsize=8), ax.set_ylabel("query", fontsize=8)
        else:
            ax.axis("off")
    fig.suptitle("tileattn attention maps (random model; keys on x, queries on y)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="attention_maps.png")
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    maps, win, r0 = attention_maps(a.seq, a.dim, a.heads, a.layers, a.window, device=a.device, seed=a.seed)
    print("wrote", plot(maps, win, r0, a.window, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
