"""Attention probabilities for interpretability, rebuilt by a Triton kernel from q, k and the LSE that
the fused forward saves (no unfused softmax over the whole score matrix)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from tileattn._utils import check_same, check_scale, check_tensor, check_window, use_triton
from tileattn.reference import _expand_kv, visible_mask

__all__ = ["attention_weights"]

Index = Union[None, int, slice, Sequence[int], torch.Tensor]


def _weights_torch(q, k, lse, bias, head_idx, row_idx, left, right, scale):
    """PyTorch path (CPU without the interpreter): same formula as the kernel, in float32."""
    hq = q.shape[1]
    hi, ri = head_idx.long(), row_idx.long()
    qs = q[:, hi][:, :, ri].float()
    ks = _expand_kv(k, hq)[:, hi].float()
    s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    win = None if (left, right) == (-1, -1) else (left, right)
    ok = visible_mask(q.shape[2], k.shape[2], window=win, device=q.device)[ri]
    if bias is not None:
        b = bias[:, hi][:, :, ri]
        if b.dtype == torch.bool:
            ok = ok & b
        else:
            s = s + b.float()
    l = lse[:, hi][:, :, ri].float()[..., None]
    ok = ok & (l > -math.inf)
    p = torch.exp(s - torch.where(l > -math.inf, l, torch.zeros_like(l)))
    return torch.where(ok, p, torch.zeros_like(p)).to(q.dtype)


@torch.library.custom_op("tileattn::attention_weights", mutates_args=())
def _weights_op(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    bias: Optional[torch.Tensor],
    head_idx: torch.Tensor,
    row_idx: torch.Tensor,
    left: int,
    right: int,
    scale: float,
) -> torch.Tensor:
    if use_triton(q, "attention_weights"):
        from tileattn.kernels.weights import attention_weights_fwd

        return attention_weights_fwd(q, k, lse, bias, head_idx, row_idx, left, right, scale)
    return _weights_torch(q, k, lse, bias, head_idx, row_idx, left, right, scale)


@_weights_op.register_fake
def _weights_fake(q, k, lse, bias, head_idx, row_idx, left, right, scale):
    return q.new_empty((q.shape[0], head_idx.shape[0], row_idx.shape[0], k.shape[2]))


def _index(sel: Index, n: int, name: str, device) -> torch.Tensor:
    """Normalise a head / row selection to an int32 index vector on ``device``."""
    if sel is None:
        return torch.arange(n, device=device, dtype=torch.int32)
    if isinstance(sel, slice):
        idx = torch.arange(n, device=device, dtype=torch.int32)[sel].contiguous()
        if idx.numel() == 0:
            raise ValueError(f"{name} selects nothing")
        return idx
    if isinstance(sel, torch.Tensor):
        if sel.dtype == torch.bool or sel.is_floating_point() or sel.dim() > 1:
            raise TypeError(f"{name} must be an int, a slice, a sequence of ints or a 1-d integer tensor")
        idx = sel.reshape(-1).to(device=device, dtype=torch.int32)
        idx = torch.where(idx < 0, idx + n, idx).contiguous()
        if not torch.compiler.is_compiling() and idx.numel() and bool(((idx < 0) | (idx >= n)).any()):
            raise ValueError(f"{name} holds an index out of range for size {n}")
        return idx
    if isinstance(sel, bool) or not isinstance(sel, (int, Sequence)) or isinstance(sel, (str, bytes)):
        raise TypeError(f"{name} must be an int, a slice, a sequence of ints or a 1-d integer tensor, got "
                        f"{type(sel).__name__}")
    items = [sel] if isinstance(sel, int) else list(sel)
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must hold ints, got {type(x).__name__}")
        if not -n <= x < n:
            raise ValueError(f"{name} index {x} is out of range for size {n}")
        out.append(x + n if x < 0 else x)
    if not out:
        raise ValueError(f"{name} selects nothing")
    return torch.tensor(out, device=device, dtype=torch.int32)


def _fold_block_mask(bias: Optional[torch.Tensor], block_mask, device) -> Optional[torch.Tensor]:
    """AND a block mask (its dense bool form) into ``bias``."""
    if block_mask is None:
        return bias
    dense = block_mask.to_dense().to(device=device, dtype=torch.bool)
    if bias is None:
        return dense
    if bias.dtype == torch.bool:
        return bias & dense
    return torch.where(dense, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=device))


def _weights_from_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    left: int = -1,
    right: int = -1,
    bias: Optional[torch.Tensor] = None,
    scale: float,
    head_idx: Optional[torch.Tensor] = None,
    row_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Internal: inputs already checked, ``bias`` already expanded to (B, Hq, Nq, Nk)."""
    if head_idx is None:
        head_idx = torch.arange(q.shape[1], device=q.device, dtype=torch.int32)
    if row_idx is None:
        row_idx = torch.arange(q.shape[2], device=q.device, dtype=torch.int32)
    return _weights_op(q.detach(), k.detach(), lse.detach().float(), bias, head_idx, row_idx,
                       int(left), int(right), float(scale))


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    block_mask=None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    heads: Index = None,
    rows: Index = None,
) -> torch.Tensor:
    """Attention probabilities ``softmax(scale * q k^T + bias)`` with the same masks as
    :func:`tileattn.attention`, computed tile by tile by a Triton kernel from q, k and the row
    log-sum-exp (the LSE the fused forward returns), so a subset never needs the full score matrix.

    Args:
        q: (B, Hq, Nq, D) queries, float16 / bfloat16 / float32, unit stride in the last dim.
        k: (B, Hkv, Nk, D) keys; Hq % Hkv == 0 (GQA: query head h uses key head h // (Hq // Hkv)).
        lse: (B, Hq, Nq) natural-log LSE of the scaled (and biased) scores, as returned by
            ``tileattn.attention(..., return_lse=True)`` with the same masks. When None it is computed
            with the fused op.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Nk - Nq).
        window: ``(left, right)`` sliding window, same convention as :func:`tileattn.attention`.
        block_mask: a :class:`tileattn.BlockMask`; ANDed with the other masks (the weights kernel reads
            its dense form, ``block_mask.to_dense()``).
        bias: bool (True = attend) or float (added to the scaled scores) tensor broadcastable to
            (B, Hq, Nq, Nk).
        scale: softmax scale, default 1/sqrt(D).
        heads: query heads to return: None (all), an int, a slice, a sequence of ints or a 1-d int tensor.
        rows: query rows to return, same forms as ``heads``.

    Returns:
        (B, len(heads), len(rows), Nk) probabilities in q's dtype (always 4-d, also for an int
        selection). Rows with no visible key are 0. Not differentiable (the result carries no grad).
    """
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_same([("q", q), ("k", k)])
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"q and k batch sizes differ: {B} and {k.shape[0]}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({k.shape[1]})")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims must match, got {D} and {k.shape[3]}")
    left, right = check_window(window, causal)
    scale_f = check_scale(scale, D)
    from tileattn.attention import _attention, _check_bias
    from tileattn.block_mask import BlockMask

    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a tileattn.BlockMask, got {type(block_mask).__name__}")
        block_mask.check_compatible(q, k)
    _check_bias(bias, q, k)  # type / shape / device of the mask tensor, before any use
    if lse is None:
        with torch.no_grad():
            _, lse = _attention(q, k, k, window=None if (left, right) == (-1, -1) else (left, right),
                                block_mask=block_mask, bias=bias, scale=scale_f, return_lse=True)
    bias = _fold_block_mask(bias, block_mask, q.device)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor or None, got {type(lse).__name__}")
    if not lse.is_floating_point():
        raise TypeError(f"lse must be a floating-point tensor (float32 from attention(..., return_lse=True)), got {lse.dtype}")
    if tuple(lse.shape) != (B, Hq, Nq):
        raise ValueError(f"lse must have shape (B, Hq, Nq) = {(B, Hq, Nq)}, got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    if not torch.compiler.is_compiling() and bool(torch.isnan(lse).any() | (lse == math.inf).any()):
        raise ValueError("lse must hold log-sum-exps (finite, or -inf for rows with no visible key); it has NaN or +inf")
    bias = _check_bias(bias, q, k)
    head_idx = _index(heads, Hq, "heads", q.device)
    row_idx = _index(rows, Nq, "rows", q.device)
    return _weights_from_lse(q, k, lse, left=left, right=right, bias=bias, scale=scale_f,
                             head_idx=head_idx, row_idx=row_idx)
