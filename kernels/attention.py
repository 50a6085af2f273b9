"""The softmax-attention tile engine: forward, dQ and dK/dV kernels plus thin launchers.

One engine serves dense, causal, sliding-window, block-sparse and masked (bias) attention. Masking is a
set of constexpr variants of the same tile body:

- ``WINDOWED``: index masking by the (left, right) window in bottom-right aligned coordinates
  (causal is ``right = 0``). The launcher visits only key tiles that intersect the window: boundary tiles
  run the masked body, interior tiles the unmasked body, tiles outside are never visited.
- ``SPARSE``: the key tiles come from a :class:`tileattn.BlockMask`'s lists (full blocks: unmasked body;
  partial blocks: the body applies the block's stored element mask). Empty blocks are never visited.
- ``BIAS``: 0 none, 1 boolean mask tensor (True = attend), 2 float tensor added to the scores; loaded
  per tile with broadcast strides (the SDPA drop-in path).

Score mods and dropout are constexpr variants of the same body too (``MOD``, ``DROPOUT``, the last kernel
arguments): a user ScoreMod function, ALiBi and soft-capping modify the scaled scores before the masks
(interior steps then return scaled scores as well), and dropout masks the probabilities with Philox bits
keyed by (seed, offset, b, h, i, j), regenerated in both backward kernels. Off, they compile to nothing.

Scores are kept in the log2 domain: ``s2 = (q . k) * scale * log2(e)`` and ``exp2`` everywhere; the LSE
is stored in natural log. Rows that see no key give out = 0, lse = -inf, and zero gradients.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .utils import (KernelSpec, alloc, interpreter_enabled, next_pow2, on_tensor_device, ptr_type, row_dot,
                    seqlen_bucket)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# ----------------------------------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture and head-dim bucket. Every entry
# is AOT-compiled for sm_80 / sm_90 by the resource report and the spill test (no spills allowed).
# ----------------------------------------------------------------------------------------------------
# Spill-free (AOT-checked by scripts/config_sweep.py and the resource report) for every mask variant;
# the autotuner picks among them on the GPU. Families: 16-bit on sm_90 / sm_80, 16-bit with a mask tensor
# ("mask": its tile loads need smaller tiles), fp32 (TF32 dots).
FWD_CONFIGS = {
    "sm90": {64: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
             128: [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
             256: [(128, 32, 8, 2)]},
    "sm80": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
             128: [(64, 64, 8, 3), (128, 32, 8, 3), (32, 32, 4, 2)],
             256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    "mask": {64: [(64, 32, 4, 2)],
             128: [(64, 32, 4, 2), (32, 32, 4, 2)],
             256: [(32, 16, 4, 2)]},
    "mask90": {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
               128: [(128, 32, 8, 2), (64, 32, 4, 2)],
               256: [(128, 16, 8, 1), (64, 16, 4, 1)]},
    "fp32": {64: [(64, 32, 4, 2)],
             128: [(32, 32, 4, 2)],
             256: [(16, 16, 4, 1)]},
    "fp32_90": {64: [(64, 32, 4, 2)],
                128: [(64, 16, 4, 1)],
                256: [(16, 16, 4, 1)]},
}
# dQ: BLOCK_M query rows per program (the M of all three MMAs: 64 per warpgroup on sm_90), BLOCK_N keys a step;
# an optional fifth entry is the boundary step (default min(BLOCK_N, 64)).
DQ_CONFIGS = {
    "sm90": {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
             128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
             256: [(128, 32, 8, 1, 16)]},
    "sm80": {64: [(32, 32, 4, 2), (16, 32, 4, 1)],
             128: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
             256: [(16, 32, 4, 1)]},
    "mask": {64: [(64, 32, 4, 2), (32, 32, 4, 2)],
             128: [(64, 32, 4, 2)],
             256: [(16, 16, 4, 1)]},
    "mask90": {64: [(64, 64, 4, 2), (128, 64, 8, 2)],
               128: [(128, 64, 8, 2), (64, 32, 4, 2)],
               256: [(128, 32, 8, 1)]},
    "fp32": {64: [(16, 16, 4, 1)],
             128: [(16, 16, 4, 1)],
             256: [(16, 16, 4, 1)]},
    "fp32_90": {64: [(64, 32, 4, 1)],
                128: [(128, 16, 8, 1)],
                256: [(16, 16, 4, 1)]},
}
# dK/dV: BLOCK_N key rows per program, BLOCK_M queries a step; optional fifth / sixth entries: the boundary
# step (default min(BLOCK_M, 64)) and SWAP. On sm_90 64 rows per warpgroup along every MMA's M: the key tile
# is the M of all four products, or, swapped (SWAP, see _dkdv_steps), the query step is the M of S and dP
# and the head dim the M of the transposed dK^T / dV^T products (d256 fits only so: 64 keys x (D + Dv) fp32
# accumulators over two warpgroups).
DKDV_CONFIGS = {
    "sm90": {64: [(64, 128, 8, 2, 32)],
             128: [(32, 128, 8, 2, 16), (128, 64, 8, 2, 128, True)],
             256: [(128, 64, 8, 1, 128, True), (128, 32, 8, 1, 128, True)]},
    "sm80": {64: [(32, 32, 4, 2), (16, 32, 4, 1)],
             128: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
             256: [(16, 16, 4, 1)]},
    "mask": {64: [(32, 32, 4, 2)],
             128: [(32, 32, 4, 2)],
             256: [(32, 16, 4, 1)]},
    "mask90": {64: [(128, 64, 8, 2, 128, True), (32, 64, 4, 2)],
               128: [(128, 64, 8, 1, 128, True)],
               256: [(128, 32, 8, 1, 128, True)]},
    "fp32": {64: [(16, 16, 4, 1)],
             128: [(16, 16, 4, 1)],
             256: [(16, 16, 8, 1)]},
    "fp32_90": {64: [(64, 32, 4, 1, 64, True)],
                128: [(64, 16, 4, 1, 64, True)],
                256: [(16, 16, 4, 1)]},
}
# Decoding over a KV cache (the forward's KVCACHE / PAGE / PACK_GQA variants): memory-bound, one warpgroup
# per 64 packed query rows; sm_90 tiles AOT-checked spill-free in the paged variant, other families reuse
# the forward's.
# Block-sparse calls of these (kernel, family, head-dim bucket) run these configs instead: the 64-key swapped
# d256 dK/dV tile spills 40 bytes (outside its main loops) in the block-sparse variant.
SPARSE_CONFIGS = {("_attn_bwd_dkdv", "sm90", 256): [(128, 32, 8, 1, 128, True)]}
# Block-sparse blocks narrower than every tile of an sm_90 family run the (smaller) tiles of this family
# instead of shrunk wide tiles (a shrunk 8-warp tile replicates its MMAs and may spill).
SMALL_BLOCK_FAMILY = {"sm90": "sm80", "mask90": "mask", "fp32_90": "fp32"}
DECODE_CONFIGS = {
    "sm90": {64: [(64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
             128: [(64, 64, 4, 3), (128, 64, 8, 3)],
             256: [(128, 32, 8, 2)]},
    **{f: FWD_CONFIGS[f] for f in ("sm80", "mask", "mask90", "fp32", "fp32_90")},
}
INTERPRET_CONFIG = (32, 32, 4, 1)  # (BLOCK_M, BLOCK_N, warps, stages[, BLOCK_B[, SWAP]])


def _dim_bucket(bd: int) -> int:
    return 64 if bd <= 64 else (128 if bd <= 128 else 256)


# ----------------------------------------------------------------------------------------------------
# Shared tile helpers: the "walk" (which tiles a program visits, in two phases) and the tile body
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mask_scores(
    s, i_q, i_k, Nq, Nk, left, right,
    p_bias, sb_m, sb_n, p_emask, i_mid, q0, k0,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSK: tl.constexpr,
):
    """Apply every mask variant to a scaled score tile ``s`` (log2 domain) of a boundary step. ``i_q`` /
    ``i_k`` are broadcastable query / key index tiles (either orientation: [BM, 1] x [1, BN] or [1, BM] x
    [BN, 1]). Always: keys in bounds (query rows past Nq need no mask: the forward and dQ never store them,
    and dK/dV loads their LSE as -inf, so their p is 0). WINDOWED: the aligned (left, right) window, as
    per-query key bounds (two compares per element). SPARSE: the block's stored element mask (block origin
    (q0, k0)) when ``i_mid >= 0`` (partial block); full blocks have ``i_mid = -1``."""
    if WINDOWED:  # key j visible to query i iff i + Nk - Nq - left <= j <= i + Nk - Nq + right (and j < Nk)
        m_ok = (i_k >= i_q + (Nk - Nq - left)) & (i_k <= tl.minimum(i_q + (Nk - Nq + right), Nk - 1))
    else:
        m_ok = (i_k < Nk) & (i_q >= 0)
    if SPARSE:  # a step lies inside its block: the stored (BSQ, BSK) element mask needs no bounds
        m_em = (i_q * 0 + i_k * 0 + i_mid) >= 0  # (broadcast explicitly: the interpreter rejects scalar masks)
        b_em = tl.load(p_emask + (i_q - q0) * BSK + (i_k - k0), mask=m_em, other=1)
        m_ok = m_ok & (b_em != 0)
    if BIAS != 0:
        m_in = (i_q < Nq) & (i_k < Nk)  # bias loads stay inside the tensor's extent
    if BIAS == 1:
        b_bm = tl.load(p_bias + i_q.to(tl.int64) * sb_m + i_k * sb_n, mask=m_in, other=0)
        m_ok = m_ok & (b_bm != 0)
    if BIAS == 2:
        b_bias = tl.load(p_bias + i_q.to(tl.int64) * sb_m + i_k * sb_n, mask=m_in, other=0.0).to(tl.float32)
        s = s + b_bias * 1.4426950408889634
    return tl.where(m_ok, s, float("-inf"))


@triton.jit
def _walk_setup(
    start, BT: tl.constexpr, BSTEP: tl.constexpr, Nt, Ns, off, lo_w, hi_w,
    NUM_F, NUM_P, i_b, i_h, sn_b, sn_h, si_b, si_h, si_m,
    SPARSE: tl.constexpr, ALL_MASKED: tl.constexpr, BS_THIS: tl.constexpr, lim_lo, lim_hi,
):
    """Plan the walk of a program owning the tile [start, start + BT) of one axis along the other axis, in
    two phases. *Interior* steps (every (this, other) pair of the step in bounds and visible) run the
    unmasked body; *boundary* steps run the masked body. Dense / windowed: the tiles [lo, hi) (multiples
    of BSTEP) that intersect the window (index visibility ``lo_w <= other - this - off <= hi_w``); interior
    tiles are [lo_u, hi_u), boundary ones lie on either side. Sparse: the BlockMask's full blocks
    (interior) then partial blocks (boundary). ALL_MASKED (a bias tensor) sends every step through the
    masked body. ``[lim_lo, lim_hi)`` (multiples of BSTEP) restricts the dense walk to one split of the
    other axis (split-KV). Returns (lo, lo_u, hi_u, hi, n_full, n_part, list offset)."""
    if SPARSE:
        i_blk = start // BS_THIS
        n_full = tl.load(NUM_F + i_b * sn_b + i_h * sn_h + i_blk)
        n_part = tl.load(NUM_P + i_b * sn_b + i_h * sn_h + i_blk)
        p_l = i_b.to(tl.int64) * si_b + i_h.to(tl.int64) * si_h + i_blk * si_m
        return 0, 0, 0, 0, n_full, n_part, p_l
    else:
        last = tl.minimum(start + BT, Nt) - 1
        lo_j = tl.maximum(tl.maximum(start + off + lo_w, 0), lim_lo)
        hi_j = tl.maximum(tl.minimum(tl.minimum(last + off + hi_w + 1, Ns), lim_hi), 0)
        lo = (lo_j // BSTEP) * BSTEP
        hi = lo + tl.cdiv(tl.maximum(hi_j - lo, 0), BSTEP) * BSTEP
        # interior: others visible to the last row of this tile and to its first row, and in bounds
        a = tl.maximum(last + off + lo_w, lo)
        b = tl.maximum(tl.minimum(start + off + hi_w + 1, Ns), 0)
        lo_u = tl.minimum(tl.cdiv(a, BSTEP) * BSTEP, hi)
        hi_u = tl.minimum(tl.maximum((b // BSTEP) * BSTEP, lo_u), hi)
        if ALL_MASKED:
            lo_u = lo
            hi_u = lo
        return lo, lo_u, hi_u, hi, 0, 0, 0


@triton.jit
def _walk_range(lo, lo_u, hi_u, hi, n_full, n_part, MASKED: tl.constexpr, SPARSE: tl.constexpr,
                ALL_MASKED: tl.constexpr, BS_OTHER: tl.constexpr, BSTEP: tl.constexpr):
    """Loop bounds [t0, t1) of one phase in steps of BSTEP (the boundary phase may step finer than the
    interior one: its masked tiles need more registers)."""
    if SPARSE:
        SUB: tl.constexpr = BS_OTHER // BSTEP
        t0 = n_full * SUB
        t1 = t0
        if MASKED:
            t1 = (n_full + n_part) * SUB
            if ALL_MASKED:
                t0 = 0
        else:
            t0 = 0
            if ALL_MASKED:
                t1 = 0
    else:
        t0 = 0
        if MASKED:
            t1 = ((lo_u - lo) + (hi - hi_u)) // BSTEP
        else:
            t1 = (hi_u - lo_u) // BSTEP
    return t0, t1


@triton.jit
def _walk_step(t, lo, lo_u, hi_u, n_full, p_l, IDX_F, IDX_P, MID_P,
               MASKED: tl.constexpr, SPARSE: tl.constexpr, BS_OTHER: tl.constexpr, BSTEP: tl.constexpr):
    """Step ``t`` of a phase: (tile start on the other axis, its block origin, partial-mask id or -1).
    Interior steps take the interior tiles / full blocks; boundary steps the tiles left of the interior,
    then those right of it / the partial blocks (and the full ones too under ALL_MASKED)."""
    if SPARSE:
        SUB: tl.constexpr = BS_OTHER // BSTEP
        e = t // SUB
        if MASKED:
            is_full = e < n_full
            i_blk = tl.load(IDX_F + p_l + e, mask=is_full, other=0) + \
                tl.load(IDX_P + p_l + (e - n_full), mask=e >= n_full, other=0)
            i_mid = tl.where(is_full, -1, tl.load(MID_P + p_l + (e - n_full), mask=e >= n_full, other=0))
        else:
            i_blk = tl.load(IDX_F + p_l + e)
            i_mid = -1
        return i_blk * BS_OTHER + (t % SUB) * BSTEP, i_blk * BS_OTHER, i_mid
    else:
        if MASKED:
            n_left = (lo_u - lo) // BSTEP
            return tl.where(t < n_left, lo + t * BSTEP, hi_u + (t - n_left) * BSTEP), 0, -1
        return lo_u + t * BSTEP, 0, -1


@triton.jit
def _load_tile(P, row0, s_n, o_r, o_c, n_rows, n_cols, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows ``row0 + o_r`` x columns ``o_c`` of a row-major slice with row stride ``s_n`` (64-bit row base,
    32-bit offsets inside the tile), zero-filled past ``n_rows`` (ROWS) / ``n_cols`` (COLS); interior
    steps of a head dim that is a power of two load with no mask at all."""
    p = P + row0.to(tl.int64) * s_n + (o_r[:, None] * s_n + o_c[None, :])
    if ROWS:
        if COLS:
            return tl.load(p, mask=((row0 + o_r) < n_rows)[:, None] & (o_c < n_cols)[None, :], other=0.0)
        return tl.load(p, mask=((row0 + o_r) < n_rows)[:, None], other=0.0)
    if COLS:
        return tl.load(p, mask=(o_c < n_cols)[None, :], other=0.0)
    return tl.load(p)


