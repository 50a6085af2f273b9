"""Ready-made mask predicates for :func:`tileattn.create_block_mask`.

Every function here returns a ``mask_fn(b, h, q_idx, kv_idx) -> bool tensor`` (the FlexAttention
``mask_mod`` contract, True = attend) that works on broadcast int64 index tensors, e.g.::

    bm = tileattn.create_block_mask(tileattn.masks.causal(), None, None, 4096, 4096)
    bm = tileattn.create_block_mask(
        tileattn.masks.and_masks(tileattn.masks.causal(), tileattn.masks.document(doc_ids)),
        None, None, n, n)

``causal``, ``sliding_window`` and ``and_masks`` of them carry a band description
(``mask_fn._tileattn_band = (lo, hi)``: attend iff ``lo <= kv_idx - q_idx <= hi``, None = unbounded) that
lets ``create_block_mask`` classify blocks in closed form instead of evaluating every element (same
result, much faster at long lengths).

Positions: ``causal`` and ``sliding_window`` follow ``tileattn.attention`` (bottom-right aligned when
``q_len`` and ``kv_len`` are given and differ: query i sits at key position ``i + kv_len - q_len``); the
other predicates compare raw indices (self-attention, ``q_len == kv_len``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "causal",
    "sliding_window",
    "document",
    "prefix_lm",
    "dilated",
    "strided",
    "longformer",
    "bigbird",
    "and_masks",
    "or_masks",
]

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _offset(q_len: Optional[int], kv_len: Optional[int]) -> int:
    if (q_len is None) != (kv_len is None):
        raise ValueError("give both q_len and kv_len (for bottom-right alignment) or neither (top-left)")
    if q_len is None:
        return 0
    for name, n in (("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(kv_len) - int(q_len)


def _check_int(name: str, x, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return int(x)


class _OnDevice:
    """A tensor argument of a predicate, moved to the index tensors' device on first use there."""

    def __init__(self, t: torch.Tensor):
        self._by_dev = {t.device: t}

    def get(self, device: torch.device) -> torch.Tensor:
        t = self._by_dev.get(device)
        if t is None:
            t = next(iter(self._by_dev.values())).to(device)
            self._by_dev[device] = t
        return t


