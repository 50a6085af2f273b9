"""Lightning attention (causal linear attention with per-head or per-token decay): chunk-parallel Triton
kernels and thin launchers.

Semantics (per sequence and head, log-decay ``g_t <= 0`` per token, ``lambda_t = exp(g_t)``; the per-head
constant decay with rate ``s_h >= 0`` is ``g_t = -s_h``)::

    S_t = exp(g_t) S_{t-1} + k_t^T v_t        (S: D x Dv, S_{-1} = h0 or 0)
    o_t = scale * q_t S_t

The sequence is cut into chunks of ``BT`` rows (chunks never straddle a packed-sequence boundary). Inside a
chunk with local rows ``i, j`` (``L`` valid rows), let ``b_i = sum_{r <= i} g_r`` be the cumulative
log-decay (fp32, ``b_0 >= b_1 >= ...``, all <= 0) and ``b_L = b_{L-1}``; ``S`` is the state before it::

    O  = scale * [((Q K^T) * M) V  +  (exp(b_i) Q) S]        M[i, j] = exp(b_i - b_j) if i >= j else 0
    S' = exp(b_L) S + (exp(b_L - b_j) K)^T V                  (the chunk's contribution H_c = (..)^T V)

Every decay factor is ``exp2`` of a difference of cumulative log-decays that is <= 0 (clamped), so a large
decay underflows to 0 instead of overflowing and there is no ``0 * inf``. Dot operands are rounded to the
input dtype (tensor cores on GPU; fp32 inputs use TF32 dots). For fp16 the fp32 state is scaled by a power
of two before its dots (``_state_mm``) so that it cannot overflow fp16's range.

Three phases (fla ``chunk_simple_gla`` structure; the Lightning-2 sequential intra-chunk loop is gone):

1. ``_chunk_state_kernel``, grid (state tiles, chunks, B*H), parallel: each chunk's contribution ``H_c``
   [BK, BV] (forward: ``(exp(b_L - b_j) K)^T V``; backward: ``scale (exp(b_i) Q)^T dO``) and its total
   log-decay ``b_L`` (fp32).
2. ``_chunk_scan_kernel``, grid (state slices, sequences*H), sequential over the chunks: only the combine
   ``S <- exp(b_L) S + H_c`` in fp32 (reverse order for the gradient of the state); it writes the state
   entering chunk ``c`` (forward) or the gradient of the state leaving it (backward) to slot ``c`` of a
   second buffer (bf16 for bf16 inputs, like fla's ``h``: phase 3 uses it as a bf16 dot operand), and the
   last state in fp32.
3. ``_chunk_out_kernel``, grid (output tiles, chunks, B*H), parallel: the intra-chunk term plus the state
   term, in four variants (output, dq, dk, dv), all of the form ``((A B^T) * M) C + (w * A) S``.

The backward recomputes the forward states (phases 1 + 2), scans the state gradients in reverse (1 + 2
with Q, dO) and runs phase 3 three times. The gradient of ``g`` is ``dg_t = sum_{s >= t} (q_s dq_s -
k_s dk_s) + (dht * S_N)`` (fla's identity); the dq / dk programs write the row sums, the launcher adds the
final-state term and does the reverse cumulative sum.

Packed sequences (``cu_seqlens``): a device-side chunk table maps each program of phases 1 and 3 to
(sequence, chunk); phase 2 reads the sequence's bounds and its first chunk slot. No host syncs.

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
def _chunk_load(x, i_b, i_h, r, s_b, s_h, s_n, o_col, m_row, m_col):
    """The chunk's rows ``r`` [BT, 1] (int64, row-masked by ``m_row``) x columns ``o_col`` of head ``i_h`` of
    batch ``i_b`` in a (B, H, N, D) tensor with strides (s_b, s_h, s_n, 1); zero-filled outside."""
    p = x + i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h + r * s_n + o_col[None, :]
    return tl.load(p, mask=m_row[:, None] & m_col[None, :], other=0.0)


@triton.jit
def _chunk_rows(i_c, i_bh, H, N, NT, cu, ctab, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Where program (chunk ``i_c``, batch-head ``i_bh``) works: batch ``i_b``, head ``i_h``, sequence
    ``i_n`` (its state index), first row ``r0`` of the chunk in the (B, H, N) row space of batch ``i_b``,
    valid rows ``L`` (0 for an idle slot of the packed chunk table) and the chunk-state slot."""
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        i_n = tl.load(ctab + 2 * i_c)  # -1: idle slot (the table is sized for the worst case)
        i_t = tl.load(ctab + 2 * i_c + 1)
        valid = i_n >= 0
        i_n = tl.maximum(i_n, 0)
        bos = tl.load(cu + i_n)
        eos = tl.load(cu + i_n + 1)
        r0 = bos + i_t * BT
        L = tl.where(valid, tl.minimum(eos - r0, BT), 0)
        slot = i_c
    else:
        i_n = i_b
        r0 = i_c * BT
        L = tl.minimum(N - r0, BT)
        slot = i_b * NT + i_c
    return i_b, i_h, i_n, r0, L, slot


