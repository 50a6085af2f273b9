"""Fused softmax attention: public function, argument checks and the autograd Function."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple, Union

import torch

from tileattn._utils import (check_attention_inputs, check_bool, check_cu_seqlens, check_same, check_scale,
                             check_tensor, check_window, no_double_backward, use_triton)
from tileattn.kernels.attention import attention_backward, attention_forward
from tileattn.reference import attention_ref, attention_varlen_ref

__all__ = ["attention", "attention_varlen"]


def _check_bias(bias: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """``bias``: bool (True = attend) or float (added to the scaled scores), broadcastable to
    (B, Hq, Nq, Nk). Returned as a 4-d view (no copy)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"attention mask must be a torch.Tensor, got {type(bias).__name__}")
    if bias.device != q.device:
        raise ValueError(f"attention mask is on {bias.device} but q is on {q.device}")
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if bias.dim() > 4:
        raise ValueError(f"attention mask must have at most 4 dims, got shape {tuple(bias.shape)}")
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    try:
        torch.broadcast_shapes(bias.shape, (B, Hq, Nq, Nk))
        bias = bias.expand(B, Hq, Nq, Nk)
    except RuntimeError:
        raise ValueError(
            f"attention mask of shape {tuple(bias.shape)} does not broadcast to (B, Hq, Nq, Nk) = {(B, Hq, Nq, Nk)}"
        ) from None
    if bias.dtype != torch.bool and not bias.is_floating_point():
        raise TypeError(f"attention mask must be bool or floating point, got {bias.dtype}")
    return bias


def _reference_path(q, k, v, window, block_mask, bias, scale):
    """Differentiable float64 PyTorch path (CPU tensors without the Triton interpreter)."""
    mask = None if block_mask is None else block_mask.to_dense().to(q.device)
    if bias is not None and bias.dtype == torch.bool:
        mask, bias = (bias if mask is None else mask & bias), None
    out, lse = attention_ref(q, k, v, window=window, mask=mask, bias=bias, scale=scale, upcast=True)
    return out.to(q.dtype), lse.float()


def _prepare_block_mask(block_mask, q, k, left: int, right: int):
    """Validate a BlockMask against q / k and fold causal / window into it (AND), so that blocks outside
    the window are skipped, not masked."""
    from tileattn.block_mask import BlockMask, create_block_mask
    from tileattn import masks

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a tileattn.BlockMask, got {type(block_mask).__name__}")
    block_mask.check_compatible(q, k)  # lengths, batch / head broadcast, device
    if (left, right) != (-1, -1):
        # Folded once per (mask, window) and kept on the mask in a small LRU (_FOLD_CACHE_SIZE windows): later
        # calls with a recent window reuse it (no host work per call). Keyed by the BlockMask object, whose
        # lists are immutable by contract (they are value-checked once, at construction).
        cache = block_mask.__dict__.setdefault("_tileattn_folded", OrderedDict())
        folded = cache.pop((left, right), None)
        if folded is None:
            win = create_block_mask(masks.sliding_window(left, right, q_len=q.shape[2], kv_len=k.shape[2]),
                                    None, None, q.shape[2], k.shape[2],
                                    block_size=(block_mask.bs_q, block_mask.bs_k), device=q.device)
            folded = block_mask & win
            while len(cache) >= _FOLD_CACHE_SIZE:
                cache.popitem(last=False)
        cache[(left, right)] = folded
        block_mask = folded
    return block_mask


_FOLD_CACHE_SIZE = 8


_SPARSE_FIELDS = ("kv_num_full", "kv_idx_full", "kv_num_part", "kv_idx_part", "kv_mask_id_part",
                  "q_num_full", "q_idx_full", "q_num_part", "q_idx_part", "q_mask_id_part", "masks")


def _sparse_tensors(block_mask) -> List[torch.Tensor]:
    return [getattr(block_mask, f) for f in _SPARSE_FIELDS]


@torch.library.custom_op("tileattn::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
    sparse: List[torch.Tensor], scale: float, left: int, right: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale=scale, left=left, right=right, bias=bias, sparse=sparse or None)


@_attention_fwd_op.register_fake
def _(q, k, v, bias, sparse, scale, left, right):
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)


