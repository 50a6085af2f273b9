"""Lightning attention (causal linear attention with per-head or per-token decay): public ops, torch.library
custom ops with autograd, the decode step, the decay-rate helpers (OpenNLPLab and fla conventions) and the
``LightningAttention`` module.

Semantics, per sequence and head, with ``lambda_t = exp(-s_h)`` (per-head rate ``s_h = decay[h] >= 0``) or
``lambda_t = exp(g_t)`` (per-token log-decay ``g_t <= 0``, fla ``chunk_simple_gla``), or no decay::

    S_t = lambda_t * S_{t-1} + k_t^T v_t        (D x Dv, S_{-1} = initial_state or 0)
    o_t = scale * q_t S_t

Packed sequences (``cu_seqlens``) restart the recurrence at every sequence start, each with its own state.
The references are :func:`tileattn.reference.linear_attention_quadratic_ref`,
:func:`tileattn.reference.linear_attention_recurrent_ref` and :func:`tileattn.reference.lightning_varlen_ref`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tileattn._utils import (MAX_HEAD_DIM, TensorCache, check_bool, check_cu_seqlens, check_same, check_scale,
                             check_tensor, no_double_backward, use_triton, warn_once)
from tileattn.kernels.utils import interpreter_enabled
from tileattn.reference import linear_attention_quadratic_ref, linear_attention_recurrent_ref

__all__ = ["lightning_attention", "lightning_decode", "lightning_decay_rates", "fla_lightning_decay_rates",
           "LightningAttention"]

_OP = "lightning_attention"
_FALLBACK_CHUNK = 128  # chunk length of the PyTorch (no-Triton) path; the reference is quadratic per chunk


# ----------------------------------------------------------------------------------------------------
# Decay rates
# ----------------------------------------------------------------------------------------------------
def _alibi_slopes(n: int) -> List[float]:
    # ALiBi slopes (Press et al., 2022): for a power of two n, 2^(-8 (h + 1) / n), h = 0..n-1; otherwise the
    # slopes of the closest lower power of two followed by every other slope of twice that power.
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(p) + _alibi_slopes(2 * p)[0::2][: n - p]


def lightning_decay_rates(
    num_heads: int,
    *,
    layer_idx: int = 0,
    num_layers: int = 1,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Per-head decay rates ``s_h`` in the TransNormerLLM / Lightning Attention convention (decay
    ``lambda_h = exp(-s_h)``), ready to pass as ``decay`` to :func:`lightning_attention`.

    Convention (source: OpenNLPLab ``lightning_attn.utils._build_slope_tensor`` and the TransNormerLLM /
    TNL attention layers): the ALiBi slopes ``s_h = 2^(-8 (h + 1) / H)`` for ``h = 0..H-1`` when ``H`` is a
    power of two (e.g. H = 8: 1/2, 1/4, ..., 1/256); for other ``H`` the slopes of the closest lower power
    of two ``P`` followed by the even-indexed slopes of ``2P``. With ``num_layers > 1`` the rates are
    scaled per layer by ``1 - layer_idx / (num_layers - 1) + 1e-5`` (the first layer decays fastest, the
    last layer almost not at all), as TransNormerLLM does.

    Args:
        num_heads: H >= 1.
        layer_idx: 0-based layer index, ``0 <= layer_idx < num_layers``.
        num_layers: number of layers; 1 (default) disables the per-layer scaling.
        device: where to create the tensor.

    Returns:
        (H,) float32 tensor of rates, all in (0, 1).
    """
    _check_layer_args(num_heads, layer_idx, num_layers)
    factor = 1.0 if num_layers == 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return torch.tensor([s * factor for s in _alibi_slopes(num_heads)], dtype=torch.float32, device=device)


