"""Attention probabilities P = softmax(scale * Q K^T + bias) rebuilt from Q, K and the saved LSE.

One program writes one [BLOCK_M, BLOCK_N] tile of ``P[b, h, rows, keys]`` for one (batch, selected head):
``P = exp2(qk * scale * log2e + bias * log2e - lse * log2e)`` with the causal / window / bool masks applied
and rows whose LSE is -inf (no visible key) set to 0. No reduction over keys is needed because the fused
forward already produced the row normaliser (the LSE), so tiles are independent (no atomics).

Heads and query rows are gathered through int32 index vectors so a subset can be written without
materialising the rest.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .utils import KernelSpec, alloc, interpreter_enabled, next_pow2, on_tensor_device, ptr_type

LOG2E = 1.4426950408889634

BIAS_NONE, BIAS_BOOL, BIAS_FLOAT = 0, 1, 2


@triton.jit
def _attn_weights_kernel(
    q_ptr, k_ptr, lse_ptr, bias_ptr, head_ptr, row_ptr, o_ptr,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh, stride_ln,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om,
    HS, R, NQ, NK, D, G,
    left, right,
    qk_scale,
    BIAS_KIND: tl.constexpr,
    IEEE: tl.constexpr,
    D_LOOP: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_M) * cdiv(NK, BLOCK_N), HS, B)
    i_mn, i_bh = tl.program_id(0), tl.program_id(2) * HS + tl.program_id(1)
    n_tiles_n = tl.cdiv(NK, BLOCK_N)
    i_m, i_n = i_mn // n_tiles_n, i_mn % n_tiles_n
    i_b, i_hs = i_bh // HS, i_bh % HS
    i_b64 = i_b.to(tl.int64)
    i_h = tl.load(head_ptr + i_hs)  # query head index
    i_hk = i_h // G  # key head (GQA)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # slot in the selected rows
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key index
    m_m = o_m < R
    m_n = o_n < NK
    o_r = tl.load(row_ptr + o_m, mask=m_m, other=0)  # actual query row index

    p_q0 = q_ptr + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh + o_r[:, None].to(tl.int64) * stride_qn
    p_k0 = k_ptr + i_b64 * stride_kb + i_hk.to(tl.int64) * stride_kh + o_n[:, None].to(tl.int64) * stride_kn
    if D_LOOP:
        # fp32 IEEE dots run on FMA units: walk the head dim in BLOCK_D chunks to stay in registers
        b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BLOCK_D)):
            o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_q = tl.load(p_q0 + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
            b_k = tl.load(p_k0 + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
            b_s = tl.dot(b_q, tl.trans(b_k), b_s, input_precision="ieee")  # [BM, BN]
    else:
        # the whole (padded) head dim in one tile
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_q = tl.load(p_q0 + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_k = tl.load(p_k0 + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [BM, BN]
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))  # [BM, BN]
    b_s = b_s * qk_scale  # log2 units

    p_l = lse_ptr + i_b64 * stride_lb + i_h.to(tl.int64) * stride_lh + o_r * stride_ln
    b_lse = tl.load(p_l, mask=m_m, other=float("-inf")) * 1.4426950408889634  # [BM]

    m_ok = m_m[:, None] & m_n[None, :]  # [BM, BN]
    o_pos = o_r + (NK - NQ)  # bottom-right aligned position of each query row
    if right >= 0:
        m_ok = m_ok & (o_n[None, :] <= o_pos[:, None] + right)
    if left >= 0:
        m_ok = m_ok & (o_n[None, :] >= o_pos[:, None] - left)
    if BIAS_KIND > 0:
        p_b = (bias_ptr + i_b64 * stride_bb + i_h.to(tl.int64) * stride_bh + o_r[:, None].to(tl.int64) * stride_bm
               + o_n[None, :].to(tl.int64) * stride_bn)
        if BIAS_KIND == 1:
            b_allow = tl.load(p_b, mask=m_m[:, None] & m_n[None, :], other=0)  # [BM, BN]
            m_ok = m_ok & (b_allow != 0)
        else:
            b_bias = tl.load(p_b, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)  # [BM, BN]
            b_s = b_s + b_bias * 1.4426950408889634
    m_ok = m_ok & (b_lse > float("-inf"))[:, None]
    b_lse = tl.where(b_lse > float("-inf"), b_lse, 0.0)
    b_p = tl.where(m_ok, tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BM, BN]

    p_o = o_ptr + i_b64 * stride_ob + i_hs.to(tl.int64) * stride_oh + o_m[:, None].to(tl.int64) * stride_om + o_n[None, :]
    tl.store(p_o, b_p.to(o_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def _config(head_d: int, dtype: torch.dtype, ieee: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D (head-dim chunk), num_warps, num_stages) for a padded head dim
    ``head_d`` and dtype, chosen so that no shipped config spills on sm_80 / sm_90 (checked with the AOT
    resource report; speed is a prediction, not tuned on a GPU). fp32 with IEEE dots runs on FMA units:
    small tiles and 16-wide head-dim chunks."""
    if dtype == torch.float32 and ieee:
        return 32, 32, min(16, head_d), 4, 1
    if head_d <= 64:
        return 64, 64, head_d, 4, 1
    if head_d <= 128:
        return 64, 64, head_d, 8, 1
    return 32, 64, head_d, 4, 1