def causal(q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskFn:
    """Causal mask: query i sees key j iff ``j <= i + kv_len - q_len`` (bottom-right aligned, like
    ``tileattn.attention(causal=True)``). Without lengths (or with equal ones): ``j <= i`` (top-left,
    SDPA ``is_causal``).

    Args:
        q_len, kv_len: the lengths the mask will be built for (both or neither).
    """
    off = _offset(q_len, kv_len)

    def mask_fn(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    mask_fn._tileattn_band = (None, off)
    return mask_fn


def sliding_window(left: int, right: int, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskFn:
    """Sliding window, FlashAttention convention (same as ``tileattn.attention(window=(left, right))``
    and ``tileattn.reference.visible_mask``): query i sees key j iff
    ``i + off - left <= j <= i + off + right`` with ``off = kv_len - q_len`` (0 without lengths).

    Args:
        left, right: window extents, ``-1`` = unbounded on that side (``right=0`` is causal).
        q_len, kv_len: lengths for bottom-right alignment (both or neither).
    """
    left, right = _check_int("left", left, -1), _check_int("right", right, -1)
    off = _offset(q_len, kv_len)

    def mask_fn(b, h, q_idx, kv_idx):
        pos = q_idx + off
        if left >= 0 and right >= 0:
            ok = kv_idx >= pos - left
            ok &= kv_idx <= pos + right  # in place: one full-size temporary fewer
            return ok
        if left >= 0:
            return kv_idx >= pos - left
        if right >= 0:
            return kv_idx <= pos + right
        return torch.ones(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), dtype=torch.bool, device=q_idx.device)

    mask_fn._tileattn_band = (off - left if left >= 0 else None, off + right if right >= 0 else None)
    return mask_fn


def _check_batch(name: str, b: torch.Tensor, n: int) -> None:
    """Per-batch predicates need the mask built with that batch size (``B=None`` would silently use
    batch element 0 for every batch)."""
    if b.numel() != n:
        raise ValueError(f"{name}: per-batch values for B={n} need create_block_mask(..., B={n}, ...); "
                         f"the mask is being built for {b.numel()} batch element(s)")


def document(doc_ids: torch.Tensor, *, causal: bool = False) -> MaskFn:
    """Packed sequences: query i sees key j iff they belong to the same document (and ``j <= i`` with
    ``causal``). Tokens with a negative document id (padding) see nothing and are seen by nothing.

    Args:
        doc_ids: int tensor ``(N,)`` of per-token document ids shared by every batch element, or
            ``(B, N)`` per batch element (then build the mask with that ``B``). N covers q_len and kv_len
            (self-attention over the packed tokens).
        causal: also apply ``j <= i`` within each document.
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise TypeError("doc_ids must be an integer tensor of per-token document ids")
    if doc_ids.dim() not in (1, 2):
        raise ValueError(f"doc_ids must be (N,) or (B, N), got shape {tuple(doc_ids.shape)}")
    ids = _OnDevice(doc_ids.long())
    per_batch = doc_ids.dim() == 2
    is_causal = bool(causal)

    def mask_fn(b, h, q_idx, kv_idx):
        d = ids.get(q_idx.device)
        if per_batch:
            _check_batch("document", b, d.shape[0])
        n = d.shape[-1]
        if int(q_idx.max()) >= n or int(kv_idx.max()) >= n:
            raise ValueError(f"document: doc_ids cover {n} tokens but the mask has q_len / kv_len up to "
                             f"{int(max(q_idx.max(), kv_idx.max())) + 1}")
        dq, dk = (d[b, q_idx], d[b, kv_idx]) if per_batch else (d[q_idx], d[kv_idx])
        ok = (dq == dk) & (dq >= 0)
        if is_causal:
            ok &= kv_idx <= q_idx
        return ok

    return mask_fn


def prefix_lm(prefix_len: Union[int, torch.Tensor]) -> MaskFn:
    """Prefix-LM: every query sees the first ``prefix_len`` keys (bidirectional prefix) and the keys up
    to itself (``j <= i``, causal suffix).

    Args:
        prefix_len: int, or int tensor ``(B,)`` with one prefix length per batch element.
    """
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 1 or prefix_len.dtype.is_floating_point:
            raise TypeError("prefix_len must be an int or an integer tensor (B,)")
        plen = _OnDevice(prefix_len.long())

        def mask_fn(b, h, q_idx, kv_idx):
            p = plen.get(q_idx.device)
            _check_batch("prefix_lm", b, p.shape[0])
            return (kv_idx <= q_idx) | (kv_idx < p[b])

        return mask_fn
    p = _check_int("prefix_len", prefix_len, 0)

    def mask_fn(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < p)

    return mask_fn


def dilated(stride: int, *, causal: bool = False) -> MaskFn:
    """Dilated (strided-column) pattern: query i sees key j iff ``(i - j) % stride == 0`` (and
    ``j <= i`` with ``causal``). The "strided" head of the Sparse Transformer (Child et al., 2019).

    Args:
        stride: dilation >= 1 (1 = dense).
        causal: also require ``j <= i``.
    """
    s = _check_int("stride", stride, 1)
    is_causal = bool(causal)

    def mask_fn(b, h, q_idx, kv_idx):
        ok = torch.remainder(q_idx - kv_idx, s) == 0
        if is_causal:
            ok = ok & (kv_idx <= q_idx)
        return ok

    return mask_fn


def strided(stride: int, *, causal: bool = True) -> MaskFn:
    """Sparse Transformer "strided" attention (both heads' patterns united): query i sees key j iff
    ``|i - j| < stride`` (local) or ``(i - j) % stride == 0`` (strided), and ``j <= i`` with ``causal``.

    Args:
        stride: the stride l (about sqrt(N) in the paper), >= 1.
        causal: also require ``j <= i`` (default, as in the paper).
    """
    s = _check_int("stride", stride, 1)
    is_causal = bool(causal)

    def mask_fn(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        ok = (diff.abs() < s) | (torch.remainder(diff, s) == 0)
        if is_causal:
            ok = ok & (diff >= 0)
        return ok

    return mask_fn


def longformer(window: int, global_idx: Union[Sequence[int], torch.Tensor] = ()) -> MaskFn:
    """Longformer: local band ``|i - j| <= window`` plus global tokens. A global token attends to every
    key and every query attends to it.

    Args:
        window: one-sided local window (each query sees ``window`` keys on each side and itself).
        global_idx: token positions (ints >= 0) that are global; :func:`tileattn.create_block_mask`
            raises ``ValueError`` when one lies outside the sequence (``>= max(q_len, kv_len)``).
    """
    w = _check_int("window", window, 0)
    g = torch.as_tensor(list(global_idx) if not isinstance(global_idx, torch.Tensor) else global_idx)
    if g.numel() and (g.dtype.is_floating_point or g.dtype == torch.bool or int(g.min()) < 0):
        raise ValueError("global_idx must hold non-negative integer token positions")
    g = g.long().flatten()
    n = int(g.max()) + 1 if g.numel() else 1
    lut = torch.zeros(n, dtype=torch.bool)
    lut[g] = True
    table = _OnDevice(lut)

    def is_global(idx):
        t = table.get(idx.device)
        return t[idx.clamp(max=n - 1)] & (idx < n)

    def mask_fn(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= w) | is_global(q_idx) | is_global(kv_idx)

    mask_fn._tileattn_min_len = int(g.max()) + 1 if g.numel() else 0  # create_block_mask checks it
    return mask_fn


def bigbird(
    window: int,
    num_global: int,
    num_random_blocks: int,
    block_size: int,
    seed: int = 0,
    *,
    seq_len: Optional[int] = None,
) -> MaskFn:
    """BigBird (Zaheer et al., 2020) block pattern, all in units of ``block_size`` tokens: query block
    qb sees key block kb iff ``|qb - kb| <= window`` (sliding blocks), or ``qb < num_global`` or
    ``kb < num_global`` (global blocks), or kb is one of the ``num_random_blocks`` random key blocks of
    row qb. The random blocks are drawn, per query block, among the key blocks not already visible
    (all of them when fewer remain), from a generator seeded with ``seed``: deterministic.

    Args:
        window: sliding window radius in blocks (1 = the classic 3-block window).
        num_global: number of leading global blocks.
        num_random_blocks: random key blocks per query block.
        block_size: tokens per BigBird block (use a multiple of the BlockMask block size to keep
            the blocks full).
        seed: seed of the random blocks.
        seq_len: sequence length (self-attention); required, since the random blocks are drawn among
            ``ceil(seq_len / block_size)`` key blocks.
    """
    w = _check_int("window", window, 0)
    ng = _check_int("num_global", num_global, 0)
    nr = _check_int("num_random_blocks", num_random_blocks, 0)
    bs = _check_int("block_size", block_size, 1)
    if seq_len is None:
        raise ValueError("bigbird needs seq_len= (the random blocks are drawn among ceil(seq_len / block_size) blocks)")
    n = _check_int("seq_len", seq_len, 1)
    nb = -(-n // bs)
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    base = ((qb - kb).abs() <= w) | (qb < ng) | (kb < ng)
    g = torch.Generator().manual_seed(int(seed))
    keys = torch.rand(nb, nb, generator=g)
    keys = keys.masked_fill(base, 2.0)  # already visible: never drawn
    k = min(nr, nb)
    layout = base.clone()
    if k:
        pick = keys.topk(k, dim=1, largest=False)
        chosen = torch.zeros_like(base).scatter_(1, pick.indices, pick.values < 2.0)
        layout |= chosen
    table = _OnDevice(layout)

    def mask_fn(b, h, q_idx, kv_idx):
        t = table.get(q_idx.device)
        return t[(q_idx // bs).clamp(max=nb - 1), (kv_idx // bs).clamp(max=nb - 1)]

    mask_fn.block_layout = layout  # (nb, nb) bool, for inspection
    return mask_fn


def and_masks(*fns: MaskFn) -> MaskFn:
    """Intersection of predicates: attend where every ``fn`` attends (no fns: attend everywhere)."""
    for f in fns:
        if not callable(f):
            raise TypeError(f"and_masks takes mask functions, got {type(f).__name__}")

    def mask_fn(b, h, q_idx, kv_idx):
        ok = torch.ones((), dtype=torch.bool, device=q_idx.device)
        for f in fns:
            ok = ok & f(b, h, q_idx, kv_idx)
        return ok

    bands = [getattr(f, "_tileattn_band", None) for f in fns]
    if fns and all(bd is not None for bd in bands):  # intersection of bands is a band
        los = [bd[0] for bd in bands if bd[0] is not None]
        his = [bd[1] for bd in bands if bd[1] is not None]
        mask_fn._tileattn_band = (max(los) if los else None, min(his) if his else None)
    mask_fn._tileattn_min_len = _min_len(fns)
    return mask_fn


def or_masks(*fns: MaskFn) -> MaskFn:
    """Union of predicates: attend where any ``fn`` attends (no fns: attend nowhere)."""
    for f in fns:
        if not callable(f):
            raise TypeError(f"or_masks takes mask functions, got {type(f).__name__}")

    def mask_fn(b, h, q_idx, kv_idx):
        ok = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for f in fns:
            ok = ok | f(b, h, q_idx, kv_idx)
        return ok

    mask_fn._tileattn_min_len = _min_len(fns)
    return mask_fn


def _min_len(fns) -> int:
    """The sequence length the combined predicates need (``_tileattn_min_len``: longformer's global tokens)."""
    return max([getattr(f, "_tileattn_min_len", 0) for f in fns], default=0)