def _check_layer_args(num_heads, layer_idx, num_layers) -> None:
    for name, val in (("num_heads", num_heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"need 0 <= layer_idx < num_layers, got layer_idx={layer_idx}, num_layers={num_layers}")


def fla_lightning_decay_rates(
    num_heads: int,
    *,
    layer_idx: int = 0,
    num_layers: int = 1,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Per-head decay rates ``s_h`` in fla's lightning-attention convention (``fla.ops.lightning_attn``,
    which calls ``chunk_simple_gla`` with ``g_gamma = -s``): ``s_h = (8 / H) (1 - layer_idx / num_layers) h``
    for ``h = 0..H-1`` -- linear in the head index, head 0 does not decay, and the per-layer factor divides by
    ``num_layers`` (not ``num_layers - 1``). This is NOT the OpenNLPLab / TransNormerLLM convention of
    :func:`lightning_decay_rates` (ALiBi slopes ``2^(-8 (h + 1) / H)``): the two give different models.

    Returns an (H,) float32 tensor of rates >= 0, ready to pass as ``decay`` to :func:`lightning_attention`
    (equivalently ``g = -rates[None, :, None].expand(B, H, N)``)."""
    _check_layer_args(num_heads, layer_idx, num_layers)
    factor = 8.0 / num_heads * (1.0 - layer_idx / num_layers)
    return torch.tensor([factor * h for h in range(num_heads)], dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------
def _can_sync() -> bool:
    """Whether a value check (a device sync) is allowed: not under torch.compile or CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# CUDA rate tensors already value-checked (identity + version; see _check_decay for writes it cannot see)
_CHECKED_DECAY = TensorCache(64)


def _check_decay(decay, H: int, q: torch.Tensor) -> torch.Tensor:
    """Rates as a contiguous (H,) float32 tensor on q's device (zeros for ``None``); never differentiated."""
    if decay is None:
        return torch.zeros(H, device=q.device, dtype=torch.float32)
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay must be a torch.Tensor of shape (H,) = ({H},) or None, got {type(decay).__name__}")
    if not decay.is_floating_point():
        raise TypeError(f"decay must be a floating-point tensor of rates, got {decay.dtype}")
    if decay.numel() != H or (decay.dim() > 1 and decay.shape[0] != H):
        raise ValueError(f"decay must have shape (H,) = ({H},) (or (H, 1, 1)), got {tuple(decay.shape)}")
    if decay.device != q.device:
        raise ValueError(f"decay is on {decay.device} but q is on {q.device}")
    if decay.requires_grad:
        warn_once("lightning-decay-grad", "tileattn.lightning_attention: decay rates are constants; they get no gradient.")
    rates = decay.detach().reshape(H).to(torch.float32)
    # Device side, every call, no sync: an invalid rate becomes NaN, so the heads it drives return NaN (never
    # finite garbage such as the ~1e32 a negative rate gives). This covers writes the eager check below
    # cannot see: it runs once per (tensor, version) on CUDA (it syncs; a decode loop passes the same rates
    # for every token and layer), and writes that bypass the version counter (``.data[...] = ...``, memory
    # shared with numpy) do not bump the version. On CPU the check is free of syncs and runs every call.
    rates = torch.where((rates >= 0) & (rates < math.inf), rates, math.nan).contiguous()
    if _can_sync() and (not rates.is_cuda or _CHECKED_DECAY.get(decay) is None):
        if not bool(torch.isfinite(rates).all() & (rates >= 0).all()):
            raise ValueError(
                "decay must hold finite rates s_h >= 0 (lambda_h = exp(-s_h)); got negative or non-finite "
                "values (pass rates, not log-decays)"
            )
        _CHECKED_DECAY.put(decay, True)
    return rates


def _check_state(name: str, state, shape: Tuple[int, ...], q: torch.Tensor, lead: str = "B") -> Optional[torch.Tensor]:
    if state is None:
        return None
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({lead}, H, D, Dv) or None, "
                        f"got {type(state).__name__}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape ({lead}, H, D, Dv) = {tuple(shape)}, got {tuple(state.shape)}")
    if state.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (states are kept in fp32), got {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"{name} is on {state.device} but q is on {q.device}")
    return state if state.is_contiguous() else state.contiguous()