@triton.jit
def _tile_ptrs(P, i_b64, s_b, i_h, s_h, row0, s_n, o_r, o_c):
    """Pointers of the tile rows ``row0 + o_r`` x columns ``o_c`` of head ``i_h`` of batch ``i_b64`` in a
    (B, H, N, D) tensor: 64-bit scalar base, 32-bit offsets inside the tile."""
    return P + i_b64 * s_b + i_h.to(tl.int64) * s_h + row0.to(tl.int64) * s_n + (o_r[:, None] * s_n + o_c[None, :])


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    if DOT_F32:  # interpreter: bf16 tl.dot is wrong there (triton#11584)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_and_score(
    b_a, X, Y, start, s_xn, s_yn, Nt, qk_scale, i_q, i_k, Nq, Nk, left, right,
    p_bias, sb_m, sb_n, EMASK, i_mid, q0, k0,
    BA: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, DESC: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, xa, MOD: tl.constexpr, SWAP: tl.constexpr = False,
):
    """The tile body of every kernel: load the step's rows of X [BT, BD] and Y [BT, BDV] (k / v for the
    forward and dQ, q / dO for dK/dV) and score ``b_a @ X^T`` [BA, BT] (SWAP: ``X @ b_a^T`` [BT, BA], the
    step's rows along the MMA's M). Boundary steps (MASKED) return the
    scores scaled to the log2 domain with every mask applied (``i_q`` / ``i_k`` orient it, see
    :func:`_mask_scores`); interior steps return the raw dot product, scaled by the caller inside its
    exp2 (one FFMA, see :func:`_exp2_sub`). DESC: X / Y are tensor descriptors (TMA on Hopper; interior
    steps only, see :func:`_sources`)."""
    if DESC:
        b_x = X.load([start, 0])  # [BT, BD]
        b_y = Y.load([start, 0])  # [BT, BDV]
    else:
        o_r = tl.arange(0, BT)
        b_x = _load_tile(X, start, s_xn, o_r, tl.arange(0, BLOCK_D), Nt, D, MASKED, D < BLOCK_D)  # [BT, BD]
        b_y = _load_tile(Y, start, s_yn, o_r, tl.arange(0, BLOCK_DV), Nt, DV, MASKED, DV < BLOCK_DV)  # [BT, BDV]
    if SWAP:
        b_s = _dot(b_x, tl.trans(b_a), tl.zeros([BT, BA], dtype=tl.float32), DOT_F32, PREC)  # [BT, BA]
    else:
        b_s = _dot(b_a, tl.trans(b_x), tl.zeros([BA, BT], dtype=tl.float32), DOT_F32, PREC)  # [BA, BT]
    b_g = 1.0
    if MOD is not None:  # score mods: every step (interior too) returns scaled, modified scores (see _score_mod)
        b_s, b_g = _score_mod(b_s * qk_scale, i_q, i_k, Nq, Nk, xa, MOD)
        qk_scale = 1.0
    if MASKED:
        b_s = _mask_scores(b_s * qk_scale, i_q, i_k, Nq, Nk, left, right, p_bias, sb_m, sb_n,
                           EMASK + tl.maximum(i_mid, 0).to(tl.int64) * (BSQ * BSK), i_mid, q0, k0,
                           WINDOWED, SPARSE, BIAS, BSK)
    return b_x, b_y, b_s, b_g


@triton.jit
def _sources(X, Y, N, s_xn, s_yn, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr):
    """What interior steps load X [N, D] / Y [N, DV] (one head, row stride s_xn / s_yn) from: tensor
    descriptors of [BT, BLOCK_D] / [BT, BLOCK_DV] blocks with TMA (zero-filled past N rows / D columns),
    else the pointers themselves."""
    if TMA:
        return (tl.make_tensor_descriptor(X, shape=[N, D], strides=[s_xn, 1], block_shape=[BT, BLOCK_D]),
                tl.make_tensor_descriptor(Y, shape=[N, DV], strides=[s_yn, 1], block_shape=[BT, BLOCK_DV]))
    else:
        return X, Y


@triton.jit
def _exp2_sub(b_s, m, qk_scale, MASKED: tl.constexpr):
    """exp2(scores - m) of a tile from :func:`_load_and_score` (``m`` broadcast by the caller)."""
    if MASKED:
        return tl.math.exp2(b_s - m)
    return tl.math.exp2(b_s * qk_scale - m)


# ----------------------------------------------------------------------------------------------------
# Score mods and dropout: constexpr variants of the tile body. ``MOD`` is None (plain: nothing below is
# compiled in) or the tuple (fn, grad_fn, number of extra tensors, SOFTCAP, ALIBI); ``xa`` is the
# per-(batch, head) tuple built by :func:`_mod_args`.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mod_args(i_b, i_h, SLOPES, sl_b, sl_h, softcap, T0, T1, RNG, p_drop, rp,
              MOD: tl.constexpr, DROPOUT: tl.constexpr):
    """(b, h, ALiBi slope of the head, softcap, extra tensors T0 / T1, Philox seed, offset, p, 1 / (1 - p))
    of a program's (batch, query head): the slope and the seed / offset are loaded only when used."""
    slope = 0.0
    seed = 0
    rng_off = 0
    if MOD is not None:
        if MOD[4]:
            slope = tl.load(SLOPES + i_b.to(tl.int64) * sl_b + i_h * sl_h)
    if DROPOUT:  # device-side seed / offset: no host sync, CUDA-graph safe
        seed = tl.load(RNG)
        rng_off = (tl.load(RNG + 1) & 0xFFFFFFFF).to(tl.uint32)
    return i_b, i_h, slope, softcap, T0, T1, seed, rng_off, p_drop, rp


@triton.jit
def _tanh(x):
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _score_mod(s2, i_q, i_k, Nq, Nk, xa, MOD: tl.constexpr):
    """Score mods of a scaled score tile ``s2`` (log2 domain; ``i_q`` / ``i_k`` broadcastable index tiles
    in either orientation, see :func:`_mask_scores`), before masking, in the natural domain ``s = s2 ln2``:
    the user's ``fn(s, b, h, q_idx, kv_idx, *tensors)``, then ALiBi ``s - slope_h |i + Nk - Nq - j|``, then
    the soft-cap ``c tanh(s / c)``. Returns the modified log2-domain scores and ds'/ds (the user's
    ``grad_fn`` times the soft-cap's 1 - tanh^2; the forward never uses it, so it compiles away there)."""
    i_b, i_h, slope, softcap, T0, T1, seed, rng_off, p_drop, rp = xa
    FN: tl.constexpr = MOD[0]
    GRAD: tl.constexpr = MOD[1]
    NT: tl.constexpr = MOD[2]
    s = s2 * 0.6931471805599453
    g = 1.0
    if FN is not None:
        if NT == 0:
            if GRAD is not None:
                g = GRAD(s, i_b, i_h, i_q, i_k)
            s = FN(s, i_b, i_h, i_q, i_k)
        elif NT == 1:
            if GRAD is not None:
                g = GRAD(s, i_b, i_h, i_q, i_k, T0)
            s = FN(s, i_b, i_h, i_q, i_k, T0)
        else:
            if GRAD is not None:
                g = GRAD(s, i_b, i_h, i_q, i_k, T0, T1)
            s = FN(s, i_b, i_h, i_q, i_k, T0, T1)
    if MOD[4]:  # ALiBi (FlashAttention's bottom-right aligned distance)
        s = s - slope * tl.abs(i_q + (Nk - Nq) - i_k).to(tl.float32)
    if MOD[3]:  # soft-cap (Gemma-2: after the other mods, before the masks); a -inf (masked) score stays -inf
        t = _tanh(s / softcap)
        s = tl.where(s == float("-inf"), s, softcap * t)
        g = g * (1.0 - t * t)
    return s * 1.4426950408889634, g


@triton.jit
def _mod_chain(b_ds, b_p, b_g):
    """Chain rule through the score mod: dS * ds'/ds, and 0 wherever p = 0 (masked or -inf scores, whose
    derivative a user function may leave undefined)."""
    return tl.where(b_p == 0.0, 0.0, b_ds * b_g)


@triton.jit
def _dropout_keep(i_q, i_k, xa):
    """Dropout keep mask of the tile (i_q x i_k broadcast, either orientation): Philox (``tl.rand``'s
    generator) with key ``seed`` and counter (i, j, b * 2^16 + h, offset); kept iff uniform >= p. Every
    kernel regenerates the same bits for the same (i, j), whatever its tile shape."""
    i_b, i_h, slope, softcap, T0, T1, seed, rng_off, p_drop, rp = xa
    z = i_q * 0 + i_k * 0
    r = tl.philox(seed, i_q + z, i_k + z, z + (i_b * 65536 + i_h), z.to(tl.uint32) + rng_off)
    return tl.uint_to_uniform_float(r[0]) >= p_drop


@triton.jit
def _dropped(x, keep, xa):
    """Kept entries of ``x`` scaled by 1 / (1 - p), dropped ones 0."""
    i_b, i_h, slope, softcap, T0, T1, seed, rng_off, p_drop, rp = xa
    return tl.where(keep, x * rp, 0.0)


