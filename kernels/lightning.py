"""Lightning attention (causal linear attention with per-head decay): Triton kernels and thin launchers.

Semantics (per batch and head, rate ``s >= 0``, ``lambda = exp(-s)``)::

    S_t = lambda * S_{t-1} + k_t^T v_t        (S: D x Dv, S_{-1} = h0 or 0)
    o_t = scale * q_t S_t

Block decomposition as in Lightning Attention-2 (Qin et al., 2024, arXiv:2401.04658). The sequence is cut
into chunks of ``BT`` rows; inside a chunk (local rows ``i, j``, ``L`` = valid rows, ``S`` = the running
state at the end of the previous chunk)::

    O   = scale * [((Q K^T) * M) V  +  (lambda^(i+1) * Q) S]        M[i, j] = lambda^(i-j) if i >= j else 0
    S' = lambda^L S + (lambda^(L-1-j) * K)^T V

Every decay factor is ``exp2(-s * log2(e) * n)`` with ``n >= 0`` (exponents are never positive, so large
``s * BT`` underflows to 0 instead of overflowing, and there is no ``0 * inf``). The state is kept in fp32;
dot operands are rounded to the input dtype (tensor cores on GPU; fp32 inputs use TF32 dots). For fp16 the
state is scaled by a power of two before its dots (``_state_mm``) so it cannot overflow fp16's range.

Kernels (each program owns one (batch, head) and loops over the chunks sequentially, so the work is
``B * H * cdiv(N, BT)`` chunk steps: linear in N):

- ``_lightning_fwd_kernel``   grid (cdiv(Dv, BV), H, B): output slice [:, BV] with the state slice [D, BV].
- ``_lightning_bwd_dq_kernel`` grid (cdiv(D, BK), H, B): forward sweep, dq slice [:, BK], state [BK, Dv].
- ``_lightning_bwd_dk_kernel`` grid (cdiv(D, BK), H, B): reverse sweep, dk slice [:, BK], dstate [BK, Dv].
- ``_lightning_bwd_dv_kernel`` grid (cdiv(Dv, BV), H, B): reverse sweep, dv slice [:, BV], dstate [D, BV],
  and the initial-state gradient dh0 (the reverse state after the first chunk).
- ``_lightning_decode_kernel`` grid (cdiv(Dv, BV), H, B): one token, ``S' = lambda S + k^T v``,
  ``o = scale q S'`` (elementwise, fp32; no chunk padding).

No atomics: every output element is written by exactly one program, so results are bitwise reproducible.
"""
from __future__ import annotations

import math

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import KernelSpec, alloc, interpreter_enabled, next_pow2, on_tensor_device, ptr_type

LOG2E = 1.4426950408889634

BLOCK_SIZES = (16, 32, 64, 128)  # chunk lengths the launchers accept


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """fp32-accumulated ``a @ b``; operands already in the input dtype. Under the interpreter they are
    upcast first (its bf16 ``tl.dot`` multiplies raw bits, triton#11584); the rounding to the input dtype
    has already happened, so the interpreter sees the same operand values as the GPU."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _state_mm(a, b_h, DT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``a @ b_h`` for an fp32 state tile ``b_h`` and ``a`` in the 16-bit input dtype ``DT``, safe
    for any state magnitude: the state is scaled by a power of two (exact) so that its largest entry lies in
    [1, 2), rounded to ``DT`` for the tensor-core dot, and the product is scaled back in fp32. Used for
    fp16, whose range (65504) a long undecayed state can exceed (bf16 has fp32's range)."""
    b_e = tl.floor(tl.log2(tl.maximum(tl.max(tl.max(tl.abs(b_h), axis=1), axis=0), 1e-30)))
    return _mm(a, (b_h * tl.exp2(-b_e)).to(DT), DOT_F32, PREC) * tl.exp2(b_e)