def _check_g(g, shape: Tuple[int, int, int], q: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-token log-decays as a contiguous (B, H, N) float32 tensor (differentiable), or None."""
    if g is None:
        return None
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor of shape (B, H, N) = {shape} or None, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor of log-decays, got {g.dtype}")
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"g must have shape (B, H, N) = {tuple(shape)}, got {tuple(g.shape)}")
    if g.device != q.device:
        raise ValueError(f"g is on {g.device} but q is on {q.device}")
    g32 = g.to(torch.float32)
    ok = (g32 <= 0) & torch.isfinite(g32)
    # CPU: checked every call (no sync). CUDA: g changes every step, so a check would sync on the hot
    # path: invalid values become NaN on the device instead and the heads they drive return NaN.
    if not g32.is_cuda and _can_sync() and not bool(ok.all()):
        raise ValueError("g must hold finite log-decays g_t <= 0 (lambda_t = exp(g_t)); got positive or "
                         "non-finite values (pass log(lambda), e.g. F.logsigmoid(x))")
    return torch.where(ok, g32, math.nan).contiguous()


_CHECKED_CU = TensorCache(64)


def _check_cu(cu, B: int, N: int, q: torch.Tensor) -> Optional[torch.Tensor]:
    if cu is None:
        return None
    if B != 1:
        raise ValueError(f"with cu_seqlens, q / k / v hold packed sequences and must have B = 1: (1, H, total, D), "
                         f"got B = {B}")
    # values: once per tensor on CUDA (a sync; skipped under torch.compile / graph capture, where the kernels
    # still cannot read out of bounds: they clamp cu_seqlens into [0, total]), every call on CPU
    validate = _can_sync() and (not cu.is_cuda or _CHECKED_CU.get(cu, N) is None)
    check_cu_seqlens("cu_seqlens", cu, N, q.device, validate=validate)
    if validate:
        _CHECKED_CU.put(cu, True, N)
    return cu if cu.is_contiguous() else cu.contiguous()


def _check_inputs(q, k, v, decay, scale, initial_state, output_final_state, state_name="initial_state",
                  g=None, cu_seqlens=None):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    check_same([("q", q), ("k", k), ("v", v)])
    B, H, N, D = q.shape
    if tuple(k.shape) != (B, H, N, D):
        raise ValueError(f"k must have q's shape (B, H, N, D) = {(B, H, N, D)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, N):
        raise ValueError(f"v must have shape (B, H, N, Dv) with (B, H, N) = {(B, H, N)}, got {tuple(v.shape)}")
    DV = v.shape[3]
    if D > MAX_HEAD_DIM or DV > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={DV}")
    check_bool("output_final_state", output_final_state)
    scale = check_scale(scale, D)
    if g is not None and decay is not None:
        raise ValueError("pass either decay (per-head rates) or g (per-token log-decays), not both")
    rates = _check_decay(decay, H, q)
    gg = _check_g(g, (B, H, N), q)
    cu = _check_cu(cu_seqlens, B, N, q)
    nseq, lead = (B, "B") if cu is None else (cu.numel() - 1, "nseq")
    h0 = _check_state(state_name, initial_state, (nseq, H, D, DV), q, lead)
    return rates, gg, scale, h0, cu


# ----------------------------------------------------------------------------------------------------
# PyTorch path (CPU without the interpreter): the quadratic reference chunk by chunk, differentiable
# ----------------------------------------------------------------------------------------------------
def _torch_chunked(q, k, v, rates, g, scale, h0):
    """float64 (out, final_state), chaining the reference over chunks (O(N * chunk) memory)."""
    outs, state = [], h0
    for t0 in range(0, q.shape[2], _FALLBACK_CHUNK):
        sl = slice(t0, t0 + _FALLBACK_CHUNK)
        o, state = linear_attention_quadratic_ref(q[:, :, sl], k[:, :, sl], v[:, :, sl], rates,
                                                  g=None if g is None else g[:, :, sl], scale=scale,
                                                  initial_state=state, upcast=True)
        outs.append(o)
    if state is None:  # no tokens
        state = torch.zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3], dtype=torch.float64)
    return torch.cat(outs, dim=2) if outs else v.new_zeros(*v.shape, dtype=torch.float64), state


def _torch_path(q, k, v, rates, g, scale, h0, cu):
    """The op's semantics in PyTorch (autograd does the backward); packed sequences one by one."""
    if cu is None:
        o, st = _torch_chunked(q, k, v, rates, g, scale, h0)
    else:
        bounds = cu.tolist()
        parts = [_torch_chunked(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], rates,
                                None if g is None else g[:, :, a:e], scale, None if h0 is None else h0[n:n + 1])
                 for n, (a, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
        o = torch.cat([p[0] for p in parts], dim=2)
        st = torch.cat([p[1] for p in parts], dim=0)
    return o.to(q.dtype), st.float()


def _kernels_only(q: torch.Tensor) -> None:
    if not (q.is_cuda or interpreter_enabled()):
        raise RuntimeError("tileattn::lightning_* ops run the Triton kernels (CUDA, or CPU with TRITON_INTERPRET=1); "
                           "call tileattn.lightning_attention, which has a PyTorch path for CPU tensors")


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile: no graph break) + autograd
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("tileattn::lightning_fwd", mutates_args=())
def _lightning_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor,
                      g: Optional[torch.Tensor], scale: float, initial_state: Optional[torch.Tensor],
                      cu_seqlens: Optional[torch.Tensor], block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    _kernels_only(q)
    from tileattn.kernels.lightning import lightning_fwd

    return lightning_fwd(q, k, v, rates, g, scale, initial_state, cu_seqlens, block_size)


def _nseq(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@_lightning_fwd_op.register_fake
def _(q, k, v, rates, g, scale, initial_state, cu_seqlens, block_size):
    B, H, N, D = q.shape
    DV = v.shape[-1]
    return q.new_empty(B, H, N, DV), q.new_empty(_nseq(q, cu_seqlens), H, D, DV, dtype=torch.float32)


@torch.library.custom_op("tileattn::lightning_bwd", mutates_args=())
def _lightning_bwd_op(do: torch.Tensor, dht: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, rates: torch.Tensor, g: Optional[torch.Tensor], scale: float,
                      initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], block_size: int
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _kernels_only(q)
    do = do.to(q.dtype)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if dht is not None:
        dht = dht.to(torch.float32).contiguous()
    from tileattn.kernels.lightning import lightning_bwd

    dq, dk, dv, dh0, dg = lightning_bwd(do, dht, q, k, v, rates, g, scale, initial_state, cu_seqlens, block_size)
    return dq, dk, dv, dh0, (dg if dg is not None else q.new_empty(0, dtype=torch.float32))


@_lightning_bwd_op.register_fake
def _(do, dht, q, k, v, rates, g, scale, initial_state, cu_seqlens, block_size):
    B, H, N, D = q.shape
    DV = v.shape[-1]
    dg = q.new_empty(B, H, N, dtype=torch.float32) if g is not None else q.new_empty(0, dtype=torch.float32)
    return (q.new_empty(B, H, N, D), q.new_empty(B, H, N, D), q.new_empty(B, H, N, DV),
            q.new_empty(_nseq(q, cu_seqlens), H, D, DV, dtype=torch.float32), dg)


def _setup_context(ctx, inputs, output):
    q, k, v, rates, g, scale, initial_state, cu_seqlens, block_size = inputs
    ctx.save_for_backward(q, k, v, rates, g, initial_state, cu_seqlens)
    ctx.scale, ctx.block_size = scale, block_size
    ctx.has_h0, ctx.has_g = initial_state is not None, g is not None


def _backward(ctx, do, dht):
    q, k, v, rates, g, initial_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dh0, dg = no_double_backward("lightning_attention", *torch.ops.tileattn.lightning_bwd(
        do, dht, q, k, v, rates, g, ctx.scale, initial_state, cu_seqlens, ctx.block_size))
    return (dq, dk, dv, None, (dg if ctx.has_g else None), None, (dh0 if ctx.has_h0 else None), None, None)


torch.library.register_autograd("tileattn::lightning_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("tileattn::lightning_decode", mutates_args=())
def _lightning_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lg: torch.Tensor, scale: float,
                         state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q, _OP):
        from tileattn.kernels.lightning import lightning_decode_step

        return lightning_decode_step(q, k, v, lg, scale, state)
    o, ht = linear_attention_recurrent_ref(q, k, v, g=lg.view(q.shape[0], q.shape[1], 1), scale=scale,
                                           initial_state=state, upcast=True)
    return o.to(q.dtype), ht.float()


@_lightning_decode_op.register_fake
def _(q, k, v, lg, scale, state):
    B, H, _, D = q.shape
    DV = v.shape[-1]
    return q.new_empty(B, H, 1, DV), q.new_empty(B, H, D, DV, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def _fwd_op(q, k, v, rates, g, scale: float, h0, cu, block_size: int):
    """The forward: the custom op (Triton kernels) or, for CPU tensors without the interpreter, the
    differentiable PyTorch path. fp32 inputs with D > FP32_MAX_D run as a sum over D-chunks (exact: the
    output is additive over chunks of the key dim and the state's rows are those chunks) so that only
    spill-free kernel configs launch. Autograd goes through each chunk's op."""
    from tileattn.kernels.lightning import FP32_MAX_D

    if not use_triton(q, _OP):
        return _torch_path(q, k, v, rates, g, scale, h0, cu)
    D = q.shape[-1]
    if q.dtype != torch.float32 or D <= FP32_MAX_D:
        return torch.ops.tileattn.lightning_fwd(q, k, v, rates, g, scale, h0, cu, block_size)
    outs, states = [], []
    for s in range(0, D, FP32_MAX_D):
        e = min(D, s + FP32_MAX_D)
        h = None if h0 is None else h0[:, :, s:e].contiguous()
        o, st = torch.ops.tileattn.lightning_fwd(q[..., s:e], k[..., s:e], v, rates, g, scale, h, cu, block_size)
        outs.append(o)
        states.append(st)
    return sum(outs[1:], outs[0]), torch.cat(states, dim=2)


def _lightning_attention(q, k, v, decay=None, *, g=None, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, block_size: Optional[int] = None):
    """:func:`lightning_attention` with a chunk length (16, 32, 64 or 128; None = default). Internal: the
    tests use it to cover several block sizes."""
    rates, gg, scale, h0, cu = _check_inputs(q, k, v, decay, scale, initial_state, output_final_state, g=g,
                                             cu_seqlens=cu_seqlens)
    if block_size is not None:
        from tileattn.kernels.lightning import BLOCK_SIZES

        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES} or None, got {block_size}")
    out, final_state = _fwd_op(q, k, v, rates, gg, scale, h0, cu, int(block_size or 0))
    return (out, final_state) if output_final_state else out


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Causal linear attention with exponential decay (per head, or per token as in fla's
    ``chunk_simple_gla`` / Mamba-2), chunk-parallel Triton kernels, differentiable, linear in N.

    Per sequence and head: ``S_t = lambda_t S_{t-1} + k_t^T v_t`` (``S_{-1} = initial_state`` or 0) and
    ``o_t = scale * q_t S_t``, with ``lambda_t = exp(-decay[h])`` (per-head rates) or ``exp(g[b, h, t])``
    (per-token log-decays).

    Args:
        q: (B, H, N, D) queries, float16 / bfloat16 / float32, unit stride in the last dim (any other
            strides, e.g. ``x.transpose(1, 2)``, are used without a copy). N >= 1, 1 <= D <= 256.
        k: (B, H, N, D) keys, same dtype and device as q.
        v: (B, H, N, Dv) values, 1 <= Dv <= 256 (Dv may differ from D).
        decay: (H,) rates ``s_h >= 0`` (``lambda_h = exp(-s_h)``; an (H, 1, 1) slope tensor is accepted
            too), any float dtype, or None. Treated as a constant (no gradient). See
            :func:`lightning_decay_rates` (OpenNLPLab / TransNormerLLM) and :func:`fla_lightning_decay_rates`.
        g: (B, H, N) per-token log-decays ``g_t <= 0`` (finite), ``lambda_t = exp(g_t)``, e.g.
            ``F.logsigmoid(x)``; any float dtype, used in float32. Receives a gradient. Exclusive with
            ``decay``; ``decay = s`` equals ``g = -s[h]`` for every token. On CPU bad values raise; on CUDA
            (no host sync) they turn the affected heads' outputs into NaN.
        scale: multiplies the output; default ``1 / sqrt(D)``. Pass 1.0 for the Lightning Attention /
            TransNormerLLM convention (which normalises the output afterwards).
        initial_state: (B, H, D, Dv) float32 state ``S_{-1}`` ((nseq, H, D, Dv) with ``cu_seqlens``), e.g.
            the ``final_state`` of a previous call on the preceding tokens, or None for zeros. Receives a
            gradient.
        output_final_state: also return the state after the last token (of each sequence).
        cu_seqlens: packed sequences (FlashAttention varlen convention): int32 (nseq + 1,) with
            ``cu_seqlens[0] = 0``, non-decreasing, last entry ``total``; q / k / v are (1, H, total, .), g
            (1, H, total), and sequence ``n`` is rows ``cu_seqlens[n]:cu_seqlens[n+1]``, with its own
            initial / final state. Values are checked once per tensor (a sync on CUDA; skipped under
            torch.compile / CUDA-graph capture, where the kernels clamp them so nothing is read out of bounds).

    Returns:
        out (B, H, N, Dv) in q's dtype; with ``output_final_state`` also ``final_state`` (B or nseq, H, D,
        Dv) float32 (differentiable), so that ``lightning_attention(x[:n]) -> state`` followed by
        ``lightning_attention(x[n:], initial_state=state)`` equals one call on ``x``.

    CUDA tensors and CPU tensors under ``TRITON_INTERPRET=1`` run the Triton kernels; other CPU tensors
    run a PyTorch reference path (float64, chunked) and warn once. Registered as the custom ops
    ``tileattn::lightning_fwd`` / ``tileattn::lightning_bwd`` (``torch.compile(fullgraph=True)`` works).
    """
    return _lightning_attention(q, k, v, decay, g=g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Optional[torch.Tensor] = None,
    decay: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One generation step of :func:`lightning_attention`: O(D * Dv) work per token and head.

    ``S' = lambda S + k^T v``, ``out = scale * q S'``. Runs a dedicated small kernel (elementwise fp32
    update, no chunk padding) and returns a new state; ``state`` is not modified. When autograd needs a
    gradient (grad mode on and an input requires grad) it runs ``lightning_attention`` with N = 1 instead
    (same result, differentiable).

    Args:
        q: (B, H, 1, D) query of the new token (float16 / bfloat16 / float32, unit last stride).
        k: (B, H, 1, D) key of the new token.
        v: (B, H, 1, Dv) value of the new token.
        state: (B, H, D, Dv) float32 state after the previous tokens (the ``final_state`` of
            :func:`lightning_attention` on the prompt, of a packed prefill with ``cu_seqlens`` (one row per
            sequence), or of the previous step), or None for zeros.
        decay: (H,) rates as for :func:`lightning_attention`, or None.
        g: (B, H, 1) log-decay of this token (as for :func:`lightning_attention`), exclusive with decay.
        scale: as for :func:`lightning_attention` (default ``1 / sqrt(D)``).

    Returns:
        ``(out, new_state)``: out (B, H, 1, Dv) in q's dtype, new_state (B, H, D, Dv) float32.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] != 1:
            raise ValueError(f"lightning_decode takes one token: {name} must have N = 1 in (B, H, N, D), got "
                             f"shape {tuple(x.shape)}; use lightning_attention for a prompt")
    rates, gg, scale, h0, _ = _check_inputs(q, k, v, decay, scale, state, True, state_name="state", g=g)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, state, g))
    if needs_grad:
        return _fwd_op(q, k, v, rates, gg, scale, h0, None, 0)
    B, H = q.shape[:2]
    lg = (gg.reshape(B * H) if gg is not None else (-rates).repeat(B)).contiguous()
    return torch.ops.tileattn.lightning_decode(q, k, v, lg, scale, h0)


# ----------------------------------------------------------------------------------------------------
# nn.Module
# ----------------------------------------------------------------------------------------------------
class LightningAttention(nn.Module):
    """TransNormerLLM-style lightning attention layer (token mixer) around :func:`lightning_attention`.

    ``x`` (B, N, embed_dim) ->
    ``q = silu(x Wq)``, ``k = silu(x Wk)``, ``v = x Wv`` split into ``num_heads`` heads of ``head_dim``;
    ``o = lightning_attention(q, k, v, rates, scale=1.0)`` (causal, decay rates from
    :func:`lightning_decay_rates` for ``layer_idx`` / ``num_layers``); ``o = rms_norm(o)`` over all heads
    (TransNormerLLM's SimpleRMSNorm, no weight); with ``output_gate`` ``o = o * (x Wu)``; ``y = o Wo``.

    Args:
        embed_dim: model width E.
        num_heads: H.
        head_dim: per-head width (default ``embed_dim // num_heads``); q, k, v each have H * head_dim.
        bias: bias in the projections.
        layer_idx, num_layers: select the per-layer decay scaling (see :func:`lightning_decay_rates`).
        use_decay: False gives plain causal linear attention (no decay).
        output_gate: TransNormerLLM's output gate ``u = x Wu``.
        norm_eps: epsilon of the RMS norm.
        device, dtype: for the parameters. The decay-rate buffer always stays float32.

    ``forward(x, *, initial_state=None, output_final_state=False)``: ``initial_state`` (B, H, head_dim,
    head_dim) float32 carries the recurrent state across calls (prompt, then one token at a time); a call
    with N = 1 and a state runs :func:`lightning_decode`. Returns y (B, N, embed_dim), plus the final state
    with ``output_final_state``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, head_dim: Optional[int] = None, bias: bool = False,
                 layer_idx: int = 0, num_layers: int = 1, use_decay: bool = True, output_gate: bool = True,
                 norm_eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1:
            raise ValueError(f"embed_dim and num_heads must be >= 1, got {embed_dim}, {num_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = embed_dim // num_heads
        if not 1 <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.norm_eps = norm_eps
        inner = num_heads * head_dim
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, inner, **kw)
        self.k_proj = nn.Linear(embed_dim, inner, **kw)
        self.v_proj = nn.Linear(embed_dim, inner, **kw)
        self.u_proj = nn.Linear(embed_dim, inner, **kw) if output_gate else None
        self.out_proj = nn.Linear(inner, embed_dim, **kw)
        rates = lightning_decay_rates(num_heads, layer_idx=layer_idx, num_layers=num_layers, device=device)
        self.register_buffer("decay", rates if use_decay else None, persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the rates buffer in float32 when the module is cast to a low-precision dtype
        rates = self.decay
        super()._apply(fn, recurse)
        if rates is not None and self.decay.dtype != torch.float32:
            self.decay = rates.to(device=self.decay.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor, *, initial_state: Optional[torch.Tensor] = None,
                output_final_state: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be a (B, N, {self.embed_dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B, N, _ = x.shape
        H, hd = self.num_heads, self.head_dim

        def heads(t):  # (B, N, H*hd) -> (B, H, N, hd) view, no copy
            return t.view(B, N, H, hd).transpose(1, 2)

        q = heads(F.silu(self.q_proj(x)))
        k = heads(F.silu(self.k_proj(x)))
        v = heads(self.v_proj(x))
        if N == 1 and initial_state is not None:
            o, state = lightning_decode(q, k, v, initial_state, self.decay, scale=1.0)
        else:
            o, state = lightning_attention(q, k, v, self.decay, scale=1.0, initial_state=initial_state,
                                           output_final_state=True)
        o = o.transpose(1, 2).reshape(B, N, H * hd)
        o = F.rms_norm(o.float(), (H * hd,), eps=self.norm_eps).to(x.dtype)
        if self.u_proj is not None:
            o = o * self.u_proj(x)
        y = self.out_proj(o)
        return (y, state) if output_final_state else y

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"decay={'off' if self.decay is None else 'on'}")
