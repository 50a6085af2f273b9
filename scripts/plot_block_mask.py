"""Draw a :class:`tileattn.BlockMask` to PNG: the block layout (full / partial / empty) and, for small
sizes, the element mask.

    python scripts/plot_block_mask.py --mask causal --len 2048 --out causal.png
    python scripts/plot_block_mask.py --mask bigbird --len 4096 --block-size 64 --out bigbird.png

Importable: ``plot_block_mask(bm, path, b=0, h=0)`` (load this file with importlib, it is not a package).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import torch  # noqa: E402

import tileattn  # noqa: E402
from tileattn import masks as M  # noqa: E402

# element masks are drawn when the (q_len x kv_len) picture has at most this many pixels
MAX_DENSE_ELEMENTS = 4096 * 4096

_KIND_COLORS = ["#f4f4f4", "#f5a623", "#2f6db5"]  # empty, partial, full
_KIND_LABELS = ["empty (skipped)", "partial (element mask)", "full"]


def plot_block_mask(bm: "tileattn.BlockMask", path: str, b: int = 0, h: int = 0, title: Optional[str] = None,
                    dense: Optional[bool] = None) -> str:
    """Save a picture of ``bm`` (batch ``b``, head ``h``) to ``path`` (PNG) and return ``path``.

    Args:
        bm: the BlockMask.
        b, h: batch element / head to draw (0 where the mask broadcasts).
        title: figure title; default the mask's shape, block size and density.
        dense: also draw the element mask; default when ``q_len * kv_len <= MAX_DENSE_ELEMENTS``.

    Left panel: the (nQB, nKB) block layout, blue = full, orange = partial, light grey = empty (never
    visited by the kernels). Right panel (optional): the element mask, black = attend.
    """
    if not isinstance(bm, tileattn.BlockMask):
        raise TypeError(f"bm must be a tileattn.BlockMask, got {type(bm).__name__}")
    if not (0 <= b < bm.B) or not (0 <= h < bm.H):
        raise ValueError(f"(b, h) = {(b, h)} out of range for a mask with (B, H) = {(bm.B, bm.H)}")
    if dense is None:
        dense = bm.q_len * bm.kv_len <= MAX_DENSE_ELEMENTS
    kind = bm.block_state()[0][b, h].cpu().numpy()
    ncols = 2 if dense else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 5.8), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(kind, cmap=ListedColormap(_KIND_COLORS), vmin=0, vmax=2, interpolation="nearest",
              extent=(0, bm.kv_len, bm.q_len, 0), aspect="auto")
    nq, nk = bm.num_q_blocks, bm.num_kv_blocks
    if max(nq, nk) <= 64:  # block grid lines
        for i in range(1, nq):
            ax.axhline(i * bm.bs_q, color="white", lw=0.5)
        for j in range(1, nk):
            ax.axvline(j * bm.bs_k, color="white", lw=0.5)
    full, part = int((kind == 2).sum()), int((kind == 1).sum())
    ax.set_title(f"blocks {nq}x{nk} of {bm.bs_q}x{bm.bs_k}: {full} full, {part} partial", fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.legend(handles=[Patch(color=c, label=l) for c, l in zip(_KIND_COLORS[::-1], _KIND_LABELS[::-1])],
              loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=7, frameon=False)
    if dense:
        ax2 = axes[0, 1]
        ax2.imshow(bm._dense(b, h)[0, 0].cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                   extent=(0, bm.kv_len, bm.q_len, 0), aspect="auto")
        ax2.set_title("element mask (black = attend)", fontsize=9)
        ax2.set_xlabel("key position")
    if title is None:
        title = (f"BlockMask q_len={bm.q_len}, kv_len={bm.kv_len}, density {100 * bm.density:.1f}%"
                 + (f"  (b={b}, h={h})" if bm.B * bm.H > 1 else ""))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _demo_docs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=g)[:max(1, n // 512)] + 1
    ids = torch.zeros(n, dtype=torch.long)
    ids[cuts] = 1
    return ids.cumsum(0)


MASKS = ("causal", "window", "document", "prefix", "dilated", "strided", "longformer", "bigbird", "random")


def build(name: str, n: int, block_size: int, window: int, seed: int) -> "tileattn.BlockMask":
    """One demo BlockMask of length ``n`` (self-attention) by name (see ``MASKS``)."""
    if name == "random":
        nb = -(-n // block_size)
        g = torch.Generator().manual_seed(seed)
        layout = torch.rand(nb, nb, generator=g) < 0.3
        return tileattn.BlockMask.from_layout(layout, block_size=block_size, q_len=n, kv_len=n)
    fns = {
        "causal": lambda: M.causal(),
        "window": lambda: M.sliding_window(window, 0),
        "document": lambda: M.document(_demo_docs(n, seed), causal=True),
        "prefix": lambda: M.prefix_lm(n // 4),
        "dilated": lambda: M.dilated(max(2, n // 256), causal=True),
        "strided": lambda: M.strided(max(2, int(n ** 0.5)), causal=True),
        "longformer": lambda: M.longformer(window, global_idx=[0, 1, n // 2]),
        "bigbird": lambda: M.bigbird(1, 1, 2, block_size, seed, seq_len=n),
    }
    if name not in fns:
        raise ValueError(f"unknown mask {name!r}; choose from {', '.join(MASKS)}")
    return tileattn.create_block_mask(fns[name](), None, None, n, n, block_size=block_size, device="cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mask", choices=MASKS, default="causal")
    p.add_argument("--len", type=int, default=2048, help="sequence length (q_len = kv_len)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--window", type=int, default=256, help="window for --mask window / longformer (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG path")
    a = p.parse_args(argv)
    bm = build(a.mask, a.len, a.block_size, a.window, a.seed)
    print(bm)
    print(plot_block_mask(bm, a.out, title=f"{a.mask}: N={a.len}, block {a.block_size}, density {100 * bm.density:.1f}%"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