@triton.jit
def _chunk_logdecay(g, s, i_bh, i_h, r0, N, L, BT: tl.constexpr, CONST_G: tl.constexpr):
    """Cumulative log2-decay ``b`` [BT] of a chunk (padded rows repeat ``b_{L-1}``) and ``b_L``; fp32, <= 0.
    ``CONST_G``: per-head rate ``s[i_h]`` (``b_i = -s (i + 1)``), else per-token ``g`` rows (B*H, N)."""
    o_t = tl.arange(0, BT)
    if CONST_G:
        b_r = tl.load(s + i_h).to(tl.float32) * 1.4426950408889634
        b_b = -b_r * tl.minimum(o_t + 1, L).to(tl.float32)  # [BT]
        b_l = -b_r * L.to(tl.float32)
    else:
        p_g = g + i_bh.to(tl.int64) * N + r0 + o_t
        b_b = tl.cumsum(tl.load(p_g, mask=o_t < L, other=0.0) * 1.4426950408889634, axis=0)  # [BT]
        b_l = tl.sum(tl.where(o_t == L - 1, b_b, 0.0), axis=0)
    return b_b, b_l


@triton.jit
def _decay_mask(b_b, b_r, BT: tl.constexpr, TRANS: tl.constexpr, CONST_G: tl.constexpr):
    """Intra-chunk decay mask M[i, j] = exp2(b_i - b_j) for i >= j else 0 [BT, BT] (its transpose with
    ``TRANS``); exponents clamped to <= 0. ``CONST_G`` uses the exact ``-s (i - j)``."""
    o_i = tl.arange(0, BT)
    if TRANS:
        d_ij = o_i[None, :] - o_i[:, None]  # [BT, BT] (row j, column i)
        if CONST_G:
            e_ij = -b_r * d_ij.to(tl.float32)
        else:
            e_ij = b_b[None, :] - b_b[:, None]
    else:
        d_ij = o_i[:, None] - o_i[None, :]  # [BT, BT] (row i, column j)
        if CONST_G:
            e_ij = -b_r * d_ij.to(tl.float32)
        else:
            e_ij = b_b[:, None] - b_b[None, :]
    return tl.where(d_ij >= 0, tl.exp2(tl.minimum(e_ij, 0.0, propagate_nan=tl.PropagateNan.ALL)), 0.0)