@triton.jit
def _decay_mask(b_s, BT: tl.constexpr, TRANS: tl.constexpr):
    """Intra-chunk decay mask, ``b_s`` = rate * log2(e) (fp32 scalar, >= 0): M[i, j] = lambda^(i-j) for
    i >= j else 0 [BT, BT], or its transpose with ``TRANS``. Exponents are clamped to <= 0."""
    o_i = tl.arange(0, BT)
    if TRANS:
        d_ij = (o_i[None, :] - o_i[:, None]).to(tl.float32)  # [BT, BT]
    else:
        d_ij = (o_i[:, None] - o_i[None, :]).to(tl.float32)  # [BT, BT]
    return tl.where(d_ij >= 0, tl.exp2(-b_s * tl.maximum(d_ij, 0.0)), 0.0)


@triton.jit
def _decay_chunk(b_s, L, BT: tl.constexpr):
    """For a chunk of ``L`` valid rows: key decay lambda^(L-1-j) [BT] (exponent clamped to <= 0 on padded
    rows, which are zero anyway) and the chunk decay lambda^L."""
    o_i = tl.arange(0, BT)
    b_kdec = tl.exp2(-b_s * tl.maximum(L - 1 - o_i, 0).to(tl.float32))  # [BT]
    b_ldec = tl.exp2(-b_s * L.to(tl.float32))
    return b_kdec, b_ldec


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _lightning_fwd_kernel(
    q, k, v, s, h0, o, ht,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    scale, H, N, D, DV, NT,
    USE_H0: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    SCALED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = o.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    b_s = tl.load(s + i_h).to(tl.float32) * 1.4426950408889634

    p_q0 = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k0 = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v0 = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_o0 = o + i_bh.to(tl.int64) * N * DV  # o is contiguous (B, H, N, Dv)
    p_s0 = i_bh.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]  # [BD, BV] state offsets
    m_dv = m_d[:, None] & m_v[None, :]

    b_h = tl.zeros([BD, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + p_s0, mask=m_dv, other=0.0).to(tl.float32)

    b_m = _decay_mask(b_s, BT, False)  # [BT, BT]
    b_qdec = tl.exp2(-b_s * (o_t + 1).to(tl.float32))  # [BT] lambda^(i+1)
    for i_t in range(NT):
        t0 = i_t * BT
        L = tl.minimum(N - t0, BT)
        m_t = o_t < L
        b_kdec, b_ldec = _decay_chunk(b_s, L, BT)
        p_q = p_q0 + t0.to(tl.int64) * stride_qn + o_t[:, None] * stride_qn + o_d[None, :]
        p_k = p_k0 + t0.to(tl.int64) * stride_kn + o_t[:, None] * stride_kn + o_d[None, :]
        p_v = p_v0 + t0.to(tl.int64) * stride_vn + o_t[:, None] * stride_vn + o_v[None, :]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        b_k = tl.load(p_k, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BT, BV]
        # intra-chunk: ((Q K^T) * M) V
        b_qk = _mm(b_q, tl.trans(b_k), DOT_F32, PREC) * b_m  # [BT, BT]
        b_o = _mm(b_qk.to(DT), b_v, DOT_F32, PREC)  # [BT, BV]
        # inter-chunk: (lambda^(i+1) Q) S
        if SCALED:
            b_o += _state_mm(b_q, b_h, DT, DOT_F32, PREC) * b_qdec[:, None]  # [BT, BV]
        else:
            b_o += _mm((b_q * b_qdec[:, None]).to(DT), b_h.to(DT), DOT_F32, PREC)  # [BT, BV]
        p_o = p_o0 + (t0 + o_t[:, None]).to(tl.int64) * DV + o_v[None, :]
        tl.store(p_o, (b_o * scale).to(DT), mask=m_t[:, None] & m_v[None, :])
        # state: S' = lambda^L S + (lambda^(L-1-j) K)^T V
        b_h = b_h * b_ldec + _mm(tl.trans((b_k * b_kdec[:, None]).to(DT)), b_v, DOT_F32, PREC)  # [BD, BV]

    tl.store(ht + p_s0, b_h, mask=m_dv)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _lightning_bwd_dq_kernel(
    k, v, do, s, h0, dq,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    scale, H, N, D, DV, NT,
    USE_H0: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
    SCALED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    # dq_t = scale * dO_t S_t^T: forward sweep over the state rows [BK] (all Dv columns)
    i_k, i_bh = tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = dq.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BDV)
    m_k = o_k < D
    m_v = o_v < DV
    b_s = tl.load(s + i_h).to(tl.float32) * 1.4426950408889634

    p_k0 = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v0 = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_do0 = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_dq0 = dq + i_bh.to(tl.int64) * N * D  # dq is contiguous (B, H, N, D)

    b_h = tl.zeros([BK, BDV], dtype=tl.float32)
    if USE_H0:
        p_h0 = h0 + i_bh.to(tl.int64) * D * DV + o_k[:, None] * DV + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)

    b_m = _decay_mask(b_s, BT, False)  # [BT, BT]
    b_qdec = tl.exp2(-b_s * (o_t + 1).to(tl.float32))  # [BT] lambda^(i+1)
    for i_t in range(NT):
        t0 = i_t * BT
        L = tl.minimum(N - t0, BT)
        m_t = o_t < L
        b_kdec, b_ldec = _decay_chunk(b_s, L, BT)
        p_k = p_k0 + t0.to(tl.int64) * stride_kn + o_t[:, None] * stride_kn + o_k[None, :]
        p_v = p_v0 + t0.to(tl.int64) * stride_vn + o_t[:, None] * stride_vn + o_v[None, :]
        p_do = p_do0 + t0.to(tl.int64) * stride_on + o_t[:, None] * stride_on + o_v[None, :]
        b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BT, BDV]
        b_do = tl.load(p_do, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DT)  # [BT, BDV]
        # intra: ((dO V^T) * M) K
        b_dov = _mm(b_do, tl.trans(b_v), DOT_F32, PREC) * b_m  # [BT, BT]
        b_dq = _mm(b_dov.to(DT), b_k, DOT_F32, PREC)  # [BT, BK]
        # inter: (lambda^(i+1) dO) S^T
        if SCALED:
            b_dq += _state_mm(b_do, tl.trans(b_h), DT, DOT_F32, PREC) * b_qdec[:, None]  # [BT, BK]
        else:
            b_dq += _mm((b_do * b_qdec[:, None]).to(DT), tl.trans(b_h.to(DT)), DOT_F32, PREC)  # [BT, BK]
        p_dq = p_dq0 + (t0 + o_t[:, None]).to(tl.int64) * D + o_k[None, :]
        tl.store(p_dq, (b_dq * scale).to(DT), mask=m_t[:, None] & m_k[None, :])
        b_h = b_h * b_ldec + _mm(tl.trans((b_k * b_kdec[:, None]).to(DT)), b_v, DOT_F32, PREC)  # [BK, BDV]