@torch.library.custom_op("tileattn::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], bias: Optional[torch.Tensor], sparse: List[torch.Tensor],
    scale: float, left: int, right: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, out, lse, scale=scale, left=left, right=right, bias=bias,
                              sparse=sparse or None, dlse=dlse)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, bias, sparse, scale, left, right):
    # the kernels allocate contiguous gradients (strided views of a packed qkv must not leak into the fake)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, sparse, scale, left, right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, *sparse)
    ctx.n_sparse = len(sparse)
    ctx.params = (scale, left, right)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, *sparse = ctx.saved_tensors
    scale, left, right = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = no_double_backward("attention", *_attention_bwd_op(dout, q, k, v, out, lse, dlse, bias, sparse,
                                                                    scale, left, right))
    return dq, dk, dv, None, [None] * ctx.n_sparse, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    block_mask=None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Internal entry point shared by :func:`attention` and the drop-ins. ``bias`` is an optional bool
    (True = attend) or float (added to scaled scores) tensor broadcastable to (B, Hq, Nq, Nk); it gets
    no gradient."""
    check_attention_inputs(q, k, v)
    check_bool("return_lse", return_lse)
    left, right = check_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    bias = _check_bias(bias, q, k)
    if block_mask is not None:
        block_mask = _prepare_block_mask(block_mask, q, k, left, right)
        left, right = -1, -1  # folded into the block mask
    if not use_triton(q, "attention"):
        win = None if (left, right) == (-1, -1) else (left, right)
        out, lse = _reference_path(q, k, v, win, block_mask, bias, scale)
    else:
        sparse = _sparse_tensors(block_mask) if block_mask is not None else []
        out, lse = _attention_fwd_op(q, k, v, bias, sparse, scale, left, right)
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    block_mask=None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused softmax attention (FlashAttention-style tiling, online softmax), differentiable.

    Args:
        q: (B, Hq, Nq, D) query, float16 / bfloat16 / float32, unit stride in the last dim.
        k: (B, Hkv, Nk, D) keys; Hq % Hkv == 0 (GQA / MQA: query head h uses kv head h // (Hq // Hkv)).
        v: (B, Hkv, Nk, Dv) values; Dv may differ from D. D, Dv <= 256.
        causal: bottom-right aligned causal mask: query i sees key j iff j <= i + Nk - Nq (equal to
            SDPA ``is_causal`` when Nq == Nk).
        window: ``(left, right)`` sliding window in the same aligned coordinates (FlashAttention
            convention): query i sees key j iff i + Nk - Nq - left <= j <= i + Nk - Nq + right; -1 means
            unbounded. With ``causal=True`` right is 0.
        block_mask: a :class:`tileattn.BlockMask` (block-sparse attention); combined (AND) with
            ``causal`` / ``window``.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, and with ``return_lse`` also lse (B, Hq, Nq) float32 (natural
        log; differentiable too). A query row that sees no key gets out = 0 and lse = -inf, and zero
        gradients.
    """
    return _attention(q, k, v, causal=causal, window=window, block_mask=block_mask, scale=scale,
                      return_lse=return_lse)


# ----------------------------------------------------------------------------------------------------
# Packed variable-length sequences (FlashAttention's varlen interface)
# ----------------------------------------------------------------------------------------------------
def _as4(x: torch.Tensor) -> torch.Tensor:
    """(total, H, D) -> the (1, H, total, D) view the tile engine takes (no copy)."""
    return x.transpose(0, 1).unsqueeze(0)


def _from4(x: torch.Tensor) -> torch.Tensor:
    return x.squeeze(0).transpose(0, 1)


@torch.library.custom_op("tileattn::attention_varlen_fwd", mutates_args=())
def _varlen_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    max_q: int, max_k: int, scale: float, left: int, right: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention_forward(_as4(q), _as4(k), _as4(v), scale=scale, left=left, right=right,
                                 varlen=(cu_q, cu_k, max_q, max_k))
    return _from4(out), lse.squeeze(0)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("tileattn::attention_varlen_bwd", mutates_args=())
def _varlen_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
    scale: float, left: int, right: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = attention_backward(_as4(do), _as4(q), _as4(k), _as4(v), _as4(out), lse.unsqueeze(0), scale=scale,
                                    left=left, right=right, dlse=None if dlse is None else dlse.unsqueeze(0),
                                    varlen=(cu_q, cu_k, max_q, max_k))
    return _from4(dq), _from4(dk), _from4(dv)


