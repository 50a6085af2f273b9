"""Inference over a KV cache: in-place append, contiguous or paged caches, GQA-packed split-KV decoding.

Forward only (no autograd). The kernels are the tile engine's forward (``kernels/attention.py``) in its
KV-cache variants: per-sequence key lengths, paged K / V loads through a block table, and query tiles that
pack the query heads of a GQA group so each K / V tile is read once per kv head.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from tileattn._utils import MAX_HEAD_DIM, check_same, check_scale, check_tensor, check_window, check_bool, use_triton
from tileattn.kernels.attention import attention_forward, kv_append
from tileattn.reference import attention_kvcache_ref

__all__ = ["attention_with_kvcache"]

PAGE_SIZES = (16, 32, 64, 128, 256)


def _check_int_tensor(name: str, x, ndim: int, shape0: int, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if x.dim() != ndim or x.shape[0] != shape0:
        want = "(B,)" if ndim == 1 else "(B, max_pages)"
        raise ValueError(f"{name} must have shape {want} with B = {shape0}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension (the kernels read it so), got "
                         f"strides {tuple(x.stride())}; call .contiguous() on it")


def _value_checks_enabled(q: torch.Tensor) -> bool:
    """Checks that read cache_seqlens / block_table values: free on CPU; on CUDA they would sync (and break
    CUDA-graph capture), so they run there only with TILEATTN_KVCACHE_CHECKS=1; never while torch.compile
    traces (they read values)."""
    if torch.compiler.is_compiling():
        return False
    return q.device.type != "cuda" or os.environ.get("TILEATTN_KVCACHE_CHECKS", "0") == "1"


def _check_inputs(q, k_cache, v_cache, cache_seqlens, k, v, block_table, num_splits):
    check_tensor("q", q, 4)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new tokens to append) or neither")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{name} must have 4 dimensions (B, Hkv, Nnew, D), got shape {tuple(x.shape)}")
            if x.stride(-1) != 1 and x.numel() > 0:
                raise ValueError(f"{name} must have a unit stride in its last dimension; call .contiguous() on it")
        named += [("k", k), ("v", v)]
    check_same(named)
    B, Hq, Nq, D = q.shape
    if block_table is not None:
        n_pages, page, Hkv, Dk = k_cache.shape
        if tuple(v_cache.shape[:3]) != (n_pages, page, Hkv):
            raise ValueError(f"paged v_cache must be (num_pages, page_size, Hkv, Dv) = ({n_pages}, {page}, {Hkv}, Dv) "
                             f"like k_cache, got {tuple(v_cache.shape)}")
        if page not in PAGE_SIZES:
            raise ValueError(f"page_size (k_cache.shape[1]) must be a power of two in 16..256, got {page}")
        _check_int_tensor("block_table", block_table, 2, B, q.device)
        if block_table.shape[1] == 0:
            raise ValueError("block_table must have at least one page per sequence, got shape (B, 0)")
        capacity = block_table.shape[1] * page
    else:
        Bc, Hkv, capacity, Dk = k_cache.shape
        if Bc != B or tuple(v_cache.shape[:3]) != (B, Hkv, capacity):
            raise ValueError(f"contiguous caches must be k_cache (B, Hkv, Ncache, D), v_cache (B, Hkv, Ncache, Dv) "
                             f"with q's B = {B}; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Dv = v_cache.shape[-1]
    if Dk != D:
        raise ValueError(f"q and k_cache head dims must match, got {D} and {Dk}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={Dv}")
    _check_int_tensor("cache_seqlens", cache_seqlens, 1, B, q.device)
    n_new = 0
    if k is not None:
        n_new = k.shape[2]
        if tuple(k.shape) != (B, Hkv, n_new, D) or tuple(v.shape) != (B, Hkv, n_new, Dv):
            raise ValueError(f"k / v must be (B, Hkv, Nnew, D) / (B, Hkv, Nnew, Dv) = ({B}, {Hkv}, Nnew, {D}) / "
                             f"(..., {Dv}); got {tuple(k.shape)} and {tuple(v.shape)}")
        if n_new > capacity:
            raise ValueError(f"{n_new} new tokens do not fit a cache of capacity {capacity}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k_cache, v_cache, k, v)):
        raise ValueError("attention_with_kvcache is forward-only (no autograd): call it under torch.no_grad() / "
                         "torch.inference_mode() or with tensors that do not require grad")
    if _value_checks_enabled(q):
        lens = cache_seqlens.tolist()
        for b, n in enumerate(lens):
            if n < 0 or n + n_new > capacity:
                raise ValueError(f"cache_seqlens[{b}] = {n} plus {n_new} new tokens must lie in [0, {capacity}] "
                                 "(the cache capacity)")
        if block_table is not None:
            for b, n in enumerate(lens):
                used = block_table[b, : (n + n_new + page - 1) // page]
                if used.numel() and (int(used.min()) < 0 or int(used.max()) >= n_pages):
                    raise ValueError(f"block_table[{b}] names pages outside [0, {n_pages}) among the "
                                     f"{used.numel()} pages sequence {b} uses")
    return n_new


def _append_reference(x, cache, cache_seqlens, block_table):
    """The append with torch indexing (the PyTorch path on CPU)."""
    for b in range(x.shape[0]):
        n = int(cache_seqlens[b])
        for t in range(x.shape[2]):
            pos = n + t
            if block_table is None:
                cache[b, :, pos] = x[b, :, t]
            else:
                ps = cache.shape[1]
                cache[int(block_table[b, pos // ps]), pos % ps] = x[b, :, t]


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    *,
    block_table: Optional[torch.Tensor] = None,
    causal: bool = True,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    num_splits: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of new queries over a KV cache (``flash_attn_with_kvcache``), appending new keys / values
    in place first. **Forward only** (no autograd: a ValueError if grad is enabled and an input requires it).

    Args:
        q: (B, Hq, Nq, D) queries (Nq >= 1, typically 1..16 when decoding).
        k_cache, v_cache: contiguous (B, Hkv, Ncache, D) / (B, Hkv, Ncache, Dv), or, with ``block_table``,
            paged (num_pages, page_size, Hkv, D) / (num_pages, page_size, Hkv, Dv) — the layout serving
            engines allocate; page_size a power of two in 16..256. Same dtype as q (fp16 / bf16 / fp32).
        cache_seqlens: (B,) int32, the valid cache length of each sequence before this call.
        k, v: optional (B, Hkv, Nnew, D) / (B, Hkv, Nnew, Dv) new tokens, written **in place** into the caches
            at positions ``cache_seqlens[b] ..`` (through the block table for paged caches) and attended to.
            ``cache_seqlens`` itself is not modified (advance it yourself, as with FlashAttention).
        block_table: (B, max_pages) int32: the pages of sequence b in order; capacity = max_pages * page_size.
        causal: bottom-right aligned causal mask (default): query i is position ``cache_seqlens[b] + Nnew -
            Nq + i`` and sees the keys up to it.
        window: ``(left, right)`` sliding window in the same aligned coordinates, as in
            :func:`tileattn.attention`.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the (B, Hq, Nq) float32 log-sum-exp.
        num_splits: split the keys into this many ranges (split-KV / flash-decoding); None chooses from
            (B, Hkv, capacity, SM count), with no host sync.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype (and lse). A sequence with no keys gives out 0 and lse -inf.

    No host sync anywhere on CUDA (CUDA-graph capturable with a fixed ``max_pages``, after a warm-up call
    that runs the autotuner). Values of ``cache_seqlens`` / ``block_table`` are checked only on CPU (or with
    ``TILEATTN_KVCACHE_CHECKS=1``, which syncs): on CUDA the kernels clamp every page id into the cache and
    every length to the capacity, so bad values give wrong results but never out-of-bounds accesses.
    """
    n_new = _check_inputs(q, k_cache, v_cache, cache_seqlens, k, v, block_table, num_splits)
    check_bool("return_lse", return_lse)
    left, right = check_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    if not use_triton(q, "attention_with_kvcache"):
        if n_new:
            _append_reference(k, k_cache, cache_seqlens, block_table)
            _append_reference(v, v_cache, cache_seqlens, block_table)
        win = None if (left, right) == (-1, -1) else (left, right)
        lens = cache_seqlens + n_new
        out, lse = attention_kvcache_ref(q, k_cache, v_cache, lens, block_table=block_table, window=win,
                                         causal=False, scale=scale)
        out, lse = out.to(q.dtype), lse.float()
    else:
        out, lse = _kvcache_op(q, k_cache, v_cache, cache_seqlens, k, v, block_table, scale, left, right, num_splits)
    return (out, lse) if return_lse else out


@torch.library.custom_op("tileattn::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k: Optional[torch.Tensor], v: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
    scale: float, left: int, right: int, num_splits: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The append (mutating the caches) and the decode kernels, as one custom op: torch.compile sees the
    in-place writes and traces a decode step without a graph break."""
    n_new = 0 if k is None else k.shape[2]
    if n_new:
        kv_append(k, k_cache, cache_seqlens, block_table)
        kv_append(v, v_cache, cache_seqlens, block_table)
    kc, vc = (k_cache, v_cache) if block_table is None else (k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3))
    G = q.shape[1] // kc.shape[1]
    return attention_forward(q, kc, vc, scale=scale, left=left, right=right, num_splits=num_splits,
                             kvcache=(cache_seqlens, n_new, block_table, G > 1))


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, block_table, scale, left, right, num_splits):
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v_cache.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)