def _ieee(dtype: torch.dtype) -> bool:
    # Same rule as the fused kernels (kernels/attention.py): fp32 inputs use TF32 dots, so the scores here
    # match the ones the LSE was computed from and rows sum to 1. (The IEEE kernel variant is kept for
    # reference but not launched.)
    return False


@on_tensor_device
def attention_weights_fwd(
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
    """Launch the weights kernel.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) (unit last stride), lse: (B, Hq, Nq) float32 (natural log),
    bias: None, bool (True = attend) or float (added to scaled scores), already expanded to
    (B, Hq, Nq, Nk) (stride-0 broadcast allowed), head_idx / row_idx: int32 index vectors on q's device,
    left / right: window in bottom-right aligned coordinates (-1 unbounded), scale: softmax scale.
    Returns (B, len(head_idx), len(row_idx), Nk) in q's dtype.
    """
    B, Hq, NQ, D = q.shape
    Hkv, NK = k.shape[1], k.shape[2]
    HS, R = head_idx.numel(), row_idx.numel()
    # Interpreter gap: its fp32 -> bf16 cast truncates instead of rounding to nearest, so under the
    # interpreter a bf16 result is written in fp32 and rounded by torch.
    round_in_torch = interpreter_enabled() and q.dtype == torch.bfloat16
    out = alloc(B, HS, R, NK, device=q.device, dtype=torch.float32 if round_in_torch else q.dtype)
    if out.numel() == 0:
        return out
    ieee = _ieee(q.dtype)
    BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _config(next_pow2(D), q.dtype, ieee)
    if bias is None:
        kind, b_arg, b_strides = BIAS_NONE, q, (0, 0, 0, 0)
    elif bias.dtype == torch.bool:
        kind, b_arg, b_strides = BIAS_BOOL, bias.view(torch.uint8), tuple(bias.stride())
    else:
        kind, b_arg, b_strides = BIAS_FLOAT, bias, tuple(bias.stride())
    grid = (triton.cdiv(R, BLOCK_M) * triton.cdiv(NK, BLOCK_N), HS, B)
    _attn_weights_kernel[grid](
        q, k, lse, b_arg, head_idx, row_idx, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        *b_strides,
        out.stride(0), out.stride(1), out.stride(2),
        HS, R, NQ, NK, D, Hq // Hkv,
        int(left), int(right),
        float(scale) * LOG2E,
        BIAS_KIND=kind,
        IEEE=ieee,
        D_LOOP=BLOCK_D < next_pow2(D),
        UPCAST=interpreter_enabled(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out.to(q.dtype) if round_in_torch else out


def aot_specs() -> List[KernelSpec]:
    """Every shipped configuration of the weights kernel: dtype (fp32 with TF32 dots) x padded
    head dim, without bias, and the bool / float bias variants at head dim 128."""
    specs = []
    ints = ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
            "stride_lb", "stride_lh", "stride_ln", "stride_bb", "stride_bh", "stride_bm", "stride_bn",
            "stride_ob", "stride_oh", "stride_om", "HS", "R", "NQ", "NK", "D", "G", "left", "right"]
    for dtype, ieee in ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False)):
        for block_d in (64, 128, 256):
            for kind in (BIAS_NONE, BIAS_BOOL, BIAS_FLOAT):
                if kind != BIAS_NONE and block_d != 128:
                    continue  # the bias variants share the tile shapes; one head dim each is enough
                bm, bn, bd, nw, ns = _config(block_d, dtype, ieee)
                t = ptr_type(dtype)
                sig = {"q_ptr": t, "k_ptr": t, "lse_ptr": "*fp32",
                       "bias_ptr": {BIAS_NONE: t, BIAS_BOOL: "*u8", BIAS_FLOAT: "*fp32"}[kind],
                       "head_ptr": "*i32", "row_ptr": "*i32", "o_ptr": t}
                sig.update({n: "i32" for n in ints})
                sig["qk_scale"] = "fp32"
                const = {"BIAS_KIND": kind, "IEEE": ieee, "D_LOOP": bd < block_d, "UPCAST": False,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
                sig.update({n: "constexpr" for n in const})
                prec = ("_ieee" if ieee else "_tf32") if dtype == torch.float32 else ""
                specs.append(KernelSpec(
                    name=f"attn_weights_{str(dtype).split('.')[-1]}{prec}_d{block_d}_bias{kind}",
                    fn=_attn_weights_kernel, signature=sig, constexprs=const,
                    num_warps=nw, num_stages=ns, tags={"block_d": block_d, "bias": kind},
                ))
    return specs