@triton.jit
def _lightning_bwd_dk_kernel(
    q, v, do, s, dht, dk,
    stride_qb, stride_qh, stride_qn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    scale, H, N, D, DV, NT,
    USE_DHT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
    SCALED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    # dk_j = v_j G_j^T with G_j = dLoss/dS_j: reverse sweep over the dstate rows [BK] (all Dv columns).
    i_k, i_bh = tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = dk.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BDV)
    m_k = o_k < D
    m_v = o_v < DV
    b_s = tl.load(s + i_h).to(tl.float32) * 1.4426950408889634

    p_q0 = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_v0 = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_do0 = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_dk0 = dk + i_bh.to(tl.int64) * N * D  # dk is contiguous (B, H, N, D)

    # G at the end of the current chunk; starts as dLoss/dS_{N-1} from the final state
    b_g = tl.zeros([BK, BDV], dtype=tl.float32)
    if USE_DHT:
        p_dht = dht + i_bh.to(tl.int64) * D * DV + o_k[:, None] * DV + o_v[None, :]
        b_g += tl.load(p_dht, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)

    b_mt = _decay_mask(b_s, BT, True)  # [BT, BT] M^T
    b_qdec = tl.exp2(-b_s * (o_t + 1).to(tl.float32))  # [BT] lambda^(i+1)
    for i_r in range(NT):
        t0 = (NT - 1 - i_r) * BT
        L = tl.minimum(N - t0, BT)
        m_t = o_t < L
        b_kdec, b_ldec = _decay_chunk(b_s, L, BT)
        p_q = p_q0 + t0.to(tl.int64) * stride_qn + o_t[:, None] * stride_qn + o_k[None, :]
        p_v = p_v0 + t0.to(tl.int64) * stride_vn + o_t[:, None] * stride_vn + o_v[None, :]
        p_do = p_do0 + t0.to(tl.int64) * stride_on + o_t[:, None] * stride_on + o_v[None, :]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BT, BDV]
        b_do = tl.load(p_do, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DT)  # [BT, BDV]
        # intra: scale * ((V dO^T) * M^T) Q
        b_vdo = _mm(b_v, tl.trans(b_do), DOT_F32, PREC) * b_mt  # [BT, BT]
        b_dk = _mm(b_vdo.to(DT), b_q, DOT_F32, PREC) * scale  # [BT, BK]
        # inter: (lambda^(L-1-j) V) G^T
        if SCALED:
            b_dk += _state_mm(b_v, tl.trans(b_g), DT, DOT_F32, PREC) * b_kdec[:, None]  # [BT, BK]
        else:
            b_dk += _mm((b_v * b_kdec[:, None]).to(DT), tl.trans(b_g.to(DT)), DOT_F32, PREC)  # [BT, BK]
        p_dk = p_dk0 + (t0 + o_t[:, None]).to(tl.int64) * D + o_k[None, :]
        tl.store(p_dk, b_dk.to(DT), mask=m_t[:, None] & m_k[None, :])
        # G <- lambda^L G + scale * (lambda^(i+1) Q)^T dO
        b_g = b_g * b_ldec + _mm(tl.trans((b_q * b_qdec[:, None]).to(DT)), b_do, DOT_F32, PREC) * scale