# ----------------------------------------------------------------------------------------------------
# Phase 1: per-chunk state contributions (parallel over chunks, B*H and state tiles)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_state_kernel(
    a, b, g, s, cu, ctab, hc, gl,
    stride_ab, stride_ah, stride_an,
    stride_bb, stride_bh, stride_bn,
    scale, H, N, D, DV, NT,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, CONST_G: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    # forward (a = k, b = v): H_c = (exp(b_L - b_j) K)^T V, and b_L -> gl.
    # REVERSE (a = q, b = do): H_c = scale * (exp(b_i) Q)^T dO (the chunk's contribution to dS_prev).
    i_kv, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV = tl.cdiv(DV, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_b, i_h, i_n, r0, L, slot = _chunk_rows(i_c, i_bh, H, N, NT, cu, ctab, BT, IS_VARLEN)
    DT = a.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < L
    m_k = o_k < D
    m_v = o_v < DV
    r = r0.to(tl.int64) + o_t[:, None]
    b_a = _chunk_load(a, i_b, i_h, r, stride_ab, stride_ah, stride_an, o_k, m_t, m_k)  # [BT, BK]
    b_v = _chunk_load(b, i_b, i_h, r, stride_bb, stride_bh, stride_bn, o_v, m_t, m_v).to(DT)  # [BT, BV]
    b_b, b_l = _chunk_logdecay(g, s, i_bh, i_h, r0, N, L, BT, CONST_G)
    if REVERSE:
        b_w = tl.exp2(b_b) * scale  # [BT]
    else:
        b_w = tl.exp2(tl.minimum(b_l - b_b, 0.0, propagate_nan=tl.PropagateNan.ALL))  # [BT]
    b_h = _mm(tl.trans((b_a * b_w[:, None]).to(DT)), b_v, DOT_F32, PREC)  # [BK, BV]
    p_h = hc + (slot * H + i_h).to(tl.int64) * D * DV + o_k[:, None] * DV + o_v[None, :]
    tl.store(p_h, b_h.to(hc.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
    if not REVERSE:
        if i_kv == 0:
            tl.store(gl + slot * H + i_h, b_l)


# ----------------------------------------------------------------------------------------------------
# Phase 2: sequential scan over the chunks (state combine only)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_scan_kernel(
    hc, gl, h0, hs, ht, cu, coff,
    H, N, NT, DDV,
    REVERSE: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BLK: tl.constexpr,
):
    # forward: S <- exp(b_L) S + H_c (hc: fp32) over chunks in order, hs[c] := S entering chunk c, ht := S
    # after all. REVERSE: G <- exp(b_L) G + H_c in reverse, hs[c] := G leaving chunk c (dS_next), ht := dh0.
    i_e, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    o_e = i_e * BLK + tl.arange(0, BLK)
    m_e = o_e < DDV
    if IS_VARLEN:
        nt = tl.cdiv(tl.load(cu + i_n + 1) - tl.load(cu + i_n), BT)
        c0 = tl.load(coff + i_n)
    else:
        nt = NT
        c0 = i_n * NT
    b_h = tl.zeros([BLK], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * DDV + o_e, mask=m_e, other=0.0).to(tl.float32)
    for i in range(0, nt):
        if REVERSE:
            i_s = (c0 + nt - 1 - i) * H + i_h
        else:
            i_s = (c0 + i) * H + i_h
        b_c = tl.load(hc + i_s.to(tl.int64) * DDV + o_e, mask=m_e, other=0.0)  # [BLK]
        b_d = tl.exp2(tl.load(gl + i_s))
        tl.store(hs + i_s.to(tl.int64) * DDV + o_e, b_h.to(hs.dtype.element_ty), mask=m_e)
        b_h = b_h * b_d + b_c
    tl.store(ht + i_nh.to(tl.int64) * DDV + o_e, b_h, mask=m_e)


# ----------------------------------------------------------------------------------------------------
# Phase 3: outputs and gradients (parallel over chunks, B*H and output tiles)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_out_kernel(
    a, b, c, x, g, s, cu, ctab, st, out, dg,
    stride_ab, stride_ah, stride_an,
    stride_bb, stride_bh, stride_bn,
    stride_cb, stride_ch, stride_cn,
    stride_xb, stride_xh, stride_xn,
    stride_sa, stride_sc,
    scale, H, N, DA, DC, NT,
    TRANS: tl.constexpr, SCALE_S: tl.constexpr, DG: tl.constexpr,
    IS_VARLEN: tl.constexpr, CONST_G: tl.constexpr,
    BT: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr,
    SCALED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    # out[:, tile] = scale * ((A B^T) * M) C + (w * A) S  (x scale when SCALE_S), A, B: [BT, DA], C: [BT, DC],
    # S[DA, DC] = st[slot] with strides (stride_sa, stride_sc):
    #   output: A=q,  B=k,  C=v,  S=S_prev     M,   w = exp(b_i),        SCALE_S
    #   dq:     A=do, B=v,  C=k,  S=S_prev^T   M,   w = exp(b_i),        SCALE_S, DG=+1 (x = q)
    #   dk:     A=v,  B=do, C=q,  S=dS_next^T  M^T, w = exp(b_L - b_j),           DG=-1 (x = k)
    #   dv:     A=k,  B=q,  C=do, S=dS_next    M^T, w = exp(b_L - b_j)
    # DG != 0 also writes DG * rowsum(x * out) [BT] (fp32, before rounding) for the gradient of g.
    i_o, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h, i_n, r0, L, slot = _chunk_rows(i_c, i_bh, H, N, NT, cu, ctab, BT, IS_VARLEN)
    DT = out.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_a = tl.arange(0, BA)
    o_c = i_o * BC + tl.arange(0, BC)
    m_t = o_t < L
    m_a = o_a < DA
    m_c = o_c < DC
    r = r0.to(tl.int64) + o_t[:, None]
    b_a = _chunk_load(a, i_b, i_h, r, stride_ab, stride_ah, stride_an, o_a, m_t, m_a).to(DT)  # [BT, BA]
    b_bt = _chunk_load(b, i_b, i_h, r, stride_bb, stride_bh, stride_bn, o_a, m_t, m_a).to(DT)  # [BT, BA]
    b_c = _chunk_load(c, i_b, i_h, r, stride_cb, stride_ch, stride_cn, o_c, m_t, m_c).to(DT)  # [BT, BC]
    p_s = st + (slot * H + i_h).to(tl.int64) * DA * DC + o_a[:, None] * stride_sa + o_c[None, :] * stride_sc
    b_s = tl.load(p_s, mask=m_a[:, None] & m_c[None, :], other=0.0)  # [BA, BC]

    b_b, b_l = _chunk_logdecay(g, s, i_bh, i_h, r0, N, L, BT, CONST_G)
    b_r = 0.0
    if CONST_G:
        b_r = tl.load(s + i_h).to(tl.float32) * 1.4426950408889634
    b_m = _decay_mask(b_b, b_r, BT, TRANS, CONST_G)  # [BT, BT]
    if TRANS:
        b_w = tl.exp2(tl.minimum(b_l - b_b, 0.0, propagate_nan=tl.PropagateNan.ALL))  # [BT]
    else:
        b_w = tl.exp2(b_b)  # [BT]
    # intra-chunk: ((A B^T) * M) C
    b_ab = _mm(b_a, tl.trans(b_bt), DOT_F32, PREC) * b_m  # [BT, BT]
    b_o = _mm(b_ab.to(DT), b_c, DOT_F32, PREC) * scale  # [BT, BC]
    # inter-chunk: (w * A) S
    if SCALED:
        b_i = _state_mm(b_a, b_s.to(tl.float32), DT, DOT_F32, PREC) * b_w[:, None]  # [BT, BC]
    else:
        b_i = _mm((b_a * b_w[:, None]).to(DT), b_s.to(DT), DOT_F32, PREC)  # [BT, BC]
    if SCALE_S:
        b_o += b_i * scale
    else:
        b_o += b_i
    p_o = out + i_bh.to(tl.int64) * N * DC + r * DC + o_c[None, :]  # out is contiguous (B, H, N, DC)
    tl.store(p_o, b_o.to(DT), mask=m_t[:, None] & m_c[None, :])
    if DG != 0:
        p_x = x + i_b.to(tl.int64) * stride_xb + i_h.to(tl.int64) * stride_xh + r * stride_xn + o_c[None, :]
        b_x = tl.load(p_x, mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)  # [BT, BC]
        b_dg = tl.sum(b_x * b_o, axis=1) * DG  # [BT]
        p_dg = dg + (i_o * tl.num_programs(2) + i_bh).to(tl.int64) * N + r0 + o_t
        tl.store(p_dg, b_dg, mask=m_t)


# ----------------------------------------------------------------------------------------------------
# Decode (one token)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _lightning_decode_kernel(
    q, k, v, lg, h0, o, ht,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    scale, H, D, DV,
    USE_H0: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    # S' = exp(lg) S + k^T v, o = scale q S'; lg: (B*H,) fp32 log-decay of this token (<= 0)
    i_v, i_bh = tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    m_dv = m_d[:, None] & m_v[None, :]
    # lg <= 0 or NaN (the op's device-side guard): no clamp, which would turn a NaN into a decay of 1
    b_lam = tl.exp2(tl.load(lg + i_bh).to(tl.float32) * 1.4426950408889634)
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
    BV: int  # Dv slice of the output / dv programs (state tile [BD, BV])
    BK: int  # D slice of the dq / dk programs (state tile [BDV, BK])
    SK: int  # state-contribution tile [SK, SV]
    SV: int
    SBLK: int  # elements of the state each scan program combines
    DEC_BV: int  # Dv slice of the decode programs
    num_warps: int  # phase 3 (output, dv)
    warps_dqk: int  # phase 3 (dq, dk)
    num_stages: int
    prec: str  # tl.dot input_precision
    scaled: bool  # power-of-two scaling of the state before its 16-bit dots
    state_dtype: torch.dtype  # scanned per-chunk states: bf16 for bf16 inputs (like fla's h), else fp32


def plan(D: int, DV: int, dtype: torch.dtype, block_size: Optional[int] = None) -> Plan:
    """Tile sizes for head dims (D, Dv) and an input dtype; ``block_size`` overrides the chunk length.

    Chunk ``BT``: bf16 64 for padded head dims <= 128, else 32; fp16 / fp32 32 for <= 128, else 16. The
    output / dv tile is [BD, BV] of the state and [BT, BD] of q / k (``BV`` at most 64, 32 for bf16 with
    padded D >= 128, and fp16 at most 2048 elements at chunk >= 32); the dq / dk tile [BDV, BK] (at most
    8192 / 4096 / 2048 elements for bf16 / fp16 / fp32). 8 warps (dq / dk of bf16 with padded D >= 256 and
    Dv <= 64: 4).
    Phase 1 tiles are [64, 64] (clipped to the dims), phase 2 combines 1024 state elements per program.
    Chunk contributions and the scan are fp32; the scanned per-chunk states phase 3 reads are stored in
    bf16 for bf16 inputs (they are bf16 dot operands anyway), in fp32 otherwise (fp16's range is too small
    for a long undecayed state). Every default config compiles for sm_80 / sm_90 without spills under
    Triton 3.6 and 3.9 (see aot_specs)."""
    BD, BDV = next_pow2(D), next_pow2(DV)
    wide = max(BD, BDV)
    if dtype == torch.float32:
        cap, BT = 2048, (32 if wide <= 128 else 16)
    elif dtype == torch.float16:
        cap, BT = 4096, (32 if wide <= 128 else 16)
    else:
        cap, BT = 8192, (64 if wide <= 128 else 32)
    if block_size:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES} (or None for the default), got {block_size}")
        BT = int(block_size)
    vcap = cap // 2 if dtype == torch.float16 and BT >= 32 else cap  # output / dv tile [BD, BV]
    BV = min(BDV, 64, max(16, vcap // BD))
    if dtype == torch.bfloat16 and BD >= 128:
        BV = min(BV, 32)
    BK = min(BD, 64, max(16, cap // BDV))
    # bf16 dq / dk at padded D >= 256 with a narrow Dv: 8 warps spill a few bytes on sm_80 (both Tritons, for
    # BK 32 or 64: ptxas caps them at 80 registers there); 4 warps do not
    warps_dqk = 4 if dtype == torch.bfloat16 and BD >= 256 and BDV <= 64 else 8
    SK, SV = min(BD, 64), min(BDV, 64)
    SBLK = min(1024, triton.next_power_of_2(D * DV))
    DEC_BV = min(BDV, max(16, 4096 // BD))
    sdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return Plan(BT, BD, BDV, BV, BK, SK, SV, SBLK, DEC_BV, 8, warps_dqk, 2, "tf32", dtype == torch.float16, sdt)


def lightning_work(N: int, D: int, DV: int, *, B: int = 1, H: int = 1, dtype: torch.dtype = torch.float16,
                   block_size: Optional[int] = None) -> Dict[str, Tuple[int, int]]:
    """Work of one forward and one backward (equal-length sequences) as ``{kernel: (programs, chunk-loop
    trips per program)}``. The parallel kernels run one chunk per program (trips 1, programs grow with
    N / BT); the scans run ``cdiv(N, BT)`` trips of a state combine. Programs x trips is linear in N.
    The launchers record the same numbers for what they actually launched in :data:`LAST_LAUNCH`."""
    p = plan(D, DV, dtype, block_size)
    NT = triton.cdiv(N, p.BT)
    ns = triton.cdiv(D, p.SK) * triton.cdiv(DV, p.SV) * NT * B * H
    scan = (triton.cdiv(D * DV, p.SBLK) * B * H, NT)
    return {"fwd_state": (ns, 1), "fwd_scan": scan, "fwd_out": (triton.cdiv(DV, p.BV) * NT * B * H, 1),
            "bwd_state": (ns, 1), "bwd_scan": scan, "bwd_dstate": (ns, 1), "bwd_dscan": scan,
            "bwd_dq": (triton.cdiv(D, p.BK) * NT * B * H, 1), "bwd_dk": (triton.cdiv(D, p.BK) * NT * B * H, 1),
            "bwd_dv": (triton.cdiv(DV, p.BV) * NT * B * H, 1)}


#: what the launchers last launched: kernel name -> (programs, chunk-loop trips per program)
LAST_LAUNCH: Dict[str, Tuple[int, int]] = {}


def _record(name: str, grid: Tuple[int, ...], trips: int) -> None:
    LAST_LAUNCH[name] = (int(math.prod(grid)), int(trips))


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
class _Chunks(NamedTuple):
    NT: int  # chunks per sequence (equal lengths) or the size of the packed chunk table
    nseq: int  # sequences (B, or len(cu_seqlens) - 1)
    cu: torch.Tensor  # sanitised int32 cu_seqlens (or a dummy)
    ctab: torch.Tensor  # (NT, 2) int32 (sequence or -1, chunk in sequence) for packed inputs
    coff: torch.Tensor  # (nseq + 1,) int32 first chunk slot of each sequence
    varlen: bool


def _chunks(B: int, N: int, BT: int, cu: Optional[torch.Tensor], device) -> _Chunks:
    """The chunk table, built on the device (no host sync). Packed sequences: chunk slots
    ``coff[n] .. coff[n+1]`` belong to sequence ``n``; the table has the worst-case number of slots
    ``(total + nseq (BT - 1)) // BT`` and idle slots say -1. cu_seqlens is clamped into [0, total] and made
    non-decreasing here so that no kernel can read out of bounds, whatever it holds."""
    if cu is None:
        z = torch.zeros(2, device=device, dtype=torch.int32)
        return _Chunks(triton.cdiv(N, BT), B, z, z, z, False)
    nseq = cu.numel() - 1
    cs = torch.cummax(cu.clamp(0, N), 0).values.to(torch.int32)
    nch = (cs[1:] - cs[:-1] + BT - 1) // BT
    coff = torch.cat([cs.new_zeros(1), torch.cumsum(nch, 0)]).to(torch.int32)
    NT = max(1, (N + nseq * (BT - 1)) // BT)
    c = torch.arange(NT, device=device, dtype=torch.int64)
    i_n = torch.searchsorted(coff[1:].to(torch.int64), c, right=True)
    valid = i_n < nseq
    i_n = i_n.clamp(max=nseq - 1)
    i_t = c - coff[i_n].to(torch.int64)
    ctab = torch.stack([torch.where(valid, i_n, -1), torch.where(valid, i_t, 0)], 1).to(torch.int32).contiguous()
    return _Chunks(NT, nseq, cs.contiguous(), ctab, coff, True)


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _states(a, b, g, rates, scale, h0, ch: _Chunks, p: Plan, B, H, N, D, DV, reverse: bool, gl, names):
    """Phases 1 + 2: per-chunk states (slots, H, D, Dv) and the last state (nseq, H, D, Dv) fp32."""
    slots = ch.NT * (1 if ch.varlen else B)
    hc = alloc(slots, H, D, DV, device=a.device, dtype=torch.float32)
    hs = alloc(slots, H, D, DV, device=a.device, dtype=p.state_dtype)
    grid = (triton.cdiv(D, p.SK) * triton.cdiv(DV, p.SV), ch.NT, B * H)
    gdum = rates if g is None else g
    _chunk_state_kernel[grid](
        a, b, gdum, rates, ch.cu, ch.ctab, hc, gl, *_strides(a), *_strides(b),
        float(scale), H, N, D, DV, ch.NT,
        REVERSE=reverse, IS_VARLEN=ch.varlen, CONST_G=g is None, BT=p.BT, BK=p.SK, BV=p.SV,
        DOT_F32=interpreter_enabled(), PREC=p.prec, num_warps=4, num_stages=2,
    )
    _record(names[0], grid, 1)
    ht = alloc(ch.nseq, H, D, DV, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(D * DV, p.SBLK), ch.nseq * H)
    _chunk_scan_kernel[grid](
        hc, gl, h0 if h0 is not None else ht, hs, ht, ch.cu, ch.coff, H, N, ch.NT, D * DV,
        REVERSE=reverse, USE_H0=h0 is not None, IS_VARLEN=ch.varlen, BT=p.BT, BLK=p.SBLK,
        num_warps=4, num_stages=2,
    )
    _record(names[1], grid, ch.NT if not ch.varlen else triton.cdiv(N, p.BT))
    return hs, ht


def _out(kind, a, b, c, x, g, rates, scale, st, ch: _Chunks, p: Plan, B, H, N, DA, DC, dg=None):
    """Phase 3 for one of 'out', 'dq', 'dk', 'dv' (see ``_chunk_out_kernel``)."""
    BA, BC = {"out": (p.BD, p.BV), "dq": (p.BDV, p.BK), "dk": (p.BDV, p.BK), "dv": (p.BD, p.BV)}[kind]
    trans = kind in ("dk", "dv")
    sa, sc = (DC, 1) if kind in ("out", "dv") else (1, DA)  # states are (D, Dv) row-major
    DG = {"dq": 1, "dk": -1}.get(kind, 0) if dg is not None else 0
    o = alloc(B, H, N, DC, device=a.device, dtype=a.dtype if kind != "dq" else c.dtype)
    grid = (triton.cdiv(DC, BC), ch.NT, B * H)
    xx = x if x is not None else c
    _chunk_out_kernel[grid](
        a, b, c, xx, rates if g is None else g, rates, ch.cu, ch.ctab, st, o, dg if dg is not None else o,
        *_strides(a), *_strides(b), *_strides(c), *_strides(xx), sa, sc,
        float(scale), H, N, DA, DC, ch.NT,
        TRANS=trans, SCALE_S=not trans, DG=DG, IS_VARLEN=ch.varlen, CONST_G=g is None,
        BT=p.BT, BA=BA, BC=BC, SCALED=p.scaled, DOT_F32=interpreter_enabled(), PREC=p.prec,
        num_warps=p.warps_dqk if kind in ("dq", "dk") else p.num_warps, num_stages=p.num_stages,
    )
    _record("fwd_out" if kind == "out" else f"bwd_{kind}", grid, 1)
    return o


@on_tensor_device
def lightning_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor,
                  g: Optional[torch.Tensor], scale: float, h0: Optional[torch.Tensor],
                  cu_seqlens: Optional[torch.Tensor] = None, block_size: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, D), v (B, H, N, Dv) with unit last stride; rates (H,) fp32 contiguous (used when
    ``g`` is None); g (B, H, N) fp32 contiguous log-decays or None; h0 (nseq, H, D, Dv) fp32 contiguous or
    None; cu_seqlens int32 (nseq + 1,) with B = 1, or None (nseq = B). Returns out (B, H, N, Dv) in q.dtype
    (contiguous) and the final states (nseq, H, D, Dv) fp32."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    p = plan(D, DV, q.dtype, block_size)
    ch = _chunks(B, N, p.BT, cu_seqlens, q.device)
    gl = torch.empty(ch.NT * (1 if ch.varlen else B), H, device=q.device, dtype=torch.float32)
    hs, ht = _states(k, v, g, rates, scale, h0, ch, p, B, H, N, D, DV, False, gl, ("fwd_state", "fwd_scan"))
    o = _out("out", q, k, v, None, g, rates, scale, hs, ch, p, B, H, N, D, DV)
    return o, ht


def _reverse_cumsum(dG: torch.Tensor, cu: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum_{s >= t}`` within each sequence, in float64 (packed sequences: subtract the sum past the
    sequence's end)."""
    rc = dG.double().flip(-1).cumsum(-1).flip(-1)
    if cu is None:
        return rc
    N = dG.shape[-1]
    rcp = torch.cat([rc, rc.new_zeros(*rc.shape[:-1], 1)], -1)
    seq = torch.searchsorted(cu[1:].to(torch.int64), torch.arange(N, device=dG.device), right=True)
    return rc - rcp[..., cu[1:].to(torch.int64).clamp(max=N)[seq.clamp(max=cu.numel() - 2)]]


@on_tensor_device
def lightning_bwd(do: torch.Tensor, dht: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, rates: torch.Tensor, g: Optional[torch.Tensor], scale: float,
                  h0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor] = None,
                  block_size: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`lightning_fwd`. do (B, H, N, Dv) unit last stride, dht (nseq, H, D, Dv) fp32
    contiguous or None. Returns dq, dk, dv (contiguous, input dtype), dh0 (nseq, H, D, Dv) fp32 and dg
    (B, H, N) fp32 (None without ``g``)."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    p = plan(D, DV, q.dtype, block_size)
    ch = _chunks(B, N, p.BT, cu_seqlens, q.device)
    gl = torch.empty(ch.NT * (1 if ch.varlen else B), H, device=q.device, dtype=torch.float32)
    hs, ht = _states(k, v, g, rates, scale, h0, ch, p, B, H, N, D, DV, False, gl, ("bwd_state", "bwd_scan"))
    dhs, dh0 = _states(q, do, g, rates, scale, dht, ch, p, B, H, N, D, DV, True, gl, ("bwd_dstate", "bwd_dscan"))
    dgq = dgk = None
    if g is not None:
        # zero-filled: rows outside every sequence (only with unchecked, inconsistent cu_seqlens) stay 0
        dgq = torch.zeros(triton.cdiv(D, p.BK), B * H, N, device=q.device, dtype=torch.float32)
        dgk = torch.zeros(triton.cdiv(D, p.BK), B * H, N, device=q.device, dtype=torch.float32)
    dq = _out("dq", do, v, k, q, g, rates, scale, hs, ch, p, B, H, N, DV, D, dgq)
    dk = _out("dk", v, do, q, k, g, rates, scale, dhs, ch, p, B, H, N, DV, D, dgk)
    dv = _out("dv", k, q, do, None, g, rates, scale, dhs, ch, p, B, H, N, D, DV)
    dg = None
    if g is not None:
        dG = (dgq.sum(0) + dgk.sum(0)).view(B, H, N)
        cu = ch.cu if ch.varlen else None  # the sanitised copy the kernels used
        dg = _reverse_cumsum(dG, cu)
        if dht is not None:  # the final state carries exp(sum of the sequence's g): + sum(dht * S_N)
            fin = (dht * ht).sum((-1, -2), dtype=torch.float64)  # (nseq, H)
            if cu_seqlens is None:
                dg = dg + fin[:, :, None]
            else:
                seq = torch.searchsorted(cu[1:].to(torch.int64), torch.arange(N, device=q.device),
                                         right=True).clamp(max=ch.nseq - 1)
                dg = dg + fin.t()[:, seq][None]
        dg = dg.float()
    return dq, dk, dv, dh0, dg


@on_tensor_device
def lightning_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lg: torch.Tensor,
                          scale: float, h0: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k (B, H, 1, D), v (B, H, 1, Dv) with unit last stride, lg (B*H,) fp32 log-decays of the
    token, h0 (B, H, D, Dv) fp32 contiguous or None. Returns out (B, H, 1, Dv) in q.dtype and the new
    state (B, H, D, Dv) fp32."""
    B, H, _, D = q.shape
    DV = v.shape[-1]
    p = plan(D, DV, q.dtype)
    o = alloc(B, H, 1, DV, device=q.device, dtype=q.dtype)
    ht = alloc(B, H, D, DV, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(DV, p.DEC_BV), H, B)
    _lightning_decode_kernel[grid](
        q, k, v, lg, h0 if h0 is not None else ht, o, ht,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        float(scale), H, D, DV, USE_H0=h0 is not None, BD=p.BD, BV=p.DEC_BV, num_warps=4, num_stages=1,
    )
    _record("decode", grid, 1)
    return o, ht


# ----------------------------------------------------------------------------------------------------
# AOT descriptions of the shipped configs
# ----------------------------------------------------------------------------------------------------
# (D, Dv) pairs covering every padded-dim regime of ``plan`` (16-bit: <= 128 / 256 wide; fp32: <= 128 /
# 256 wide), square and rectangular. Other dims pad to one of these tile shapes or a smaller one.
_AOT_DIMS = {
    "16bit": ((16, 16), (64, 64), (128, 128), (256, 256), (64, 256), (256, 64)),
    "fp32": ((64, 64), (128, 128), (256, 256), (64, 256), (128, 256), (256, 64)),
}
# fp32 chunk kernels with D > 128 spill; the op splits D into chunks of at most this (exact: the output
# is a sum over D-chunks and the state's rows are the D-chunks). The decode kernel takes any D.
FP32_MAX_D = 128


def _strided(*tensors: str) -> Dict[str, str]:
    return {f"stride_{t}{x}": "i32" for t in tensors for x in "bhn"}


def aot_specs() -> List[KernelSpec]:
    """Every kernel variant at the default plan for fp16 / bf16 / fp32 over ``_AOT_DIMS``: phase 1
    (forward / reverse), phase 2 (forward / reverse), phase 3 (out, dq, dk, dv), with per-token ``g`` and
    packed sequences (the heavier variants), and the decode kernel; configs that compile to the same binary
    (same kernel, signature and constexprs) are listed once. Pointers, strides and D / Dv are
    declared multiples of 16 (what the JIT specialises at run time for contiguous inputs with head dims
    that are multiples of 16)."""
    specs: List[KernelSpec] = []
    cases = [(dt, d, dv) for dt in (torch.float16, torch.bfloat16) for d, dv in _AOT_DIMS["16bit"]]
    cases += [(torch.float32, d, dv) for d, dv in _AOT_DIMS["fp32"]]
    flags = {"IS_VARLEN": True, "CONST_G": False}
    seen = set()
    for dt, D, DV in cases:
        p = plan(D, DV, dt)
        pt, pf, pi, ps = ptr_type(dt), "*fp32", "*i32", ptr_type(p.state_dtype)
        dts = str(dt).split(".")[-1]
        tag = f"{dts}_d{D}_dv{DV}_bt{p.BT}"
        tags = {"dtype": dts, "D": D, "DV": DV, "BT": p.BT}
        kernels = []
        if dt != torch.float32 or D <= FP32_MAX_D:  # wider fp32 D never launches (the op splits D)
            sig = {"a": pt, "b": pt, "g": pf, "s": pf, "cu": pi, "ctab": pi, "hc": pf, "gl": pf,
                   **_strided("a", "b"), "scale": "fp32", "H": "i32", "N": "i32", "D": "i32", "DV": "i32",
                   "NT": "i32"}
            for rev in (False, True):
                cx = {"REVERSE": rev, **flags, "BT": p.BT, "BK": p.SK, "BV": p.SV, "DOT_F32": False,
                      "PREC": p.prec}
                kernels.append((f"state{'_rev' if rev else ''}", _chunk_state_kernel, sig, cx, 4, 2))
            sig = {"hc": pf, "gl": pf, "h0": pf, "hs": ps, "ht": pf, "cu": pi, "coff": pi, "H": "i32", "N": "i32",
                   "NT": "i32", "DDV": "i32"}
            for rev in (False, True):
                cx = {"REVERSE": rev, "USE_H0": True, "IS_VARLEN": True, "BT": p.BT, "BLK": p.SBLK}
                kernels.append((f"scan{'_rev' if rev else ''}", _chunk_scan_kernel, sig, cx, 4, 2))
            sig = {"a": pt, "b": pt, "c": pt, "x": pt, "g": pf, "s": pf, "cu": pi, "ctab": pi, "st": ps,
                   "out": pt, "dg": pf, **_strided("a", "b", "c", "x"), "stride_sa": "i32", "stride_sc": "i32",
                   "scale": "fp32", "H": "i32", "N": "i32", "DA": "i32", "DC": "i32", "NT": "i32"}
            for kind, BA, BC, trans, dg in (("out", p.BD, p.BV, False, 0), ("dq", p.BDV, p.BK, False, 1),
                                            ("dk", p.BDV, p.BK, True, -1), ("dv", p.BD, p.BV, True, 0)):
                cx = {"TRANS": trans, "SCALE_S": not trans, "DG": dg, **flags, "BT": p.BT, "BA": BA, "BC": BC,
                      "SCALED": p.scaled, "DOT_F32": False, "PREC": p.prec}
                warps = p.warps_dqk if kind in ("dq", "dk") else p.num_warps
                kernels.append((kind, _chunk_out_kernel, sig, cx, warps, p.num_stages))
        for name, fn, sig, cx, warps, stages in kernels:
            key = (fn.__name__ if hasattr(fn, "__name__") else name, tuple(sorted(sig.items())),
                   tuple(sorted(cx.items())), warps, stages)
            if key in seen:  # e.g. the scans (elementwise) and phase 1 at other head dims: same binary
                continue
            seen.add(key)
            sig = {**sig, **{c: "constexpr" for c in cx}}
            one = ("stride_sc",) if name in ("out", "dv") else ("stride_sa",)  # the unit state stride
            div16 = tuple(a for a, t in sig.items() if a not in one and a not in ("gl", "g", "ctab", "cu", "coff")
                          and (t.startswith("*") or a.startswith("stride_") or a in ("D", "DV", "DA", "DC")))
            specs.append(KernelSpec(f"lightning_{name}_{tag}", fn, sig, cx, warps, stages, tags=tags,
                                    divisible_16=div16))
        sig = {"q": pt, "k": pt, "v": pt, "lg": pf, "h0": pf, "o": pt, "ht": pf,
               "stride_qb": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kh": "i32",
               "stride_vb": "i32", "stride_vh": "i32", "scale": "fp32", "H": "i32", "D": "i32", "DV": "i32",
               "USE_H0": "constexpr", "BD": "constexpr", "BV": "constexpr"}
        div16 = tuple(a for a, t in sig.items() if a != "lg" and (t.startswith("*") or a.startswith("stride_")
                                                                   or a in ("D", "DV")))
        specs.append(KernelSpec(f"lightning_decode_{tag}", _lightning_decode_kernel, sig,
                                {"USE_H0": True, "BD": p.BD, "BV": p.DEC_BV}, 4, 1, tags=tags,
                                divisible_16=div16))
    return specs
