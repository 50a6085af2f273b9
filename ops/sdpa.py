"""Drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention`` on the fused kernels."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from tileattn._utils import MAX_HEAD_DIM, SUPPORTED_DTYPES, TensorCache, dispatching_subclass, warn_once

__all__ = ["scaled_dot_product_attention"]


def _topleft_causal(nq: int, nk: int, k: torch.Tensor, v: torch.Tensor):
    """Express SDPA's top-left causal mask (query i sees key j iff j <= i) with our bottom-right
    aligned flags. Returns ``(k, v, causal, window)``.

    - Nq == Nk: the two alignments agree, ``causal=True``.
    - Nq > Nk: bottom-right coordinates shift by Nk - Nq, so a window with right = Nq - Nk gives j <= i.
    - Nq < Nk: keys j >= Nq are seen by no query, so drop them and use ``causal=True`` on Nq keys.
    """
    if nq == nk:
        return k, v, True, None
    if nq > nk:
        return k, v, False, (-1, nq - nk)
    return k[:, :, :nq], v[:, :, :nq], True, None


def _sdpa_4d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    is_causal: bool,
    scale: Optional[float],
    return_lse: bool = False,
    lower_right: bool = False,
):
    """Internal: (B, Hq, L, E) / (B, Hkv, S, E) / (B, Hkv, S, Ev) inputs (Hq % Hkv == 0), ``bias`` a bool
    (True = attend) or float mask broadcastable to (B, Hq, L, S) or None, ``is_causal`` top-left aligned
    (never together with ``bias``), ``lower_right``: bottom-right aligned causal (tileattn's ``causal``).
    Runs the fused op."""
    from tileattn.attention import _attention

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    causal, window = lower_right, None
    if is_causal:
        k, v, causal, window = _topleft_causal(q.shape[2], k.shape[2], k, v)
    block_mask = _sparse_block_mask(bias, q, k)
    if block_mask is not None:
        bias = None
    return _attention(q, k, v, causal=causal, window=window, block_mask=block_mask, bias=bias, scale=scale,
                      return_lse=return_lse)


# A boolean mask this large whose blocks are at least this empty runs as a BlockMask (empty blocks skipped).
SPARSE_MIN_ELEMENTS = 1 << 20
SPARSE_MIN_EMPTY = 0.25
SPARSE_BLOCK = 128


def _sparse_block_mask(bias: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor):
    """A :class:`tileattn.BlockMask` for a large boolean mask with many empty blocks, else None (the
    masked-tile path). Eager only: building the lists reads the mask on the host side of the call, which
    torch.compile cannot trace, so compiled graphs keep the masked-tile path."""
    if bias is None or bias.dtype != torch.bool or torch.compiler.is_compiling():
        return None
    nq, nk = bias.shape[-2], bias.shape[-1]
    if nq * nk < SPARSE_MIN_ELEMENTS or nk != k.shape[2] or nq != q.shape[2]:
        return None
    # The same mask object is typically passed to every layer (Hugging Face does): build its BlockMask once
    # per mask tensor (identity + version, so a new or in-place modified mask is never served a stale BlockMask;
    # writes that bypass the version counter, ``mask.data[...] = ...`` or numpy-shared memory, are not seen:
    # documented in the README).
    hit = _BLOCK_MASK_CACHE.get(bias)
    if hit is not None:
        return hit[0]
    bm = _build_sparse_block_mask(bias, q)
    _BLOCK_MASK_CACHE.put(bias, (bm,))
    return bm


_BLOCK_MASK_CACHE = TensorCache(8)


def _build_sparse_block_mask(bias: torch.Tensor, q: torch.Tensor):
    nq, nk = bias.shape[-2], bias.shape[-1]
    m = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    m = m[: (1 if m.stride(0) == 0 else m.shape[0]), : (1 if m.stride(1) == 0 else m.shape[1])]
    bs = SPARSE_BLOCK
    pq, pk = (-nq) % bs, (-nk) % bs
    blocks = F.pad(m, (0, pk, 0, pq)).reshape(m.shape[0], m.shape[1], (nq + pq) // bs, bs, (nk + pk) // bs, bs)
    occupied = blocks.any(dim=5).any(dim=3)
    if 1.0 - occupied.float().mean().item() < SPARSE_MIN_EMPTY:
        return None
    from tileattn.block_mask import create_block_mask

    Bm, Hm = m.shape[0], m.shape[1]
    return create_block_mask(lambda b, h, qi, ki: m[b if Bm > 1 else 0, h if Hm > 1 else 0, qi, ki],
                             Bm if Bm > 1 else None, Hm if Hm > 1 else None, nq, nk, block_size=bs, device=q.device)


def _causal_bias(attn_mask, is_causal: bool, L: int, S: int):
    """torch's ``CausalBias`` (``torch.nn.attention.bias.causal_upper_left / causal_lower_right``) as flags,
    the way torch's SDPA dispatches it: upper-left (or Lq == Lk) is ``is_causal=True``; lower-right is
    tileattn's bottom-right ``causal=True``. Returns ``(is_causal, lower_right)``; None when ``attn_mask``
    is no CausalBias."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return None
    if is_causal:
        raise ValueError("scaled_dot_product_attention: a CausalBias attn_mask must not be combined with is_causal=True")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
        raise ValueError(f"CausalBias was built for (seq_len_q, seq_len_kv) = {(attn_mask.seq_len_q, attn_mask.seq_len_kv)} "
                         f"but query / key have (L, S) = {(L, S)}")
    upper = attn_mask.variant == CausalVariant.UPPER_LEFT or L == S
    return upper, not upper


def _fallback_reason(query, key, value, attn_mask, dropout_p) -> Optional[str]:
    """Why the fused path cannot take this call (None when it can)."""
    if dispatching_subclass(attn_mask):
        return (f"attn_mask is a {type(attn_mask).__name__} (a tensor subclass that torch's SDPA dispatches "
                "itself; its storage is not a dense mask)")
    if dropout_p > 0.0:
        return "dropout_p > 0 (the fused kernels have no attention dropout)"
    nested = any(x.is_nested for x in (query, key, value))
    if nested and _nested_reason(query, key, value, attn_mask) is not None:
        return _nested_reason(query, key, value, attn_mask)
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported (float16, bfloat16, float32 are)"
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported"
    if not nested and any(x.numel() == 0 for x in (query, key, value)):
        return "empty inputs"
    if (attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad
            and torch.is_grad_enabled()):
        return "a float attn_mask that requires grad (the fused op gives the mask no gradient)"
    return None


def _nested_reason(query, key, value, attn_mask) -> Optional[str]:
    """Why nested inputs cannot run on the varlen kernels (None when they can: jagged (B, H, j, D))."""
    if not all(x.is_nested for x in (query, key, value)):
        return "a mix of nested and dense inputs"
    if any(x.layout != torch.jagged for x in (query, key, value)):
        return "nested tensors with the strided layout (layout=torch.jagged runs fused)"
    if any(x.dim() != 4 or x._ragged_idx != 2 for x in (query, key, value)):
        return "nested tensors not shaped (B, H, j, D) with the ragged dim third"
    if attn_mask is not None:
        return "an attn_mask with nested tensors"
    return None


def _sdpa_nested(query, key, value, is_causal: bool, scale: Optional[float], enable_gqa: bool):
    """Jagged nested (B, H, j, E) inputs on :func:`tileattn.attention_varlen`: the packed values and the
    offsets are the varlen interface; the result is a jagged (B, H, j, Ev) nested tensor with query's
    ragged structure. Differentiable in query, key and value."""
    from tileattn.attention import attention_varlen

    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    hq, hk = query.shape[1], key.shape[1]
    if value.shape[1] != hk or (hq != hk and not (enable_gqa and hq % hk == 0)):
        raise ValueError(f"nested query / key / value head counts {hq} / {hk} / {value.shape[1]}: key and value "
                         "must match, and query's must equal them (or be a multiple with enable_gqa=True)")
    if key.offsets() is not value.offsets() and not torch.equal(key.offsets(), value.offsets()):
        raise ValueError("nested key and value must have the same sequence lengths")
    if is_causal and query.offsets() is not key.offsets() and not torch.equal(query.offsets(), key.offsets()):
        raise ValueError("is_causal with nested tensors needs query and key of equal lengths per sequence "
                         "(torch's top-left causal mask); pass a lower-right CausalBias-free call instead")

    def max_len(x):
        m = getattr(x, "_maybe_max_seqlen", None)
        return None if m is None else int(m)

    q, k, v = (x.values().transpose(0, 1) for x in (query, key, value))  # (total, H, E) views
    cu_q, cu_k = query.offsets().to(torch.int32), key.offsets().to(torch.int32)
    out = attention_varlen(q, k, v, cu_q, cu_k, max_len(query), max_len(key), causal=is_causal, scale=scale)
    return torch.nested.nested_tensor_from_jagged(out, query.offsets(), min_seqlen=getattr(query, "_maybe_min_seqlen", None),
                                                  max_seqlen=getattr(query, "_maybe_max_seqlen", None)).transpose(1, 2)


def _mask_4d(mask: torch.Tensor, batch: Tuple[int, ...], bflat: int) -> torch.Tensor:
    """Reshape a mask broadcastable to (*batch, H, L, S) to 4-d (B or 1, H or 1, L or 1, S or 1)."""
    nd = len(batch) + 3
    if mask.dim() > nd:
        raise ValueError(f"attn_mask has {mask.dim()} dims but the inputs have {nd}")
    mask = mask.reshape((1,) * (nd - mask.dim()) + tuple(mask.shape))
    mb = tuple(mask.shape[: len(batch)])
    tail = tuple(mask.shape[len(batch):])
    if all(s == 1 for s in mb):
        return mask.reshape((1,) + tail)
    try:
        mask = mask.expand(tuple(batch) + tail)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the batch dims {batch}") from None
    return mask.reshape((bflat,) + tail)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` running tileattn's fused kernels.

    Args:
        query: (..., Hq, L, E) — any number of leading dims (also none: (L, E)); float16 / bfloat16 /
            float32.
        key: (..., Hkv, S, E); leading dims broadcast against query's like torch.
        value: (..., Hkv, S, Ev).
        attn_mask: bool (True = take part in attention) or float (added to the scaled scores) tensor
            broadcastable to (..., Hq, L, S), or torch's ``CausalBias``
            (``torch.nn.attention.bias.causal_upper_left`` = ``is_causal``; ``causal_lower_right`` =
            bottom-right causal). Other tensor subclasses with their own ``__torch_function__`` go to torch.
        dropout_p: attention dropout probability; > 0 falls back to torch (no dropout in the kernels).
        is_causal: top-left aligned causal mask like torch (query i sees key j iff j <= i); an error
            together with ``attn_mask``.
        scale: softmax scale, default 1/sqrt(E).
        enable_gqa: allow Hq to be a multiple of Hkv (query head h uses key/value head h // (Hq // Hkv)).

    Returns:
        (..., Hq, L, Ev) in query's dtype. Differentiable in query, key and value (the mask gets no
        gradient). A query row whose keys are all masked out returns 0 (torch's CPU math kernel also
        returns 0; some torch GPU kernels return NaN).

    Nested jagged tensors (``torch.nested``, ``layout=torch.jagged``, (B, H, j, E) as torch's SDPA takes
    them) run on :func:`tileattn.attention_varlen` and return a jagged nested tensor with query's
    structure; ``is_causal`` there needs equal query / key lengths per sequence, ``enable_gqa`` works.

    Falls back to ``torch.nn.functional.scaled_dot_product_attention`` with a one-time warning saying why
    for: ``dropout_p > 0``, strided-layout nested tensors or nested with an ``attn_mask``, dtypes other
    than float16 / bfloat16 / float32, head dims above 256, empty inputs, and a float ``attn_mask`` that
    requires grad (while grad is enabled).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    torch_args = (attn_mask, is_causal)  # what a fallback passes to torch (which dispatches subclasses itself)
    lower_right = False
    flags = _causal_bias(attn_mask, is_causal, query.shape[-2] if query.dim() >= 2 else -1,
                         key.shape[-2] if key.dim() >= 2 else -1)
    if flags is not None:
        (is_causal, lower_right), attn_mask = flags, None
    if attn_mask is not None and not dispatching_subclass(attn_mask):
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if is_causal:
            raise ValueError("scaled_dot_product_attention: an explicit attn_mask must not be set when is_causal=True")

    reason = _fallback_reason(query, key, value, attn_mask, dropout_p)
    if reason is not None:
        warn_once(f"sdpa-fallback-{reason}",
                  f"tileattn.scaled_dot_product_attention: falling back to torch because of {reason}.")
        return F.scaled_dot_product_attention(query, key, value, attn_mask=torch_args[0], dropout_p=dropout_p,
                                              is_causal=torch_args[1], scale=scale, enable_gqa=enable_gqa)

    if query.is_nested:
        return _sdpa_nested(query, key, value, is_causal, scale, enable_gqa)
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.dim() == key.dim() == value.dim()) or query.dim() < 2:
        raise ValueError(
            f"query, key and value must have the same number (>= 2) of dims, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    L, E = query.shape[-2:]
    S = key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(f"query and key must have the same last dim, got {E} and {key.shape[-1]}")
    if value.shape[-2] != S:
        raise ValueError(f"key and value must have the same length, got {S} and {value.shape[-2]}")
    Ev = value.shape[-1]

    # (..., H, L, E) -> (B, H, L, E): the last leading dim is the head dim (the one GQA groups), the
    # others are batch dims that broadcast like torch's matmul.
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    nb = query.dim() - 3
    try:
        batch = tuple(torch.broadcast_shapes(query.shape[:nb], key.shape[:nb], value.shape[:nb]))
    except RuntimeError:
        raise ValueError(
            f"batch dims of query {tuple(query.shape[:nb])}, key {tuple(key.shape[:nb])} and value "
            f"{tuple(value.shape[:nb])} do not broadcast") from None
    hq, hk, hv = query.shape[nb], key.shape[nb], value.shape[nb]
    if hk != hv:
        if hk == 1:
            key, hk = key.expand(*key.shape[:nb], hv, *key.shape[nb + 1:]), hv
        elif hv == 1:
            value, hv = value.expand(*value.shape[:nb], hk, *value.shape[nb + 1:]), hk
        else:
            raise ValueError(f"key and value head counts differ: {hk} and {hv}")
    if hq != hk:
        if hq == 1:
            query, hq = query.expand(*query.shape[:nb], hk, *query.shape[nb + 1:]), hk
        elif hk == 1 or (enable_gqa and hq % hk == 0):
            pass  # GQA / MQA (a single key head broadcasts like torch)
        else:
            raise ValueError(
                f"query has {hq} heads but key/value have {hk}; pass enable_gqa=True with a head count "
                f"that divides the query's")
    bflat = math.prod(batch) if batch else 1

    def to4(x, h, n, d):
        return x.expand(*batch, h, n, d).reshape(bflat, h, n, d)

    q4, k4, v4 = to4(query, hq, L, E), to4(key, hk, S, E), to4(value, hk, S, Ev)
    bias = None if attn_mask is None else _mask_4d(attn_mask, batch, bflat)
    out = _sdpa_4d(q4, k4, v4, bias, is_causal, scale, lower_right=lower_right)
    return out.reshape(L, Ev) if unbatched else out.reshape(*batch, hq, L, Ev)