@triton.jit
def _lightning_bwd_dv_kernel(
    q, k, do, s, dht, dv, dh0,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on,
    scale, H, N, D, DV, NT,
    USE_DHT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    SCALED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    # dv_j = k_j G_j: reverse sweep over the dstate columns [BV] (all D rows); dh0 = G after chunk 0
    i_v, i_bh = tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = dv.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    b_s = tl.load(s + i_h).to(tl.float32) * 1.4426950408889634

    p_q0 = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k0 = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_do0 = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_dv0 = dv + i_bh.to(tl.int64) * N * DV  # dv is contiguous (B, H, N, Dv)
    p_s0 = i_bh.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]  # [BD, BV] state offsets
    m_dv = m_d[:, None] & m_v[None, :]

    b_g = tl.zeros([BD, BV], dtype=tl.float32)
    if USE_DHT:
        b_g += tl.load(dht + p_s0, mask=m_dv, other=0.0).to(tl.float32)

    b_mt = _decay_mask(b_s, BT, True)  # [BT, BT] M^T
    b_qdec = tl.exp2(-b_s * (o_t + 1).to(tl.float32))  # [BT] lambda^(i+1)
    for i_r in range(NT):
        t0 = (NT - 1 - i_r) * BT
        L = tl.minimum(N - t0, BT)
        m_t = o_t < L
        b_kdec, b_ldec = _decay_chunk(b_s, L, BT)
        p_q = p_q0 + t0.to(tl.int64) * stride_qn + o_t[:, None] * stride_qn + o_d[None, :]
        p_k = p_k0 + t0.to(tl.int64) * stride_kn + o_t[:, None] * stride_kn + o_d[None, :]
        p_do = p_do0 + t0.to(tl.int64) * stride_on + o_t[:, None] * stride_on + o_v[None, :]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        b_k = tl.load(p_k, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        b_do = tl.load(p_do, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DT)  # [BT, BV]
        # intra: scale * ((K Q^T) * M^T) dO
        b_kq = _mm(b_k, tl.trans(b_q), DOT_F32, PREC) * b_mt  # [BT, BT]
        b_dv = _mm(b_kq.to(DT), b_do, DOT_F32, PREC) * scale  # [BT, BV]
        # inter: (lambda^(L-1-j) K) G
        if SCALED:
            b_dv += _state_mm(b_k, b_g, DT, DOT_F32, PREC) * b_kdec[:, None]  # [BT, BV]
        else:
            b_dv += _mm((b_k * b_kdec[:, None]).to(DT), b_g.to(DT), DOT_F32, PREC)  # [BT, BV]
        p_dv = p_dv0 + (t0 + o_t[:, None]).to(tl.int64) * DV + o_v[None, :]
        tl.store(p_dv, b_dv.to(DT), mask=m_t[:, None] & m_v[None, :])
        b_g = b_g * b_ldec + _mm(tl.trans((b_q * b_qdec[:, None]).to(DT)), b_do, DOT_F32, PREC) * scale

    tl.store(dh0 + p_s0, b_g, mask=m_dv)


# ----------------------------------------------------------------------------------------------------
# Decode (one token)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _lightning_decode_kernel(
    q, k, v, s, h0, o, ht,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    scale, H, D, DV,
    USE_H0: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    m_dv = m_d[:, None] & m_v[None, :]
    b_lam = tl.exp2(-tl.load(s + i_h).to(tl.float32) * 1.4426950408889634)
    b_q = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + o_d, mask=m_d, other=0.0)
    b_k = tl.load(k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh + o_d, mask=m_d, other=0.0)
    b_v = tl.load(v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh + o_v, mask=m_v, other=0.0)
    p_s = i_bh.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]
    b_h = tl.zeros([BD, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + p_s, mask=m_dv, other=0.0).to(tl.float32)
    b_h = b_h * b_lam + b_k.to(tl.float32)[:, None] * b_v.to(tl.float32)[None, :]  # [BD, BV]
    b_o = tl.sum(b_q.to(tl.float32)[:, None] * b_h, axis=0) * scale  # [BV]
    tl.store(o + i_bh.to(tl.int64) * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + p_s, b_h, mask=m_dv)


# ----------------------------------------------------------------------------------------------------
# Launch plans (shared by the launchers, the work counter and aot_specs)
# ----------------------------------------------------------------------------------------------------
class Plan(NamedTuple):
    BT: int  # chunk length
    BD: int  # padded D
    BDV: int  # padded Dv
    BV: int  # Dv slice of the fwd / dv programs (state tile [BD, BV])
    BK: int  # D slice of the dq / dk programs (state tile [BK, BDV])
    DEC_BV: int  # Dv slice of the decode programs
    num_warps: int
    num_stages: int
    prec: str  # tl.dot input_precision
    scaled: bool  # power-of-two scaling of the state before its 16-bit dots


def plan(D: int, DV: int, dtype: torch.dtype, block_size: Optional[int] = None) -> Plan:
    """Tile sizes for head dims (D, Dv) and an input dtype; ``block_size`` overrides the chunk length.

    bf16: state tiles up to 8192 fp32 elements, chunk 64 for padded head dims <= 64, else 32; the fwd / dv
    slice ``BV`` is at most 32 for padded D >= 128.
    fp16 (scaled state dots): state tiles up to 4096 elements, chunk 32 for head dims <= 128, else 16; the
    fwd / dv tile ``[BD, BV]`` is at most 2048 elements at chunk >= 32.
    fp32 (TF32 dots): state tiles up to 2048 elements, chunk 32 for head dims <= 128, else 16.
    8 warps, 2 stages. Every default config compiles for sm_80 / sm_90 without spills under Triton 3.6 and
    3.9 (see aot_specs): Triton 3.6 (ptxas 12.8) spills the fwd / dv kernels at bf16 [BD, BV] = [128, 64]
    and fp16 [64, 64] / [128, 32] with chunk 32, hence the narrower fwd / dv slices there (more programs;
    the dq / dk slices keep the full cap)."""
    BD, BDV = next_pow2(D), next_pow2(DV)
    wide = max(BD, BDV)
    if dtype == torch.float32:
        cap, BT = 2048, (32 if wide <= 128 else 16)
    elif dtype == torch.float16:
        cap, BT = 4096, (32 if wide <= 128 else 16)
    else:
        cap, BT = 8192, (64 if wide <= 64 else 32)
    if block_size:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES} (or None for the default), got {block_size}")
        BT = int(block_size)
    vcap = cap // 2 if dtype == torch.float16 and BT >= 32 else cap  # fwd / dv tile [BD, BV]
    BV = min(BDV, 64, max(16, vcap // BD))
    if dtype == torch.bfloat16 and BD >= 128:
        BV = min(BV, 32)
    BK = min(BD, 64, max(16, cap // BDV))
    DEC_BV = min(BDV, max(16, 4096 // BD))
    prec = "tf32"  # fp32 inputs: TF32 tensor cores (fp32 accumulate); ignored for 16-bit operands
    warps = 8
    return Plan(BT, BD, BDV, BV, BK, DEC_BV, warps, 2, prec, dtype == torch.float16)


def lightning_work(N: int, D: int, DV: int, *, B: int = 1, H: int = 1, dtype: torch.dtype = torch.float16,
                   block_size: Optional[int] = None) -> Dict[str, Tuple[int, int]]:
    """Work of one forward and one backward as ``{kernel: (programs, chunk-loop trips per program)}``.
    Every trip does tile work of a fixed size (independent of N), so programs x trips is linear in N.
    The launchers record the same numbers for what they actually launched in :data:`LAST_LAUNCH`."""
    p = plan(D, DV, dtype, block_size)
    NT = triton.cdiv(N, p.BT)
    nv, nk = triton.cdiv(DV, p.BV), triton.cdiv(D, p.BK)
    return {"fwd": (nv * B * H, NT), "bwd_dq": (nk * B * H, NT), "bwd_dk": (nk * B * H, NT),
            "bwd_dv": (nv * B * H, NT)}


#: what the launchers last launched: kernel name -> (programs, chunk-loop trips per program)
LAST_LAUNCH: Dict[str, Tuple[int, int]] = {}


def _record(name: str, grid: Tuple[int, ...], trips: int) -> None:
    LAST_LAUNCH[name] = (int(math.prod(grid)), int(trips))


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
@on_tensor_device
def lightning_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor, scale: float,
                  h0: Optional[torch.Tensor], block_size: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, D), v (B, H, N, Dv) with unit last stride; rates (H,) fp32 contiguous;
    h0 (B, H, D, Dv) fp32 contiguous or None. Returns out (B, H, N, Dv) in q.dtype (contiguous) and the
    final state (B, H, D, Dv) fp32."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    p = plan(D, DV, q.dtype, block_size)
    o = alloc(B, H, N, DV, device=q.device, dtype=q.dtype)
    ht = alloc(B, H, D, DV, device=q.device, dtype=torch.float32)
    NT = triton.cdiv(N, p.BT)
    grid = (triton.cdiv(DV, p.BV), H, B)
    _lightning_fwd_kernel[grid](
        q, k, v, rates, h0 if h0 is not None else ht, o, ht,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        float(scale), H, N, D, DV, NT,
        USE_H0=h0 is not None, BT=p.BT, BD=p.BD, BV=p.BV, SCALED=p.scaled, DOT_F32=interpreter_enabled(), PREC=p.prec,
        num_warps=p.num_warps, num_stages=p.num_stages,
    )
    _record("fwd", grid, NT)
    return o, ht


@on_tensor_device
def lightning_bwd(do: torch.Tensor, dht: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, rates: torch.Tensor, scale: float, h0: Optional[torch.Tensor],
                  block_size: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`lightning_fwd`. do (B, H, N, Dv) unit last stride, dht (B, H, D, Dv) fp32
    contiguous or None. Returns dq, dk, dv (contiguous, input dtype) and dh0 (B, H, D, Dv) fp32."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    p = plan(D, DV, q.dtype, block_size)
    NT = triton.cdiv(N, p.BT)
    dev, dt = q.device, q.dtype
    dq = alloc(B, H, N, D, device=dev, dtype=dt)
    dk = alloc(B, H, N, D, device=dev, dtype=dt)
    dv = alloc(B, H, N, DV, device=dev, dtype=dt)
    dh0 = alloc(B, H, D, DV, device=dev, dtype=torch.float32)
    opts = dict(SCALED=p.scaled, DOT_F32=interpreter_enabled(), PREC=p.prec, num_warps=p.num_warps,
                num_stages=p.num_stages)
    so = (do.stride(0), do.stride(1), do.stride(2))
    sq = (q.stride(0), q.stride(1), q.stride(2))
    sk = (k.stride(0), k.stride(1), k.stride(2))
    sv = (v.stride(0), v.stride(1), v.stride(2))

    grid_k = (triton.cdiv(D, p.BK), H, B)
    _lightning_bwd_dq_kernel[grid_k](
        k, v, do, rates, h0 if h0 is not None else dh0, dq, *sk, *sv, *so,
        float(scale), H, N, D, DV, NT, USE_H0=h0 is not None, BT=p.BT, BK=p.BK, BDV=p.BDV, **opts,
    )
    _record("bwd_dq", grid_k, NT)
    _lightning_bwd_dk_kernel[grid_k](
        q, v, do, rates, dht if dht is not None else dh0, dk, *sq, *sv, *so,
        float(scale), H, N, D, DV, NT, USE_DHT=dht is not None, BT=p.BT, BK=p.BK, BDV=p.BDV, **opts,
    )
    _record("bwd_dk", grid_k, NT)
    grid_v = (triton.cdiv(DV, p.BV), H, B)
    _lightning_bwd_dv_kernel[grid_v](
        q, k, do, rates, dht if dht is not None else dh0, dv, dh0, *sq, *sk, *so,
        float(scale), H, N, D, DV, NT, USE_DHT=dht is not None, BT=p.BT, BD=p.BD, BV=p.BV, **opts,
    )
    _record("bwd_dv", grid_v, NT)
    return dq, dk, dv, dh0


@on_tensor_device
def lightning_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor,
                          scale: float, h0: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k (B, H, 1, D), v (B, H, 1, Dv) with unit last stride, h0 (B, H, D, Dv) fp32
    contiguous or None. Returns out (B, H, 1, Dv) in q.dtype and the new state (B, H, D, Dv) fp32."""
    B, H, _, D = q.shape
    DV = v.shape[-1]
    p = plan(D, DV, q.dtype)
    o = alloc(B, H, 1, DV, device=q.device, dtype=q.dtype)
    ht = alloc(B, H, D, DV, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(DV, p.DEC_BV), H, B)
    _lightning_decode_kernel[grid](
        q, k, v, rates, h0 if h0 is not None else ht, o, ht,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        float(scale), H, D, DV, USE_H0=h0 is not None, BD=p.BD, BV=p.DEC_BV, num_warps=4, num_stages=1,
    )
    _record("decode", grid, 1)
    return o, ht


# ----------------------------------------------------------------------------------------------------
# AOT descriptions of the shipped configs
# ----------------------------------------------------------------------------------------------------
# (D, Dv) pairs covering every padded-dim regime of ``plan`` (16-bit: <= 64 / <= 256 wide; fp32: <= 128 /
# 256 wide), square and rectangular. Other dims pad to one of these tile shapes or a smaller one.
_AOT_DIMS = {
    "16bit": ((16, 16), (64, 64), (128, 128), (256, 256), (64, 256), (256, 64)),
    "fp32": ((64, 64), (128, 128), (256, 256), (64, 256), (128, 256), (256, 64)),
}
# fp32 chunk kernels with D > 128 spill; the op splits D into chunks of at most this (exact: the output
# is a sum over D-chunks and the state's rows are the D-chunks). The decode kernel takes any D.
FP32_MAX_D = 128


def _stride_names(*tensors: str) -> Dict[str, str]:
    return {f"stride_{t}{x}": "i32" for t in tensors for x in "bhn"}


def aot_specs() -> List[KernelSpec]:
    """The five kernels at the default plan for fp16 / bf16 / fp32 over ``_AOT_DIMS`` (USE_H0 / USE_DHT
    on: the heavier variant). Pointers, strides and D / Dv are declared multiples of 16 (what the JIT
    specialises at run time for contiguous inputs with head dims that are multiples of 16)."""
    specs: List[KernelSpec] = []
    cases = [(dt, d, dv) for dt in (torch.float16, torch.bfloat16) for d, dv in _AOT_DIMS["16bit"]]
    cases += [(torch.float32, d, dv) for d, dv in _AOT_DIMS["fp32"]]
    scal = {"scale": "fp32", "H": "i32", "N": "i32", "D": "i32", "DV": "i32", "NT": "i32"}
    for dt, D, DV in cases:
        p = plan(D, DV, dt)
        pt, pf = ptr_type(dt), "*fp32"
        tag = f"{str(dt).split('.')[-1]}_d{D}_dv{DV}_bt{p.BT}"
        tags = {"dtype": str(dt).split(".")[-1], "D": D, "DV": DV, "BT": p.BT}
        flags = {"SCALED": p.scaled, "DOT_F32": False, "PREC": p.prec}
        kernels = [
            ("fwd", _lightning_fwd_kernel,
             {"q": pt, "k": pt, "v": pt, "s": pf, "h0": pf, "o": pt, "ht": pf, **_stride_names("q", "k", "v")},
             {"USE_H0": True, "BT": p.BT, "BD": p.BD, "BV": p.BV}),
            ("bwd_dq", _lightning_bwd_dq_kernel,
             {"k": pt, "v": pt, "do": pt, "s": pf, "h0": pf, "dq": pt, **_stride_names("k", "v", "o")},
             {"USE_H0": True, "BT": p.BT, "BK": p.BK, "BDV": p.BDV}),
            ("bwd_dk", _lightning_bwd_dk_kernel,
             {"q": pt, "v": pt, "do": pt, "s": pf, "dht": pf, "dk": pt, **_stride_names("q", "v", "o")},
             {"USE_DHT": True, "BT": p.BT, "BK": p.BK, "BDV": p.BDV}),
            ("bwd_dv", _lightning_bwd_dv_kernel,
             {"q": pt, "k": pt, "do": pt, "s": pf, "dht": pf, "dv": pt, "dh0": pf, **_stride_names("q", "k", "o")},
             {"USE_DHT": True, "BT": p.BT, "BD": p.BD, "BV": p.BV}),
        ]
        if dt == torch.float32 and D > FP32_MAX_D:
            kernels = []  # never launched: the op splits D (see FP32_MAX_D)
        for name, fn, sig, cx in kernels:
            cx = {**cx, **flags}
            sig = {**sig, **scal, **{c: "constexpr" for c in cx}}
            div16 = tuple(a for a, t in sig.items() if t.startswith("*") or a.startswith("stride_")
                          or a in ("D", "DV"))
            specs.append(KernelSpec(f"lightning_{name}_{tag}", fn, sig, cx, p.num_warps, p.num_stages,
                                    tags=tags, divisible_16=div16))
        sig = {"q": pt, "k": pt, "v": pt, "s": pf, "h0": pf, "o": pt, "ht": pf,
               "stride_qb": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kh": "i32",
               "stride_vb": "i32", "stride_vh": "i32", "scale": "fp32", "H": "i32", "D": "i32", "DV": "i32",
               "USE_H0": "constexpr", "BD": "constexpr", "BV": "constexpr"}
        div16 = tuple(a for a, t in sig.items() if t.startswith("*") or a.startswith("stride_") or a in ("D", "DV"))
        specs.append(KernelSpec(f"lightning_decode_{tag}", _lightning_decode_kernel, sig,
                                {"USE_H0": True, "BD": p.BD, "BV": p.DEC_BV}, 4, 1, tags=tags,
                                divisible_16=div16))
    return specs
