"""Fused softmax attention: public function, argument checks and the autograd Function."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from tileattn._utils import check_attention_inputs, check_scale, check_window, use_triton
from tileattn.reference import attention_ref

__all__ = ["attention"]


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


def _reference_path(q, k, v, causal, window, block_mask, bias, scale):
    mask = None
    extra = None
    if block_mask is not None:
        mask = block_mask.to_dense().to(q.device)
    if bias is not None:
        if bias.dtype == torch.bool:
            mask = bias if mask is None else (mask & bias)
        else:
            extra = bias
    if extra is None:
        out, lse = attention_ref(q, k, v, causal=causal, window=window, mask=mask, scale=scale, upcast=True)
    else:
        # float bias: fold into a reference computation in float64
        from tileattn.reference import _expand_kv, visible_mask

        hq = q.shape[1]
        qd, kd, vd = q.double(), _expand_kv(k, hq).double(), _expand_kv(v, hq).double()
        s = torch.matmul(qd, kd.transpose(-1, -2)) * scale + extra.double()
        ok = visible_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device)
        if mask is not None:
            ok = ok & mask
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1)
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        out = torch.matmul(torch.exp(s - lse_safe[..., None]), vd)
    return out.to(q.dtype), lse.float()


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
    left, right = check_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    bias = _check_bias(bias, q, k)
    if block_mask is not None:
        raise NotImplementedError("block_mask is not supported yet (block-sparse attention lands with its issue)")
    win = None if (left, right) == (-1, -1) else (left, right)
    if use_triton(q, "attention") and False:  # kernels land with the fused-attention issue
        pass
    out, lse = _reference_path(q, k, v, False, win, block_mask, bias, scale)
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
        log, not differentiable). A query row that sees no key gets out = 0 and lse = -inf, and zero
        gradients.
    """
    return _attention(q, k, v, causal=causal, window=window, block_mask=block_mask, scale=scale,
                      return_lse=return_lse)