@_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, left, right)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = no_double_backward("attention_varlen",
                                    *_varlen_bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.params))
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _varlen_checks_enabled() -> bool:
    """Value checks of cu_seqlens cost a device-to-host copy: skipped under torch.compile, CUDA-graph
    capture, or with TILEATTN_VARLEN_CHECKS=0 (the kernels clamp every row range, so unchecked bad values
    give wrong results, never out-of-bounds reads)."""
    import os

    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("TILEATTN_VARLEN_CHECKS", "1") != "0"


def _check_varlen_inputs(q, k, v, cu_q, cu_k, max_q, max_k) -> Tuple[int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 3)
    check_same([("q", q), ("k", k), ("v", v)])
    # the 4-d checks (heads, head dims, lengths) on the (1, H, total, D) views
    check_attention_inputs(_as4(q), _as4(k), _as4(v))
    nseq = cu_q.shape[0] - 1 if isinstance(cu_q, torch.Tensor) and cu_q.dim() == 1 else None
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise TypeError(f"{name} must be a non-negative Python int or None, got {m!r}")
    validate = _varlen_checks_enabled() or max_q is None or max_k is None
    longest_q = check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], q.device, validate=validate)
    longest_k = check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0], q.device, validate=validate, nseq=nseq)
    if validate:
        for name, m, longest in (("max_seqlen_q", max_q, longest_q), ("max_seqlen_k", max_k, longest_k)):
            if m is not None and longest > m:
                raise ValueError(f"a sequence has {longest} rows, more than {name} = {m}")
    return (longest_q if max_q is None else max_q), (longest_k if max_k is None else max_k)


def _varlen_reference_path(q, k, v, cu_q, cu_k, window, scale):
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, window=window, scale=scale, upcast=True)
    return out.to(q.dtype), lse.float()


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused softmax attention over packed variable-length sequences (``flash_attn_varlen_func``'s
    interface), differentiable in q, k, v; deterministic backward.

    Args:
        q: (total_q, Hq, D) queries of every sequence, packed along dim 0; any strides with a unit last dim
            (e.g. ``qkv[:, 0]`` of a packed (total, 3, H, D) tensor).
        k: (total_k, Hkv, D), v: (total_k, Hkv, Dv) keys / values, packed the same way; Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (nseq + 1,) cumulative lengths: sequence b is query rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. They
            start at 0, never decrease and end at total_q / total_k. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest query / key length (Python ints: they pick the autotuned
            config, no sync). ``None`` computes them from cu_seqlens (one device-to-host copy).
        causal, window, scale: per sequence exactly as :func:`tileattn.attention` (bottom-right aligned
            causal mask and FlashAttention windows within each sequence).
        return_lse: also return the log-sum-exp.

    Returns:
        out (total_q, Hq, Dv) in q's dtype, and with ``return_lse`` lse (Hq, total_q) float32 (FlashAttention's
        varlen LSE layout). A sequence with queries but no keys gives out = 0, lse = -inf.

    The values of cu_seqlens (start 0, non-decreasing, last entry = total, lengths <= max_seqlen) are
    checked on the host, which costs one device-to-host copy on CUDA; it is skipped under torch.compile,
    during CUDA-graph capture and with the environment variable ``TILEATTN_VARLEN_CHECKS=0`` when both
    max_seqlen arguments are given (the kernels clamp every sequence's rows into the packed tensors, so
    bad values then give wrong results but never out-of-bounds reads). Work is proportional to the visible
    tile pairs of each sequence; no program touches another sequence's rows.
    """
    check_bool("return_lse", return_lse)
    left, right = check_window(window, causal)
    max_q, max_k = _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = check_scale(scale, q.shape[-1])
    if not use_triton(q, "attention_varlen"):
        win = None if (left, right) == (-1, -1) else (left, right)
        out, lse = _varlen_reference_path(q, k, v, cu_seqlens_q, cu_seqlens_k, win, scale)
    else:
        out, lse = _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_q), int(max_k), scale, left, right)
    return (out, lse) if return_lse else out