@triton.jit
def _dropout_mask_kernel(
    OUT, RNG, B, H, Nq, Nk, left, right, p_drop, s_ob, s_oh, s_om,
    WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The keep mask the attention kernels use (and-ed with causal / window visibility), as uint8."""
    n_n = tl.cdiv(Nk, BLOCK_N)  # grid (query x key tiles, head, batch): each axis within CUDA's limits
    i_m, i_n, i_h, i_b = tl.program_id(0) // n_n, tl.program_id(0) % n_n, tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xa = _mod_args(i_b, i_h, RNG, 0, 0, 0.0, RNG, RNG, RNG, p_drop, 1.0, None, True)
    b_keep = _dropout_keep(o_m[:, None], o_n[None, :], xa)
    b_vis = _mask_scores(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), o_m[:, None], o_n[None, :], Nq, Nk,
                         left, right, RNG, 0, 0, RNG, -1, 0, 0, WINDOWED, False, 0, 1) == 0.0
    p = OUT + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + o_m[:, None].to(tl.int64) * s_om + o_n[None, :]
    tl.store(p, (b_keep & b_vis).to(tl.uint8), mask=(o_m[:, None] < Nq) & (o_n[None, :] < Nk))


@triton.jit
def _query_program(
    Q, K, V, BIAS_PTR, i_m, i_bh, H, G, Nq, s_qb, s_qh, s_qn, s_kb, s_kh, s_vb, s_vh, sb_b, sb_h,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Prologue of a program owning query tile ``i_m`` of (batch, head) ``i_bh`` (forward and dQ):
    indices, row offsets, the K / V / mask bases of its (GQA) head, and the query tile [BM, BD]."""
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    o_r = tl.arange(0, BLOCK_M)
    o_m = i_m * BLOCK_M + o_r
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_row = o_m < Nq
    i_b64 = i_b.to(tl.int64)
    K += i_b64 * s_kb + i_hk.to(tl.int64) * s_kh
    V += i_b64 * s_vb + i_hk.to(tl.int64) * s_vh
    p_bias = BIAS_PTR + i_b64 * sb_b + i_h.to(tl.int64) * sb_h
    b_q = _load_tile(Q + i_b64 * s_qb + i_h.to(tl.int64) * s_qh, i_m * BLOCK_M, s_qn, o_r, o_d, Nq, D,
                     True, D < BLOCK_D)  # [BM, BD]
    return i_b, i_h, i_b64, o_r, o_m, o_d, o_dv, m_row, K, V, p_bias, b_q


@triton.jit
def _varlen_program(CU_A, CU_B, slot, n_seq, N_A, N_B, BT: tl.constexpr):
    """VARLEN: the program at ``slot`` of the packed tile space along axis A (queries for the forward and
    dQ, keys for dK/dV), as (tile of its sequence, A row start, A length, B row start, B length). Sequence b
    owns the slots [CU_A[b] // BT + b, CU_A[b + 1] // BT + b + 1): at least cdiv(len_b, BT) of them, so
    N_A // BT + n_seq slots hold every tile of every sequence with no padding to the longest one (a
    sequence leaves at most one slot idle). The sequence comes from a binary search over the slot starts,
    which increase with b. Row ranges are clamped into [0, N_A] / [0, N_B], so unchecked cu_seqlens never
    make a program read outside the packed tensors."""
    lo = n_seq * 0
    hi = n_seq
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go = tl.load(CU_A + mid) // BT + mid <= slot
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    c_a = tl.load(CU_A + lo)
    a0 = tl.minimum(tl.maximum(c_a, 0), N_A)
    a1 = tl.minimum(tl.maximum(tl.load(CU_A + lo + 1), a0), N_A)
    b0 = tl.minimum(tl.maximum(tl.load(CU_B + lo), 0), N_B)
    b1 = tl.minimum(tl.maximum(tl.load(CU_B + lo + 1), b0), N_B)
    return slot - (c_a // BT + lo), a0, a1 - a0, b0, b1 - b0


@triton.jit
def _key_step(
    t, b_q, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right, p_bias, sb_m, sb_n, EMASK, q0,
    lo, lo_u, hi_u, n_full, p_l, IDX_F, IDX_P, MID_P, TBL, n_pages, s_kp, s_vp, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, DESC: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, xa, MOD: tl.constexpr,
):
    """Step ``t`` of a query program's key walk (forward and dQ): the key tile's K [BN, BD], V [BN, BDV]
    and scores [BM, BN] (see :func:`_load_and_score`). PAGE > 0: K / V are a paged cache whose pages the
    block-table row TBL names (page stride s_kp / s_vp); a step's rows lie in one page (steps divide PAGE),
    whose id is clamped into [0, n_pages) so a bad table never reads outside the cache."""
    start_n, k0, i_mid = _walk_step(t, lo, lo_u, hi_u, n_full, p_l, IDX_F, IDX_P, MID_P,
                                    MASKED, SPARSE, BSK, BLOCK_N)
    if PAGE > 0:
        i_pg = tl.minimum(tl.maximum(tl.load(TBL + start_n // PAGE), 0), n_pages - 1).to(tl.int64)
        d_n = (start_n % PAGE - start_n).to(tl.int64)  # _load_tile adds start_n rows back
        K = K + i_pg * s_kp + d_n * s_kn
        V = V + i_pg * s_vp + d_n * s_vn
    o_n = start_n + tl.arange(0, BLOCK_N)
    b_k, b_v, b_s, b_g = _load_and_score(
        b_q, K, V, start_n, s_kn, s_vn, Nk, qk_scale, o_m[:, None], o_n[None, :], Nq, Nk, left, right,
        p_bias, sb_m, sb_n, EMASK, i_mid, q0, k0, BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, MASKED, DESC,
        WINDOWED, SPARSE, BIAS, BSQ, BSK, DOT_F32, PREC, xa, MOD)
    return b_k, b_v, b_s, b_g, o_n


# ----------------------------------------------------------------------------------------------------
# Forward: one program per (query tile, batch * query head, key split)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_steps(
    acc, m_i, l_i, b_q, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right,
    p_bias, sb_m, sb_n, EMASK, q0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, IDX_F, IDX_P, MID_P,
    TBL, n_pages, s_kp, s_vp, PAGE: tl.constexpr, ALL_MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, DESC: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, xa, MOD: tl.constexpr, DROPOUT: tl.constexpr,
    WS: tl.constexpr = False,
):
    """Steps [t0, t1) of the forward walk: online softmax in the log2 domain (l_i and the LSE of the
    pre-dropout probabilities; DROPOUT drops them before the PV product). WS: the one walk of a
    warp-specialized dense program (see _attn_fwd): every key tile, keys past Nk masked in each step."""
    SCALED: tl.constexpr = MASKED or (MOD is not None)  # scores come scaled (see _load_and_score)
    t0, t1 = _walk_range(lo, lo_u, hi_u, hi, n_full, n_part, MASKED, SPARSE, ALL_MASKED, BSK, BLOCK_N)
    for t in tl.range(t0, t1, warp_specialize=WS):
        b_k, b_v, b_s, b_g, o_n = _key_step(  # [BN, BD], [BN, BDV], [BM, BN]
            t, b_q, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right, p_bias, sb_m, sb_n, EMASK, q0,
            lo, lo_u, hi_u, n_full, p_l, IDX_F, IDX_P, MID_P, TBL, n_pages, s_kp, s_vp, PAGE,
            BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, MASKED, DESC, WINDOWED, SPARSE, BIAS, BSQ, BSK, DOT_F32, PREC,
            xa, MOD)
        if WS:  # the last key tile may be partial (TMA zero-fills its rows; their scores must not count)
            b_s = tl.where(o_n[None, :] < Nk, b_s, float("-inf"))
        if SCALED:
            m_new = tl.maximum(m_i, tl.max(b_s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
            m_use = m_new
        b_p = _exp2_sub(b_s, m_use[:, None], qk_scale, SCALED)  # [BM, BN]
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        if DROPOUT:
            b_p = _dropped(b_p, _dropout_keep(o_m[:, None], o_n[None, :], xa), xa)
        acc = _dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], DOT_F32, PREC)  # [BM, BDV]
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, BIAS_PTR,
    KV_NUM_F, KV_IDX_F, KV_NUM_P, KV_IDX_P, KV_MID_P, EMASK, VISITS,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    sb_b, sb_h, sb_m, sb_n,
    sn_b, sn_h, si_b, si_h, si_m,
    H, G, Nq, Nk, qk_scale, left, right,
    split_keys, s_os, s_ls,
    N_BUCKET_Q, N_BUCKET_K, CU_Q, CU_K, n_seq, SEQLENS, n_new, TBL, s_tb, n_pages, s_kp, s_vp,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    COUNT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, NEG_SCALE: tl.constexpr,
    VARLEN: tl.constexpr, KVCACHE: tl.constexpr, PAGE: tl.constexpr, PACK_GQA: tl.constexpr,
    SLOPES, sl_b, sl_h, softcap, MOD_T0, MOD_T1, RNG, p_drop, rp,
    MOD: tl.constexpr, DROPOUT: tl.constexpr, WS: tl.constexpr = False,
):
    # WS (dense, TMA, 4 warps x 128 query rows): Hopper automatic warp specialization of the key walk (a TMA
    # producer warp group and two consumer warp groups). Triton's pass takes a kernel whose loads are all
    # descriptor loads and which has a single loop, so q comes through a descriptor and one walk covers
    # every key tile with the key bound masked (no separate boundary phase).
    # program (query tile, batch * head, key split); the last query tiles (the heaviest under a causal
    # mask) start first. Split-KV decoding writes per-split partial (O, LSE) at split strides s_os / s_ls,
    # combined by the launcher.
    # grid (query tile, head, batch * key split): heads and batches on axes 1 / 2 (each < 65536)
    n_sp = tl.cdiv(tl.maximum(Nk, 1), split_keys)
    i_m, i_sp = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(2) % n_sp
    i_bh = (tl.program_id(2) // n_sp) * H + tl.program_id(1)
    O += i_sp.to(tl.int64) * s_os
    LSE += i_sp.to(tl.int64) * s_ls
    i_slot, s_lh = i_m, Nq  # program slot (visit counter), LSE head stride
    if VARLEN:  # packed sequences: this slot's sequence and tile; its rows start at q_beg / k_beg
        i_m, q_beg, Nq, k_beg, Nk = _varlen_program(CU_Q, CU_K, i_slot, n_seq, Nq, Nk, BLOCK_M)
        if (i_m < 0) | (i_m * BLOCK_M >= Nq):
            return
        Q += q_beg.to(tl.int64) * s_qn
        O += q_beg.to(tl.int64) * s_on
        LSE += q_beg
        K += k_beg.to(tl.int64) * s_kn
        V += k_beg.to(tl.int64) * s_vn
    if PACK_GQA:  # GQA decoding: the program owns packed rows r = position * G + (query head in the group)
        # of one kv head (grid axis 1), so each K / V tile is read once for all G heads of the group
        i_b, i_hk = tl.program_id(2) // n_sp, tl.program_id(1)
        i_b64 = i_b.to(tl.int64)
        o_r = tl.arange(0, BLOCK_M)
        o_m = (i_m * BLOCK_M + o_r) // G  # query position of each row
        o_hq = (i_hk * G + (i_m * BLOCK_M + o_r) % G).to(tl.int64)  # query head of each row
        o_d = tl.arange(0, BLOCK_D)
        o_dv = tl.arange(0, BLOCK_DV)
        m_row = o_m < Nq
        i_h = i_hk * G
        K += i_b64 * s_kb + i_hk.to(tl.int64) * s_kh
        V += i_b64 * s_vb + i_hk.to(tl.int64) * s_vh
        p_bias = BIAS_PTR
        b_q = tl.load(Q + i_b64 * s_qb + (o_hq * s_qh + o_m.to(tl.int64) * s_qn)[:, None] + o_d[None, :],
                      mask=m_row[:, None] & (o_d[None, :] < D), other=0.0)  # [BM, BD]
        w_start, w_end = (i_m * BLOCK_M) // G, tl.minimum(((i_m + 1) * BLOCK_M - 1) // G + 1, Nq)
    else:
        i_b, i_h, i_b64, o_r, o_m, o_d, o_dv, m_row, K, V, p_bias, b_q = _query_program(
            Q, K, V, BIAS_PTR, i_m, i_bh, H, G, Nq, s_qb, s_qh, s_qn, s_kb, s_kh, s_vb, s_vh, sb_b, sb_h,
            D, BLOCK_D, BLOCK_DV, BLOCK_M)
        w_start, w_end = i_m * BLOCK_M, Nq  # query rows the walk plans for
        if WS:  # (TMA zero-fills rows past Nq; the pointer load above is then dead code)
            b_q = tl.make_tensor_descriptor(Q + i_b64 * s_qb + i_h.to(tl.int64) * s_qh, shape=[Nq, D],
                                            strides=[s_qn, 1], block_shape=[BLOCK_M, BLOCK_D]).load([i_m * BLOCK_M, 0])
    if KVCACHE:  # keys: the first cache_seqlens[b] + n_new rows of the cache, clamped to its capacity Nk
        Nk = tl.minimum(tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), Nk) + n_new, Nk)
        TBL += i_b64 * s_tb
    if NEG_SCALE:  # the scale's sign goes into q: interior steps need qk_scale >= 0 (max(s) * qk_scale)
        if DOT_F32:  # interpreter with bf16: its bf16 negation is wrong; negate in fp32 (exact) instead
            b_q = (0.0 - b_q.to(tl.float32)).to(b_q.dtype)
        else:
            b_q = -b_q
    xa = _mod_args(i_b, i_h, SLOPES, sl_b, sl_h, softcap, MOD_T0, MOD_T1, RNG, p_drop, rp, MOD, DROPOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, lo_u, hi_u, hi, n_full, n_part, p_l = _walk_setup(
        w_start, BLOCK_M, BLOCK_N, w_end, Nk, Nk - Nq, -left, right, KV_NUM_F, KV_NUM_P, i_b, i_h,
        sn_b, sn_h, si_b, si_h, si_m, SPARSE, BIAS != 0, BSQ, i_sp * split_keys, (i_sp + 1) * split_keys)
    q0 = (i_m * BLOCK_M // BSQ) * BSQ
    k_src, v_src = _sources(K, V, Nk, s_kn, s_vn, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, TMA)
    if WS:  # one walk over every key tile (see WS above)
        lo_u = lo
        hi_u = hi
    acc, m_i, l_i = _fwd_steps(  # interior tiles: no masks
        acc, m_i, l_i, b_q, k_src, v_src, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right,
        p_bias, sb_m, sb_n, EMASK, q0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, KV_IDX_F, KV_IDX_P, KV_MID_P,
        TBL, n_pages, s_kp, s_vp, PAGE,
        BIAS != 0, BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, False, TMA, WINDOWED, SPARSE, BIAS, BSQ, BSK,
        DOT_F32, PREC, xa, MOD, DROPOUT, WS)
    if not WS:
        acc, m_i, l_i = _fwd_steps(  # boundary tiles (BLOCK_B keys a step): bounds, window, element / bias masks
            acc, m_i, l_i, b_q, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right,
            p_bias, sb_m, sb_n, EMASK, q0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, KV_IDX_F, KV_IDX_P, KV_MID_P,
            TBL, n_pages, s_kp, s_vp, PAGE,
            BIAS != 0, BLOCK_M, BLOCK_B, D, DV, BLOCK_D, BLOCK_DV, True, False, WINDOWED, SPARSE, BIAS, BSQ, BSK,
            DOT_F32, PREC, xa, MOD, DROPOUT)
    if COUNT:  # debug: steps this program ran (interior, boundary)
        p_c = VISITS + (i_bh.to(tl.int64) * tl.num_programs(0) + i_slot) * 2
        tl.store(p_c, _walk_range(lo, lo_u, hi_u, hi, n_full, n_part, False, SPARSE, BIAS != 0, BSK, BLOCK_N)[1])
        t0, t1 = _walk_range(lo, lo_u, hi_u, hi, n_full, n_part, True, SPARSE, BIAS != 0, BSK, BLOCK_B)
        tl.store(p_c + 1, t1 - t0)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if PACK_GQA:
        tl.store(O + i_b64 * s_ob + (o_hq * s_oh + o_m.to(tl.int64) * s_on)[:, None] + o_dv[None, :],
                 b_o.to(O.dtype.element_ty), mask=m_row[:, None] & (o_dv[None, :] < DV))
        tl.store(LSE + (i_b64 * H + o_hq) * s_lh + o_m, b_lse, mask=m_row)
    else:
        tl.store(_tile_ptrs(O, i_b64, s_ob, i_h, s_oh, i_m * BLOCK_M, s_on, o_r, o_dv),
                 b_o.to(O.dtype.element_ty), mask=m_row[:, None] & (o_dv[None, :] < DV))
        tl.store(LSE + i_bh.to(tl.int64) * s_lh + o_m, b_lse, mask=m_row)


# ----------------------------------------------------------------------------------------------------
# Backward: dQ (one program per query tile, the same key-tile walk as the forward)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dq_steps(
    dq, b_q, b_do, b_lse2, b_delta, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right,
    p_bias, sb_m, sb_n, EMASK, q0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, IDX_F, IDX_P, MID_P, ALL_MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, DESC: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, NOLICM: tl.constexpr, xa, MOD: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Steps [t0, t1) of the dQ walk: dQ += (P * (dO V^T - Delta)) K. NOLICM (wide program tiles) keeps
    loop invariants inside the loop: hoisted, their long live ranges spilled around the loops. DROPOUT:
    dO V^T is masked and rescaled like P was; MOD: dS times the score mod's derivative."""
    SCALED: tl.constexpr = MASKED or (MOD is not None)
    t0, t1 = _walk_range(lo, lo_u, hi_u, hi, n_full, n_part, MASKED, SPARSE, ALL_MASKED, BSK, BLOCK_N)
    for t in tl.range(t0, t1, disable_licm=NOLICM):
        b_k, b_v, b_s, b_g, o_n = _key_step(  # [BN, BD], [BN, BDV], [BM, BN]
            t, b_q, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right, p_bias, sb_m, sb_n, EMASK, q0,
            lo, lo_u, hi_u, n_full, p_l, IDX_F, IDX_P, MID_P, K, 1, 0, 0, 0,
            BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, MASKED, DESC, WINDOWED, SPARSE, BIAS, BSQ, BSK, DOT_F32, PREC,
            xa, MOD)
        b_p = _exp2_sub(b_s, b_lse2[:, None], qk_scale, SCALED)  # [BM, BN]
        b_dp = _dot(b_do, tl.trans(b_v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_F32, PREC)
        if DROPOUT:
            b_dp = _dropped(b_dp, _dropout_keep(o_m[:, None], o_n[None, :], xa), xa)
        b_ds = b_p * (b_dp - b_delta[:, None])  # [BM, BN]
        if MOD is not None:
            b_ds = _mod_chain(b_ds, b_p, b_g)
        dq = _dot(b_ds.to(b_k.dtype), b_k, dq, DOT_F32, PREC)  # [BM, BD]
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, BIAS_PTR,
    KV_NUM_F, KV_IDX_F, KV_NUM_P, KV_IDX_P, KV_MID_P, EMASK,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don, s_dqb, s_dqh, s_dqn,
    sb_b, sb_h, sb_m, sb_n,
    sn_b, sn_h, si_b, si_h, si_m,
    H, G, Nq, Nk, qk_scale, scale, left, right,
    N_BUCKET_Q, N_BUCKET_K, CU_Q, CU_K, n_seq,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, VARLEN: tl.constexpr,
    SLOPES, sl_b, sl_h, softcap, MOD_T0, MOD_T1, RNG, p_drop, rp,
    MOD: tl.constexpr, DROPOUT: tl.constexpr,
):
    i_m, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(2) * H + tl.program_id(1)
    s_lh = Nq  # LSE / Delta head stride
    if VARLEN:  # packed sequences (see _attn_fwd)
        i_m, q_beg, Nq, k_beg, Nk = _varlen_program(CU_Q, CU_K, i_m, n_seq, Nq, Nk, BLOCK_M)
        if (i_m < 0) | (i_m * BLOCK_M >= Nq):
            return
        Q += q_beg.to(tl.int64) * s_qn
        DO += q_beg.to(tl.int64) * s_don
        DQ += q_beg.to(tl.int64) * s_dqn
        LSE += q_beg
        DELTA += q_beg
        K += k_beg.to(tl.int64) * s_kn
        V += k_beg.to(tl.int64) * s_vn
    i_b, i_h, i_b64, o_r, o_m, o_d, o_dv, m_row, K, V, p_bias, b_q = _query_program(
        Q, K, V, BIAS_PTR, i_m, i_bh, H, G, Nq, s_qb, s_qh, s_qn, s_kb, s_kh, s_vb, s_vh, sb_b, sb_h,
        D, BLOCK_D, BLOCK_DV, BLOCK_M)
    b_do = _load_tile(DO + i_b64 * s_dob + i_h.to(tl.int64) * s_doh, i_m * BLOCK_M, s_don, o_r, o_dv, Nq, DV,
                      True, DV < BLOCK_DV)  # [BM, BDV]
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * s_lh + o_m, mask=m_row, other=float("-inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)  # empty rows: p = 0
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * s_lh + o_m, mask=m_row, other=0.0)
    xa = _mod_args(i_b, i_h, SLOPES, sl_b, sl_h, softcap, MOD_T0, MOD_T1, RNG, p_drop, rp, MOD, DROPOUT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, lo_u, hi_u, hi, n_full, n_part, p_l = _walk_setup(
        i_m * BLOCK_M, BLOCK_M, BLOCK_N, Nq, Nk, Nk - Nq, -left, right, KV_NUM_F, KV_NUM_P, i_b, i_h,
        sn_b, sn_h, si_b, si_h, si_m, SPARSE, BIAS != 0, BSQ, 0, Nk)
    q0 = (i_m * BLOCK_M // BSQ) * BSQ
    k_src, v_src = _sources(K, V, Nk, s_kn, s_vn, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, TMA)
    dq = _dq_steps(
        dq, b_q, b_do, b_lse2, b_delta, k_src, v_src, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right,
        p_bias, sb_m, sb_n, EMASK, q0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, KV_IDX_F, KV_IDX_P, KV_MID_P,
        BIAS != 0, BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, False, TMA, WINDOWED, SPARSE, BIAS, BSQ, BSK,
        DOT_F32, PREC, BLOCK_M >= 128, xa, MOD, DROPOUT)
    dq = _dq_steps(
        dq, b_q, b_do, b_lse2, b_delta, K, V, s_kn, s_vn, o_m, qk_scale, Nq, Nk, left, right,
        p_bias, sb_m, sb_n, EMASK, q0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, KV_IDX_F, KV_IDX_P, KV_MID_P,
        BIAS != 0, BLOCK_M, BLOCK_B, D, DV, BLOCK_D, BLOCK_DV, True, False, WINDOWED, SPARSE, BIAS, BSQ, BSK,
        DOT_F32, PREC, BLOCK_M >= 128, xa, MOD, DROPOUT)
    tl.store(_tile_ptrs(DQ, i_b64, s_dqb, i_h, s_dqh, i_m * BLOCK_M, s_dqn, o_r, o_d),
             (dq * scale).to(DQ.dtype.element_ty), mask=m_row[:, None] & (o_d[None, :] < D))


# ----------------------------------------------------------------------------------------------------
# Backward: dK / dV (one program per key tile and kv head; walks the query tiles of every query head in
# its GQA group, so dK / dV are summed over the group without atomics)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _qvec(x, SWAP: tl.constexpr):
    """A per-query vector of a dK/dV score tile, broadcast along its keys: [BM, 1] (SWAP) or [1, BM]."""
    if SWAP:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _kvec(x, SWAP: tl.constexpr):
    """A per-key vector of a dK/dV score tile, broadcast along its queries: [1, BN] (SWAP) or [BN, 1]."""
    if SWAP:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _dkdv_steps(
    dk, dv, b_k, b_v, Qh, DOh, LSEh, DELTAh, s_qn, s_don, o_n, qk_scale, Nq, Nk, left, right,
    p_bias, sb_m, sb_n, EMASK, k0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, IDX_F, IDX_P, MID_P, ALL_MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, DESC: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, NOLICM: tl.constexpr, xa, MOD: tl.constexpr, DROPOUT: tl.constexpr,
    SWAP: tl.constexpr,
):
    """Steps [t0, t1) of the dK/dV walk over the query tiles of one query head (DROPOUT / MOD as in
    :func:`_dq_steps`). Score tiles are [BN, BM] (keys along the MMA's M, the program's key tile) or, SWAP,
    [BM, BN] (the step's queries along M: a wide query step keeps 64 rows per warpgroup in the S / dP
    products when the key tile is narrow), and then the accumulators are transposed, dK^T [BD, BN] and
    dV^T [BDV, BN] (head dim along M): P and dS enter those products as B operands, from shared memory,
    instead of as register A operands, which a transposed P would need (d256 does not fit that).)"""
    SCALED: tl.constexpr = MASKED or (MOD is not None)
    t0, t1 = _walk_range(lo, lo_u, hi_u, hi, n_full, n_part, MASKED, SPARSE, ALL_MASKED, BSQ, BLOCK_M)
    for t in tl.range(t0, t1, disable_licm=NOLICM):
        start_m, q0, i_mid = _walk_step(t, lo, lo_u, hi_u, n_full, p_l, IDX_F, IDX_P, MID_P,
                                        MASKED, SPARSE, BSQ, BLOCK_M)
        o_m = start_m + tl.arange(0, BLOCK_M)
        if MASKED:
            b_lse = tl.load(LSEh + o_m, mask=o_m < Nq, other=float("-inf"))
            b_delta = tl.load(DELTAh + o_m, mask=o_m < Nq, other=0.0)
        else:
            b_lse = tl.load(LSEh + o_m)
            b_delta = tl.load(DELTAh + o_m)
        b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
        b_q, b_do, b_st, b_gt = _load_and_score(  # [BM, BD], [BM, BDV], scores
            b_k, Qh, DOh, start_m, s_qn, s_don, Nq, qk_scale, _qvec(o_m, SWAP), _kvec(o_n, SWAP), Nq, Nk,
            left, right, p_bias, sb_m, sb_n, EMASK, i_mid, q0, k0, BLOCK_N, BLOCK_M, D, DV, BLOCK_D, BLOCK_DV,
            MASKED, DESC, WINDOWED, SPARSE, BIAS, BSQ, BSK, DOT_F32, PREC, xa, MOD, SWAP)
        b_pt = _exp2_sub(b_st, _qvec(b_lse2, SWAP), qk_scale, SCALED)
        b_ptd = b_pt
        if DROPOUT:  # the same (i, j) keys as the forward / dQ
            b_keep = _dropout_keep(_qvec(o_m, SWAP), _kvec(o_n, SWAP), xa)
            b_ptd = _dropped(b_pt, b_keep, xa)
        if SWAP:  # dV^T += dO^T P: P is the B operand (shared memory), dO^T a view of the loaded tile
            dv = _dot(tl.trans(b_do), b_ptd.to(b_do.dtype), dv, DOT_F32, PREC)  # [BDV, BN]
            b_dpt = _dot(b_do, tl.trans(b_v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_F32, PREC)
        else:
            dv = _dot(b_ptd.to(b_do.dtype), b_do, dv, DOT_F32, PREC)  # [BN, BDV]
            b_dpt = _dot(b_v, tl.trans(b_do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_F32, PREC)
        if DROPOUT:
            b_dpt = _dropped(b_dpt, b_keep, xa)
        b_dst = b_pt * (b_dpt - _qvec(b_delta, SWAP))
        if MOD is not None:
            b_dst = _mod_chain(b_dst, b_pt, b_gt)
        if SWAP:
            dk = _dot(tl.trans(b_q), b_dst.to(b_q.dtype), dk, DOT_F32, PREC)  # [BD, BN]
        else:
            dk = _dot(b_dst.to(b_q.dtype), b_q, dk, DOT_F32, PREC)  # [BN, BD]
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV_PTR, LSE, DELTA, BIAS_PTR,
    Q_NUM_F, Q_IDX_F, Q_NUM_P, Q_IDX_P, Q_MID_P, EMASK,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
    s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
    sb_b, sb_h, sb_m, sb_n,
    sn_b, sn_h, si_b, si_h, si_m,
    H, G, Nq, Nk, qk_scale, scale, left, right,
    N_BUCKET_Q, N_BUCKET_K, n_bhk, CU_Q, CU_K, n_seq,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SWAP: tl.constexpr,
    WINDOWED: tl.constexpr, SPARSE: tl.constexpr, BIAS: tl.constexpr, BSQ: tl.constexpr, BSK: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, VARLEN: tl.constexpr,
    SLOPES, sl_b, sl_h, softcap, MOD_T0, MOD_T1, RNG, p_drop, rp,
    MOD: tl.constexpr, DROPOUT: tl.constexpr,
):
    # grid (key tile, Y, Z), (batch, kv head) = Y * pid(2) + pid(1); programs past the end (only when
    # B * Hkv > 65535) redo the last one and store the same values. SWAP: score tiles [BM, BN] and
    # transposed accumulators (see _dkdv_steps)
    i_n = tl.program_id(0)
    Hkv = H // G
    i_bhk = tl.minimum(tl.program_id(2) * tl.num_programs(1) + tl.program_id(1), n_bhk - 1)
    i_b, i_hk = i_bhk // Hkv, i_bhk % Hkv
    s_lh = Nq  # LSE / Delta head stride
    if VARLEN:  # packed sequences: this slot's sequence and key tile (see _attn_fwd)
        i_n, k_beg, Nk, q_beg, Nq = _varlen_program(CU_K, CU_Q, i_n, n_seq, Nk, Nq, BLOCK_N)
        if (i_n < 0) | (i_n * BLOCK_N >= Nk):
            return
        K += k_beg.to(tl.int64) * s_kn
        V += k_beg.to(tl.int64) * s_vn
        DK += k_beg.to(tl.int64) * s_dkn
        DV_PTR += k_beg.to(tl.int64) * s_dvn
        Q += q_beg.to(tl.int64) * s_qn
        DO += q_beg.to(tl.int64) * s_don
        LSE += q_beg
        DELTA += q_beg
    o_r = tl.arange(0, BLOCK_N)
    o_n = i_n * BLOCK_N + o_r
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_n = o_n < Nk
    i_b64 = i_b.to(tl.int64)
    b_k = _load_tile(K + i_b64 * s_kb + i_hk.to(tl.int64) * s_kh, i_n * BLOCK_N, s_kn, o_r, o_d, Nk, D,
                     True, D < BLOCK_D)  # [BN, BD]
    b_v = _load_tile(V + i_b64 * s_vb + i_hk.to(tl.int64) * s_vh, i_n * BLOCK_N, s_vn, o_r, o_dv, Nk, DV,
                     True, DV < BLOCK_DV)  # [BN, BDV]
    if SWAP:  # transposed accumulators dK^T [BD, BN], dV^T [BDV, BN] (see _dkdv_steps)
        dk = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dv = tl.zeros([BLOCK_DV, BLOCK_N], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    k0 = (i_n * BLOCK_N // BSK) * BSK
    for g in range(0, G):
        i_h = i_hk * G + g
        i_h64 = i_h.to(tl.int64)
        Qh = Q + i_b64 * s_qb + i_h64 * s_qh
        DOh = DO + i_b64 * s_dob + i_h64 * s_doh
        LSEh = LSE + (i_b64 * H + i_h64) * s_lh
        DELTAh = DELTA + (i_b64 * H + i_h64) * s_lh
        p_bias = BIAS_PTR + i_b64 * sb_b + i_h64 * sb_h
        xa = _mod_args(i_b, i_h, SLOPES, sl_b, sl_h, softcap, MOD_T0, MOD_T1, RNG, p_drop, rp, MOD, DROPOUT)
        # query i sees key j iff -right <= i - j - (Nq - Nk) <= left
        lo, lo_u, hi_u, hi, n_full, n_part, p_l = _walk_setup(
            i_n * BLOCK_N, BLOCK_N, BLOCK_M, Nk, Nq, Nq - Nk, -right, left, Q_NUM_F, Q_NUM_P, i_b, i_h,
            sn_b, sn_h, si_b, si_h, si_m, SPARSE, BIAS != 0, BSK, 0, Nq)
        q_src, do_src = _sources(Qh, DOh, Nq, s_qn, s_don, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, TMA)
        dk, dv = _dkdv_steps(
            dk, dv, b_k, b_v, q_src, do_src, LSEh, DELTAh, s_qn, s_don, o_n, qk_scale, Nq, Nk, left, right,
            p_bias, sb_m, sb_n, EMASK, k0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, Q_IDX_F, Q_IDX_P, Q_MID_P,
            BIAS != 0, BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, False, TMA, WINDOWED, SPARSE, BIAS, BSQ, BSK,
            DOT_F32, PREC, (BLOCK_N >= 128) or SWAP, xa, MOD, DROPOUT, SWAP)
        DESC_B: tl.constexpr = TMA and SWAP and (BLOCK_B == BLOCK_M)
        if DESC_B:  # swapped tiles' boundary steps as wide as interior ones: the same descriptors
            q_b, do_b = q_src, do_src  # (TMA zero-fills rows past Nq)
        else:
            q_b, do_b = Qh, DOh
        dk, dv = _dkdv_steps(
            dk, dv, b_k, b_v, q_b, do_b, LSEh, DELTAh, s_qn, s_don, o_n, qk_scale, Nq, Nk, left, right,
            p_bias, sb_m, sb_n, EMASK, k0, lo, lo_u, hi_u, hi, n_full, n_part, p_l, Q_IDX_F, Q_IDX_P, Q_MID_P,
            BIAS != 0, BLOCK_B, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, True, DESC_B, WINDOWED, SPARSE, BIAS, BSQ, BSK,
            DOT_F32, PREC, (BLOCK_N >= 128) or SWAP, xa, MOD, DROPOUT, SWAP)
    if SWAP:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    tl.store(_tile_ptrs(DK, i_b64, s_dkb, i_hk, s_dkh, i_n * BLOCK_N, s_dkn, o_r, o_d),
             (dk * scale).to(DK.dtype.element_ty), mask=m_n[:, None] & (o_d[None, :] < D))
    tl.store(_tile_ptrs(DV_PTR, i_b64, s_dvb, i_hk, s_dvh, i_n * BLOCK_N, s_dvn, o_r, o_dv),
             dv.to(DV_PTR.dtype.element_ty), mask=m_n[:, None] & (o_dv[None, :] < DV))

# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
_TUNED = {}


BOUNDARY_STEP = 64  # most rows (keys, or queries for dK/dV) a boundary (masked) step takes


def _tiles(kernel_name: str, bm: int, bn: int, bb: Optional[int] = None, swap: bool = False) -> dict:
    """Meta-parameters of one config: the program tile, the interior step and the boundary step
    ``BLOCK_B`` (the step axis is keys for the forward and dQ, queries for dK/dV; masked tiles hold more
    live registers, so wide steps are halved there), and dK/dV's orientation ``SWAP``."""
    if kernel_name == "_attn_bwd_dkdv":
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": min(bm, bb or BOUNDARY_STEP), "SWAP": bool(swap)}
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": min(bn, bb or BOUNDARY_STEP)}


def _kernel_name(kernel) -> str:
    return kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__


def _prune(kernel_name: str, configs, bsq: int, bsk: int, small=None):
    """Configs whose tiles fit inside the block-sparse block sizes (BSQ / BSK); if none does, those of
    ``small`` (the family's small-block fallback list) that fit, else the last one shrunk. Applied before the
    autotuner is built: Triton never prunes a single-config list."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bsq and c.kwargs["BLOCK_N"] <= bsk]
    if kept:
        return kept
    if small is not None:
        return _prune(kernel_name, small, bsq, bsk)
    c = configs[-1]
    return [triton.Config(_tiles(kernel_name, min(c.kwargs["BLOCK_M"], bsq), min(c.kwargs["BLOCK_N"], bsk),
                                 c.kwargs["BLOCK_B"], c.kwargs.get("SWAP", False)),
                          num_warps=c.num_warps, num_stages=c.num_stages)]


_KEY = ["N_BUCKET_Q", "N_BUCKET_K", "D", "DV", "WINDOWED", "SPARSE", "BIAS", "BSQ", "BSK", "PREC", "TMA", "VARLEN",
        "KVCACHE", "PAGE", "PACK_GQA", "MOD", "DROPOUT"]

# Interior steps load through tensor descriptors (TMA) on sm_90+ for the 16-bit, mask-free family when
# every row base / stride is 16-byte aligned; "auto" decides per call, "off" forces the pointer path,
# "on" forces descriptors (the tests run the descriptor path under the interpreter this way).
TMA_MODE = "auto"


def _tma_ok(tensors, family: Optional[str]) -> bool:
    """Whether the interior loads of this call may use tensor descriptors (see TMA_MODE)."""
    if TMA_MODE != "auto":
        if TMA_MODE == "on" and not interpreter_enabled():
            _ensure_allocator()
        return TMA_MODE == "on"
    if interpreter_enabled() or family != "sm90" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]) or t.stride(-2) < t.shape[-1]:
            return False  # rows must be 16-byte aligned and must not overlap (no zero / broadcast row stride)
    _ensure_allocator()
    return True


# Hopper automatic warp specialization of the dense forward (a TMA producer warp group feeding two consumer
# warp groups; see _attn_fwd's WS): "off" (default until a GPU run has validated it), "auto" (the autotuner
# also tries the WS_CONFIGS tiles), "on" (only them; the tests run the WS walk under the interpreter this
# way). From the environment variable TILEATTN_WARP_SPECIALIZE at import, or set the attribute.
WARP_SPECIALIZE = os.environ.get("TILEATTN_WARP_SPECIALIZE", "off").strip().lower() or "off"
if WARP_SPECIALIZE not in ("off", "auto", "on"):
    raise ValueError(f"TILEATTN_WARP_SPECIALIZE must be off, auto or on, got {WARP_SPECIALIZE!r}")
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim bucket: Triton's Hopper pass needs num_warps = 4 and
# splits the 128 query rows between its two consumer warp groups (AOT-checked spill-free, 3.6 and 3.9)
WS_CONFIGS = {64: [(128, 128, 4, 2)], 128: [(128, 128, 4, 2)]}


# Hopper's automatic warp specialization is complete from Triton 3.5 (3.4 has the keyword, with crashes)
_WS_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 5)


def _ws_ok(tensors, family: Optional[str]) -> bool:
    """Whether a dense forward call may run the warp-specialized walk (see WARP_SPECIALIZE): descriptors for
    q, k and v, on sm_90, with Triton >= 3.5."""
    if WARP_SPECIALIZE == "on" and interpreter_enabled():
        return True
    return _WS_TRITON and family == "sm90" and _tma_ok(tensors, family)


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator; install a torch-backed one unless
    the caller installed their own (Triton keeps it in a context variable: set it per thread)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _family(dtype: torch.dtype, device: torch.device, bias_mode: int) -> str:
    """Config family: fp32 inputs (FMA / tf32 dots), 16-bit with a mask tensor (its tile loads need
    smaller tiles), or 16-bit on sm_90 (wgmma tiles) / other GPUs (the sm_80 tables, also for newer
    architectures, whose tiles the resource report does not check)."""
    sm90 = torch.cuda.get_device_capability(device)[0] == 9
    if dtype == torch.float32:
        return "fp32_90" if sm90 else "fp32"
    if bias_mode:
        return "mask90" if sm90 else "mask"
    return "sm90" if sm90 else "sm80"


def _call_family(q: torch.Tensor, bias_mode: int) -> Optional[str]:
    return None if interpreter_enabled() else _family(q.dtype, q.device, bias_mode)


def configs_for(kernel_name: str, table, family: str, bucket: int, bsq: int = 1 << 30, bsk: int = 1 << 30,
                ws: str = "off"):
    """The autotuner's configs of one kernel for a family, head-dim bucket and block-sparse block size
    (``bsq`` / ``bsk``; dense calls pass the defaults). ``ws``: a dense forward call that may warp-specialize
    (see WARP_SPECIALIZE): "auto" adds the WS_CONFIGS tiles, "on" runs only them."""
    if ws != "off" and bucket in WS_CONFIGS:
        configs = [triton.Config({**_tiles(kernel_name, *c[:2]), "WS": True}, num_warps=c[2], num_stages=c[3])
                   for c in WS_CONFIGS[bucket]]
        if ws == "on":
            return configs
        return configs_for(kernel_name, table, family, bucket, bsq, bsk) + configs
    entries = table[family][bucket]
    if bsq < 1 << 30:  # block-sparse
        entries = SPARSE_CONFIGS.get((kernel_name, family, bucket), entries)
    configs = [triton.Config(_tiles(kernel_name, *c[:2], *c[4:]), num_warps=c[2], num_stages=c[3])
               for c in entries]
    small = None
    if family in SMALL_BLOCK_FAMILY:  # blocks narrower than the sm_90 tiles: the smaller tiles of that family
        small = configs_for(kernel_name, table, SMALL_BLOCK_FAMILY[family], bucket)
    return _prune(kernel_name, configs, bsq, bsk, small)


def _tuned(kernel, table, family: str, bucket: int, bsq: int, bsk: int, ws: str = "off"):
    name = (_kernel_name(kernel), family, bucket, bsq, bsk, table is DECODE_CONFIGS, ws)
    if name not in _TUNED:
        _TUNED[name] = triton.autotune(configs=configs_for(name[0], table, *name[1:5], ws=ws), key=_KEY)(kernel)
    return _TUNED[name]


def _launch(kernel, table, grid_fn, args, meta, bd: int, dtype: torch.dtype, device: torch.device):
    """Run ``kernel`` autotuned on GPU, or with the fixed interpreter config on CPU."""
    bsk = min(meta["BSK"], meta.get("PAGE") or 1 << 30)  # key tiles fit in sparse blocks and cache pages
    ws = meta.pop("WS", "off")
    if interpreter_enabled():
        bm, bn = INTERPRET_CONFIG[:2]
        tiles = _tiles(_kernel_name(kernel), min(bm, meta["BSQ"]), min(bn, bsk), *INTERPRET_CONFIG[4:])
        kernel[grid_fn(tiles)](*args, **meta, **tiles, **({"WS": True} if ws == "on" else {}))
        return
    _tuned(kernel, table, _family(dtype, device, meta["BIAS"] or _modded(meta)), _dim_bucket(bd), meta["BSQ"],
           bsk, ws)[grid_fn](*args, **meta)


def _modded(meta: dict) -> bool:
    """Score mods / dropout hold more live registers a tile: they run the smaller "mask" family tiles."""
    return meta.get("MOD") is not None or bool(meta.get("DROPOUT"))


def _mod_meta(q: torch.Tensor, softcap: Optional[float], alibi: Optional[torch.Tensor], score_mod,
              dropout_p: float, rng: Optional[torch.Tensor]) -> dict:
    """Kernel arguments of the score mods and dropout (appended to every attention kernel's arguments).
    ``score_mod``: None or (fn, grad_fn, tensors) with at most MAX_MOD_TENSORS contiguous tensors;
    ``alibi``: (Hq,) or (B, Hq) float32 slopes; ``rng``: int64 (seed, offset) on q's device when
    ``dropout_p`` > 0."""
    fn, grad, tensors = score_mod if score_mod is not None else (None, None, ())
    mod = None
    if fn is not None or softcap is not None or alibi is not None:
        mod = (fn, grad, len(tensors), softcap is not None, alibi is not None)
    ts = list(tensors) + [q] * (MAX_MOD_TENSORS - len(tensors))
    if alibi is None:
        slopes, sl = q, (0, 0)
    else:
        slopes, sl = alibi, ((alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0)))
    dropout = dropout_p > 0.0
    return dict(SLOPES=slopes, sl_b=sl[0], sl_h=sl[1], softcap=float(softcap or 1.0), MOD_T0=ts[0], MOD_T1=ts[1],
                RNG=rng if dropout else q, p_drop=float(dropout_p),
                rp=(1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0), MOD=mod, DROPOUT=dropout)


MAX_MOD_TENSORS = 2  # extra tensors a user score mod may read


def _dot_options(dtype: torch.dtype):
    """(upcast bf16 dot operands under the interpreter, input precision): fp32 inputs use TF32 tensor-core
    dots on GPU (IEEE fp32 dots need tiles so small that they spill; see the README)."""
    dot_f32 = interpreter_enabled() and dtype == torch.bfloat16
    return dot_f32, ("tf32" if dtype == torch.float32 else "ieee")


def _bias_args(bias: Optional[torch.Tensor], q: torch.Tensor):
    if bias is None:
        return q, (0, 0, 0, 0), 0
    if (bias.shape[-1] - 1) * abs(bias.stride(-1)) >= 2 ** 31:  # kernels index a row's columns in int32
        raise ValueError(f"attention mask column stride {bias.stride(-1)} x {bias.shape[-1]} keys exceeds 32-bit "
                         "offsets: pass a mask whose last dim is contiguous (or broadcast)")
    if bias.dtype == torch.bool:
        bias = bias.view(torch.uint8)  # same element size: a reinterpreting view for any strides, no copy
        return bias, tuple(bias.stride()), 1
    return bias, tuple(bias.stride()), 2


def _sparse_args(sparse: Optional[Sequence[torch.Tensor]], B: int, H: int, transposed: bool, dummy: torch.Tensor):
    """List pointers and broadcast strides for the kernel. ``sparse`` holds the BlockMask tensors
    (kv_num_f, kv_idx_f, kv_num_p, kv_idx_p, kv_mid_p, q_num_f, q_idx_f, q_num_p, q_idx_p, q_mid_p, masks)."""
    if sparse is None:
        return [dummy] * 6, (0, 0, 0, 0, 0), 1 << 30, 1 << 30
    lists = sparse[5:10] if transposed else sparse[0:5]
    masks = sparse[10]
    num = lists[0].expand(B, H, lists[0].shape[-1])
    idx = lists[1].expand(B, H, *lists[1].shape[-2:])
    strides = (num.stride(0), num.stride(1), idx.stride(0), idx.stride(1), idx.stride(2))
    return list(lists) + [masks], strides, masks.shape[1], masks.shape[2]


def _window_args(left: int, right: int, nq: int, nk: int):
    big = nq + nk + 1
    windowed = (left, right) != (-1, -1)
    return (big if left < 0 else left), (big if right < 0 else right), windowed


SPLIT_ALIGN = 128  # key splits are multiples of every BLOCK_N


_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (heads, batch)


def _check_grid(B: int, H: int) -> None:
    if B > _GRID_YZ or H > _GRID_YZ:
        raise ValueError(f"batch and head counts must be at most {_GRID_YZ} (CUDA grid limit), got B={B}, H={H}")


def _auto_splits(B: int, Hq: int, Nq: int, Nk: int, device: torch.device) -> int:
    """Split-KV (flash-decoding) for short queries over long keys, when the (query tile x head) grid
    alone would leave most SMs idle. The number of splits is a heuristic, not a measured optimum."""
    if device.type != "cuda" or Nq > 128 or Nk < 1024:
        return 1
    programs = B * Hq * triton.cdiv(Nq, 64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), Nk // 512, 64))


def _combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype):
    """Merge per-split partial results: lse = logsumexp_s lse_s, out = sum_s exp(lse_s - lse) out_s.
    Splits (or rows) that saw no key carry lse_s = -inf and weigh 0; a row empty everywhere stays 0 / -inf."""
    lse = torch.logsumexp(lse_part, dim=0)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_part - lse_safe)  # (S, B, H, Nq)
    out = (w.unsqueeze(-1) * o_part).sum(0)
    return out.to(dtype), lse


def _varlen_args(varlen, q: torch.Tensor, Nq: int, Nk: int):
    """Kernel arguments of packed sequences: (cu_q, cu_k, nseq), the autotune length buckets (of the longest
    sequences) and the program slots of a tile size (see ``_varlen_program``); dense calls get dummies."""
    if varlen is None:
        return (q, q, 1), (seqlen_bucket(Nq), seqlen_bucket(Nk)), None
    cu_q, cu_k, max_q, max_k = varlen
    nseq = cu_q.shape[0] - 1
    return (cu_q, cu_k, nseq), (seqlen_bucket(max_q), seqlen_bucket(max_k)), lambda n, bt: n // bt + nseq


def _alloc_rows(B: int, H: int, N: int, D: int, varlen, **kw) -> torch.Tensor:
    """A (B, H, N, D) result; packed sequences (B = 1) get FlashAttention's (total, H, D) layout, viewed
    as (1, H, total, D)."""
    if varlen is None:
        return alloc(B, H, N, D, **kw)
    return alloc(N, H, D, **kw).transpose(0, 1).unsqueeze(0)


@on_tensor_device
def attention_forward(q, k, v, *, scale: float, left: int = -1, right: int = -1,
                      bias: Optional[torch.Tensor] = None, sparse: Optional[Sequence[torch.Tensor]] = None,
                      count_visits: bool = False, num_splits: Optional[int] = None, varlen=None, kvcache=None,
                      softcap: Optional[float] = None, alibi: Optional[torch.Tensor] = None, score_mod=None,
                      dropout_p: float = 0.0, rng: Optional[torch.Tensor] = None):
    """Launch the forward. q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv), any strides with a
    unit last dim. Score mods / dropout: see :func:`_mod_meta`. Returns out (B, Hq, Nq, Dv) in q's dtype, lse
    (B, Hq, Nq) float32 and, with ``count_visits``, the (B*Hq, n_query_tiles, 2) int32 count of (interior,
    boundary) steps each program ran (under ``varlen``: per program slot).
    ``num_splits`` > 1 splits the keys into that many ranges run by separate programs (split-KV
    decoding), combined afterwards; None picks it automatically (only on CUDA, for short queries).
    ``varlen = (cu_q, cu_k, max_q, max_k)``: packed sequences; q / k / v are (1, H, total, D) views of
    FlashAttention's (total, H, D) tensors, and out is returned as such a view (no key splits).
    ``kvcache = (cache_seqlens, n_new, block_table, pack_gqa)``: keys are the first ``cache_seqlens[b] + n_new``
    rows of a cache of capacity Nk; with a block table, k / v are (num_pages, Hkv, page_size, D) views of a
    paged cache (capacity max_pages x page_size); ``pack_gqa`` lays the G query heads of a kv head along the
    query tile (one K / V read per group)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    _check_grid(B, Hq)
    (cu_q, cu_k, nseq), buckets, slots = _varlen_args(varlen, q, Nq, Nk)
    seqlens, n_new, table, pack = kvcache if kvcache is not None else (q, 0, None, False)
    kstr, vstr = k.stride()[:3], v.stride()[:3]
    page, paging = 0, (q, 0, 1, 0, 0)  # PAGE, (table, row stride, pages, page strides of k / v)
    if table is not None:
        page, Nk = k.shape[2], table.shape[1] * k.shape[2]
        paging = (table, table.stride(0), k.shape[0], k.stride(0), v.stride(0))
        kstr, vstr = (0,) + kstr[1:], (0,) + vstr[1:]
    G = Hq // Hkv
    rows, heads = (G * Nq, Hkv) if pack else (Nq, Hq)  # query rows of a program's head, heads on grid axis 1
    if kvcache is not None:
        buckets = (seqlen_bucket(rows), seqlen_bucket(Nk))
    splits = _auto_splits(B, heads, rows, Nk, q.device) if num_splits is None else int(num_splits)
    splits = min(splits, _GRID_YZ // B)  # batch x splits share grid axis 2
    split_keys = 1 << 30
    if splits > 1 and sparse is None and not count_visits and varlen is None:
        split_keys = triton.cdiv(triton.cdiv(Nk, splits), SPLIT_ALIGN) * SPLIT_ALIGN
        splits = triton.cdiv(Nk, split_keys)
    else:
        splits = 1
    if splits > 1:
        o_part = alloc(splits, B, Hq, Nq, Dv, device=q.device, dtype=torch.float32)
        lse_part = alloc(splits, B, Hq, Nq, device=q.device, dtype=torch.float32)
        out, lse = o_part[0], lse_part[0]
        split_strides = (o_part.stride(0), lse_part.stride(0))
    else:
        out = _alloc_rows(B, Hq, Nq, Dv, varlen, device=q.device, dtype=q.dtype)
        lse = alloc(B, Hq, Nq, device=q.device, dtype=torch.float32)
        split_strides = (0, 0)
    bias_t, sb, bias_mode = _bias_args(bias, q)
    sp, sl, bsq, bsk = _sparse_args(sparse, B, Hq, False, q)
    left_, right_, windowed = _window_args(left, right, Nq, Nk)
    dot_f32, prec = _dot_options(q.dtype)
    BD, BDV = next_pow2(D), next_pow2(Dv)
    if count_visits:
        bm = min(INTERPRET_CONFIG[0], bsq) if interpreter_enabled() else None
        if bm is None or kvcache is not None:
            raise ValueError("count_visits is a debug option of the interpreter build (not for KV caches)")
        n_tiles = triton.cdiv(Nq, bm) if slots is None else slots(Nq, bm)
        visits = torch.zeros(B * Hq, n_tiles, 2, dtype=torch.int32, device=q.device)
    else:
        visits = lse
    args = (q, k, v, out, lse, bias_t, *sp[:5], sp[5], visits,
            q.stride(0), q.stride(1), q.stride(2), *kstr, *vstr, out.stride(0), out.stride(1), out.stride(2),
            *sb, *sl, Hq, G, Nq, Nk, abs(scale) * LOG2E, left_, right_, split_keys, *split_strides,
            *buckets, cu_q, cu_k, nseq, seqlens, n_new, *paging)
    meta = dict(D=D, DV=Dv, BLOCK_D=BD, BLOCK_DV=BDV, WINDOWED=windowed, SPARSE=sparse is not None,
                BIAS=bias_mode, BSQ=bsq, BSK=bsk, COUNT=count_visits, DOT_F32=dot_f32, PREC=prec, NEG_SCALE=scale < 0,
                TMA=table is None and _tma_ok((k, v), _call_family(q, bias_mode)), VARLEN=varlen is not None,
                KVCACHE=kvcache is not None, PAGE=page, PACK_GQA=bool(pack))
    meta.update(_mod_meta(q, softcap, alibi, score_mod, dropout_p, rng))
    if _modded(meta) and (varlen is not None or kvcache is not None):  # their b / h are not the mods' b / h
        raise ValueError("score mods and dropout are not supported with packed sequences or KV caches")
    if _modded(meta):
        meta["TMA"] = False
    if (WARP_SPECIALIZE != "off" and not (windowed or sparse is not None or bias_mode or _modded(meta) or count_visits
                                          or varlen is not None or kvcache is not None or scale == 0)
            and _ws_ok((q, k, v), _call_family(q, bias_mode))):  # (scale 0: the masked -inf keys times 0)
        meta.update(TMA=True, WS=WARP_SPECIALIZE)
    n_q = (lambda bm: triton.cdiv(rows, bm)) if slots is None else (lambda bm: slots(Nq, bm))
    _launch(_attn_fwd, FWD_CONFIGS if kvcache is None else DECODE_CONFIGS,
            lambda m: (n_q(m["BLOCK_M"]), heads, B * splits), args, meta,
            max(BD, BDV), q.dtype, q.device)
    if splits > 1:
        out, lse = _combine_splits(o_part, lse_part, q.dtype)
    return (out, lse, visits) if count_visits else (out, lse)


@on_tensor_device
def attention_backward(do, q, k, v, out, lse, *, scale: float, left: int = -1, right: int = -1,
                       bias: Optional[torch.Tensor] = None, sparse: Optional[Sequence[torch.Tensor]] = None,
                       dlse: Optional[torch.Tensor] = None, varlen=None, softcap: Optional[float] = None,
                       alibi: Optional[torch.Tensor] = None, score_mod=None, dropout_p: float = 0.0,
                       rng: Optional[torch.Tensor] = None):
    """Launch the backward: Delta = rowsum(dO * O) (minus dLSE), then dQ and dK/dV kernels (no atomics,
    deterministic). Returns dq, dk, dv shaped and typed like q, k, v (``varlen``: see attention_forward)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    _check_grid(B, Hq)
    (cu_q, cu_k, nseq), buckets, slots = _varlen_args(varlen, q, Nq, Nk)
    delta = row_dot(out, do)
    if dlse is not None:
        delta = delta - dlse.float()
    dq = _alloc_rows(B, Hq, Nq, D, varlen, device=q.device, dtype=q.dtype)
    dk = _alloc_rows(B, Hkv, Nk, D, varlen, device=q.device, dtype=k.dtype)
    dv = _alloc_rows(B, Hkv, Nk, Dv, varlen, device=q.device, dtype=v.dtype)
    bias_t, sb, bias_mode = _bias_args(bias, q)
    left_, right_, windowed = _window_args(left, right, Nq, Nk)
    dot_f32, prec = _dot_options(q.dtype)
    BD, BDV = next_pow2(D), next_pow2(Dv)
    common = (Hq, Hq // Hkv, Nq, Nk, scale * LOG2E, scale, left_, right_, *buckets)
    sp, sl, bsq, bsk = _sparse_args(sparse, B, Hq, False, q)
    meta = dict(D=D, DV=Dv, BLOCK_D=BD, BLOCK_DV=BDV, WINDOWED=windowed, SPARSE=sparse is not None,
                BIAS=bias_mode, BSQ=bsq, BSK=bsk, DOT_F32=dot_f32, PREC=prec,
                TMA=_tma_ok((q, k, v, do), _call_family(q, bias_mode)), VARLEN=varlen is not None)
    meta.update(_mod_meta(q, softcap, alibi, score_mod, dropout_p, rng))
    if _modded(meta) and varlen is not None:  # their b / h are not the mods' b / h
        raise ValueError("score mods and dropout are not supported with packed sequences or KV caches")
    if _modded(meta):
        meta["TMA"] = False
    tiles = (lambda n, bt: triton.cdiv(n, bt)) if slots is None else slots
    args = (q, k, v, do, dq, lse, delta, bias_t, *sp,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), *sb, *sl, *common, cu_q, cu_k, nseq)
    _launch(_attn_bwd_dq, DQ_CONFIGS, lambda m: (tiles(Nq, m["BLOCK_M"]), Hq, B), args, meta, max(BD, BDV), q.dtype,
            q.device)
    sp, sl, _, _ = _sparse_args(sparse, B, Hq, True, q)
    args = (q, k, v, do, dk, dv, lse, delta, bias_t, *sp,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *sb, *sl, *common,
            B * Hkv, cu_q, cu_k, nseq)
    ny = min(B * Hkv, _GRID_YZ)
    _launch(_attn_bwd_dkdv, DKDV_CONFIGS, lambda m: (tiles(Nk, m["BLOCK_N"]), ny, triton.cdiv(B * Hkv, ny)),
            args, meta, max(BD, BDV), q.dtype, q.device)
    return dq, dk, dv


@on_tensor_device
def dropout_keep_mask(rng: torch.Tensor, B: int, H: int, Nq: int, Nk: int, *, dropout_p: float, left: int = -1,
                      right: int = -1) -> torch.Tensor:
    """The (B, H, Nq, Nk) bool keep mask of the attention kernels for Philox (seed, offset) = ``rng`` (int64,
    on the target device), and-ed with the (left, right) window's visibility."""
    out = torch.empty(B, H, Nq, Nk, dtype=torch.uint8, device=rng.device)
    left_, right_, windowed = _window_args(left, right, Nq, Nk)
    bm, bn = (32, 32) if interpreter_enabled() else (64, 64)
    _dropout_mask_kernel[(triton.cdiv(Nq, bm) * triton.cdiv(Nk, bn), H, B)](
        out, rng, B, H, Nq, Nk, left_, right_, float(dropout_p), out.stride(0), out.stride(1), out.stride(2),
        WINDOWED=windowed, BLOCK_M=bm, BLOCK_N=bn)
    return out.view(torch.bool)


# ----------------------------------------------------------------------------------------------------
# KV cache: in-place append of new tokens (contiguous or paged cache)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _kv_append(
    X, CACHE, SEQLENS, TBL, s_xb, s_xh, s_xn, s_cb, s_ch, s_cn, s_cp, s_tb, Hkv, n_new, cap, n_pages,
    DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
):
    """Write the new rows X (B, Hkv, n_new, DIM) of a (batch, kv head) into the cache at positions
    cache_seqlens[b] + t: a contiguous cache (B, Hkv, cap, DIM) at strides (s_cb, s_ch, s_cn), or a paged
    cache (num_pages, PAGE, Hkv, DIM) through the block-table row of b (page stride s_cp, row stride s_cn,
    head stride s_ch). Rows past the capacity or on a page id outside [0, n_pages) are not written."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hkv, i_bh % Hkv
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    pos = tl.minimum(tl.maximum(tl.load(SEQLENS + i_b), 0), cap) + o_t  # clamped first: no int32 overflow
    m_t = o_t < n_new
    m_ok = m_t & (pos < cap)
    if PAGE > 0:
        i_pg = tl.load(TBL + i_b.to(tl.int64) * s_tb + pos // PAGE, mask=m_ok, other=-1)
        m_ok = m_ok & (i_pg >= 0) & (i_pg < n_pages)
        p_row = CACHE + i_pg.to(tl.int64) * s_cp + (pos % PAGE).to(tl.int64) * s_cn + i_h.to(tl.int64) * s_ch
    else:
        p_row = CACHE + i_b.to(tl.int64) * s_cb + i_h.to(tl.int64) * s_ch + pos.to(tl.int64) * s_cn
    m_d = (o_d < DIM)[None, :]
    b_x = tl.load(X + i_b.to(tl.int64) * s_xb + i_h.to(tl.int64) * s_xh + (o_t.to(tl.int64) * s_xn)[:, None]
                  + o_d[None, :], mask=m_t[:, None] & m_d, other=0.0)
    tl.store(p_row[:, None] + o_d[None, :], b_x, mask=m_ok[:, None] & m_d)


@on_tensor_device
def kv_append(x: torch.Tensor, cache: torch.Tensor, cache_seqlens: torch.Tensor,
              block_table: Optional[torch.Tensor] = None) -> None:
    """Write x (B, Hkv, n_new, DIM) into ``cache`` in place at positions ``cache_seqlens[b] + t``: contiguous
    (B, Hkv, cap, DIM) or paged (num_pages, page_size, Hkv, DIM) with ``block_table`` (B, max_pages). No sync."""
    B, Hkv, n_new, dim = x.shape
    if n_new == 0:
        return
    if block_table is None:
        cap, page = cache.shape[2], 0
        s_c = (cache.stride(0), cache.stride(1), cache.stride(2), 0)
        tbl, s_tb, n_pages = cache_seqlens, 0, 1
    else:
        page = cache.shape[1]
        cap = block_table.shape[1] * page
        s_c = (0, cache.stride(2), cache.stride(1), cache.stride(0))
        tbl, s_tb, n_pages = block_table, block_table.stride(0), cache.shape[0]
    BLOCK_T, warps = _kv_append_config(next_pow2(dim))
    BLOCK_T = min(BLOCK_T, next_pow2(n_new))
    _kv_append[(triton.cdiv(n_new, BLOCK_T), B * Hkv)](
        x, cache, cache_seqlens, tbl, x.stride(0), x.stride(1), x.stride(2), *s_c, s_tb, Hkv, n_new, cap, n_pages,
        DIM=dim, BLOCK_T=BLOCK_T, BLOCK_D=next_pow2(dim), PAGE=page, num_warps=warps)


def _kv_append_config(block_d: int) -> Tuple[int, int]:
    """(rows per program, warps) of the append: rows x head dim <= 4096; 8 warps at d256 (AOT-checked
    spill-free; 4 warps spill there on sm_90)."""
    return min(64, 4096 // block_d), (8 if block_d >= 256 else 4)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time specs for the resource report / spill test
# ----------------------------------------------------------------------------------------------------
_INT_PTRS = ("KV_NUM_F", "KV_IDX_F", "KV_NUM_P", "KV_IDX_P", "KV_MID_P",
             "Q_NUM_F", "Q_IDX_F", "Q_NUM_P", "Q_IDX_P", "Q_MID_P", "VISITS", "CU_Q", "CU_K", "SEQLENS", "TBL")
_KERNELS = {"fwd": _attn_fwd, "bwd_dq": _attn_bwd_dq, "bwd_dkdv": _attn_bwd_dkdv, "decode": _attn_fwd}
_TABLES = {"fwd": FWD_CONFIGS, "bwd_dq": DQ_CONFIGS, "bwd_dkdv": DKDV_CONFIGS, "decode": DECODE_CONFIGS}
# Mask variants a config must compile spill-free in (the heaviest ones), per config family.
_VARIANTS = {
    "dense": dict(WINDOWED=False, SPARSE=False, BIAS=0, BSQ=1 << 30, BSK=1 << 30),
    "causal": dict(WINDOWED=True, SPARSE=False, BIAS=0, BSQ=1 << 30, BSK=1 << 30),
    "sparse": dict(WINDOWED=False, SPARSE=True, BIAS=0, BSQ=128, BSK=128),
    # blocks narrower than the sm_90 tiles (the SMALL_BLOCK_FAMILY fallbacks), with a bias for mask90
    **{f"sparse{bs}": dict(WINDOWED=False, SPARSE=True, BIAS=0, BSQ=bs, BSK=bs) for bs in (32, 64)},
    **{f"sparse{bs}-bias": dict(WINDOWED=False, SPARSE=True, BIAS=2, BSQ=bs, BSK=bs) for bs in (32, 64)},
    "bias": dict(WINDOWED=True, SPARSE=False, BIAS=2, BSQ=1 << 30, BSK=1 << 30),
    "varlen": dict(WINDOWED=True, SPARSE=False, BIAS=0, BSQ=1 << 30, BSK=1 << 30, VARLEN=True),
    # decoding over a paged KV cache (forward only): GQA-packed query tiles, per-sequence lengths, pages of 128
    "paged": dict(WINDOWED=True, SPARSE=False, BIAS=0, BSQ=1 << 30, BSK=1 << 30, KVCACHE=True, PAGE=128,
                  PACK_GQA=True),
    # a contiguous cache (TMA interior loads), one query head per program
    "kvcache": dict(WINDOWED=True, SPARSE=False, BIAS=0, BSQ=1 << 30, BSK=1 << 30, KVCACHE=True, PAGE=0,
                    PACK_GQA=False),
}
_FAMILY_VARIANTS = {"sm90": ("dense", "causal", "sparse", "varlen", "paged", "kvcache"), "sm80": ("causal", "sparse"),
                    "mask": ("bias",), "mask90": ("bias",), "fp32_90": ("causal", "sparse", "bias"),
                    "fp32": ("causal", "sparse", "bias")}
_FAMILY_DTYPES = {"sm90": (torch.float16, torch.bfloat16), "sm80": (torch.float16, torch.bfloat16),
                  "mask": (torch.float16, torch.bfloat16), "mask90": (torch.float16, torch.bfloat16),
                  "fp32": (torch.float32,), "fp32_90": (torch.float32,)}
_FAMILY_ARCHS = {"sm90": (90,), "sm80": (80,), "mask": (80,), "mask90": (90,), "fp32": (80,), "fp32_90": (90,)}


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton types for every argument of ``fn``: pointers by name, lengths / strides i32, scales fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_PTRS:
            sig[name] = "*i32"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name == "EMASK":
            sig[name] = "*u8"
        elif name == "BIAS_PTR":
            sig[name] = ptr_type(dtype) if constexprs.get("BIAS") == 2 else "*u8"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_PTR"):
            sig[name] = ptr_type(dtype)
        elif name in ("qk_scale", "scale", "softcap", "p_drop", "rp"):
            sig[name] = "fp32"
        elif name in ("SLOPES", "MOD_T0", "MOD_T1"):
            sig[name] = "*fp32"
        elif name == "RNG":
            sig[name] = "*i64"
        else:
            sig[name] = "i32"
    return sig


def _aligned_args(sig: dict) -> Tuple[str, ...]:
    """Pointers and strides: what the JIT specialises as multiples of 16 for contiguous inputs with a
    head dim that is a multiple of 16 (the common case the report describes)."""
    return tuple(n for n, t in sig.items() if t.startswith("*") or (n.startswith("s_") and t == "i32"))


def make_spec(tag: str, family: str, bucket: int, config: Tuple[int, int, int, int], variant: str,
              dtype: Optional[torch.dtype] = None, ws: bool = False) -> Optional[KernelSpec]:
    """The KernelSpec of one config of kernel ``tag`` (fwd / bwd_dq / bwd_dkdv) in a mask variant (``ws``:
    the warp-specialized dense forward)."""
    bm, bn, w, s = config[:4]
    var = _VARIANTS[variant]
    if var["SPARSE"] and (bm > var["BSQ"] or bn > var["BSK"]):
        return None
    if bool(var.get("KVCACHE")) != (tag == "decode"):  # KV-cache variants: the forward with the decode table
        return None
    dtype = dtype or _FAMILY_DTYPES[family][-1 if variant == "sparse" else 0]
    kernel = _KERNELS[tag]
    cx = dict(D=bucket, DV=bucket, BLOCK_D=bucket, BLOCK_DV=bucket, **_tiles(kernel.__name__, bm, bn, *config[4:]),
              DOT_F32=False, PREC="tf32" if family.startswith("fp32") else "ieee", TMA=family == "sm90",
              **{"VARLEN": False, **var})
    cx.update(MOD=None, DROPOUT=False)  # the plain path (score mods / dropout off)
    if tag in ("fwd", "decode"):
        cx.update(COUNT=False, NEG_SCALE=False, **{n: var.get(n, False) for n in ("KVCACHE", "PACK_GQA")},
                  PAGE=var.get("PAGE", 0))
        cx["TMA"] = cx["TMA"] and not cx["PAGE"]
        cx["WS"] = ws
    sig = _signature(kernel, dtype, cx)
    name = (f"attn_{tag}[{family},{variant},{str(dtype)[6:]},d{bucket}] BM{bm} BN{bn} BB{cx['BLOCK_B']} w{w} s{s}"
            + (" ws" if ws else "") + (" swap" if cx.get("SWAP") else ""))
    # nominal MMA FLOPs of one iteration of the interior and of the boundary loop (program tile x step x
    # head dim x matmuls: fwd QK^T + PV; dQ QK^T, dO V^T, dS K; dK/dV all four)
    n_mm = {"fwd": 2, "decode": 2, "bwd_dq": 3, "bwd_dkdv": 4}[tag]
    this, step = (bn, bm) if tag == "bwd_dkdv" else (bm, bn)
    iter_flops = [2 * this * st * bucket * n_mm for st in (step, cx["BLOCK_B"])]
    if ws:  # one walk (no boundary phase); each of the two consumer warp groups loops over half the rows
        iter_flops = [iter_flops[0] // 2] * 2
    return KernelSpec(name, kernel, sig, cx, w, s, archs=_FAMILY_ARCHS[family],
                      tags=dict(kernel=tag, family=family, dtype=str(dtype), head_dim=bucket, variant=variant,
                                iter_flops=iter_flops),
                      divisible_16=_aligned_args(sig))


def aot_specs() -> List[KernelSpec]:
    """Every shipped config of the three kernels, per family and head-dim bucket, in every mask variant."""
    specs = []
    for tag, table in _TABLES.items():
        name = _kernel_name(_KERNELS[tag])
        for family, buckets in table.items():
            for bucket, configs in buckets.items():
                for variant in _FAMILY_VARIANTS[family]:
                    for config in (SPARSE_CONFIGS.get((name, family, bucket), configs) if variant == "sparse"
                                   else configs):
                        spec = make_spec(tag, family, bucket, config, variant)
                        if spec is not None:
                            specs.append(spec)
    for bucket, configs in WS_CONFIGS.items():  # the warp-specialized dense forward
        for config in configs:
            for dtype in _FAMILY_DTYPES["sm90"]:
                specs.append(make_spec("fwd", "sm90", bucket, config, "dense", dtype, ws=True))
    for dim in (64, 128, 256):  # the KV-cache append, at its widest row block
        for page in (0, 64):
            bt, warps = _kv_append_config(dim)
            sig = {n: ("*fp16" if n in ("X", "CACHE") else "*i32" if n in ("SEQLENS", "TBL") else "i32")
                   for n in _kv_append.arg_names}
            cx = dict(DIM=dim, BLOCK_T=bt, BLOCK_D=dim, PAGE=page)
            for n in cx:
                sig[n] = "constexpr"
            specs.append(KernelSpec(f"kv_append[d{dim},{'paged' if page else 'contiguous'}] BT{bt} w{warps}",
                                    _kv_append, sig, cx, warps, 1, archs=(80, 90), tags=dict(kernel="kv_append", head_dim=dim),
                                    divisible_16=tuple(n for n in sig if sig[n].startswith("*"))))
    return specs


def small_block_specs() -> List[KernelSpec]:
    """The tiles block-sparse calls with 32 / 64-wide blocks run on sm_90 (the SMALL_BLOCK_FAMILY fallbacks,
    bf16 / fp32) in their block-sparse variant: not in aot_specs (a few spill a little outside their main
    loops); tests/test_kernel_report.py checks they compile with no spill inside a main loop."""
    specs = []
    for family in SMALL_BLOCK_FAMILY:  # block-sparse blocks narrower than the sm_90 tiles (bf16, sm_90)
        for tag in ("fwd", "bwd_dq", "bwd_dkdv"):
            table, name = _TABLES[tag], _kernel_name(_KERNELS[tag])
            for bucket in table[family]:
                for bs in (32, 64):
                    variant = f"sparse{bs}" + ("-bias" if family == "mask90" else "")
                    for c in configs_for(name, table, family, bucket, bs, bs):
                        k = c.kwargs
                        config = (k["BLOCK_M"], k["BLOCK_N"], c.num_warps, c.num_stages, k["BLOCK_B"],
                                  k.get("SWAP", False))
                        specs.append(make_spec(tag, family, bucket, config, variant, torch.bfloat16
                                               if family != "fp32_90" else torch.float32))
    return specs
