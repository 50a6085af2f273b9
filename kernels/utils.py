"""Small shared kernels and launch helpers."""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_POISON = os.environ.get("TILEATTN_POISON", "0") not in ("", "0")


def set_poison(flag: bool) -> None:
    """Debug switch: when on, every output buffer the launchers allocate is filled with NaN first, so an
    element the kernel forgot to write fails the comparisons (the tests turn it on)."""
    global _POISON
    _POISON = bool(flag)


def alloc(*shape, device, dtype) -> torch.Tensor:
    """Output buffer for a kernel (NaN-poisoned in debug mode, see :func:`set_poison`)."""
    if _POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def on_tensor_device(fn):
    """Run a launcher with the current CUDA device set to that of its first tensor argument: Triton
    launches on the current device, which need not be the tensors' (e.g. inputs on cuda:1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        ctx = torch.cuda.device(t.device) if t is not None and t.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)
    return wrapper


def next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def seqlen_bucket(n: int) -> int:
    """Autotune key for a sequence length: next power of two, capped (no per-length retuning)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


@triton.jit
def _row_dot_kernel(
    a_ptr, b_ptr, out_ptr,
    stride_ab, stride_ah, stride_an,
    stride_bb, stride_bh, stride_bn,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[b, h, n] = sum_d a[b, h, n, d] * b[b, h, n, d], accumulated in fp32
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # grid (row tiles, H, B)
    i_bh = i_b * H + i_h
    o_r = tl.arange(0, BLOCK_M)
    o_m = i_m * BLOCK_M + o_r
    o_d = tl.arange(0, BLOCK_D)
    m_md = (o_m[:, None] < N) & (o_d[None, :] < D)
    r0 = (i_m * BLOCK_M).to(tl.int64)  # 64-bit bases, 32-bit offsets inside the tile
    p_a = a_ptr + i_b.to(tl.int64) * stride_ab + i_h.to(tl.int64) * stride_ah + r0 * stride_an + o_r[:, None] * stride_an + o_d[None, :]
    p_b = b_ptr + i_b.to(tl.int64) * stride_bb + i_h.to(tl.int64) * stride_bh + r0 * stride_bn + o_r[:, None] * stride_bn + o_d[None, :]
    b_a = tl.load(p_a, mask=m_md, other=0.0).to(tl.float32)  # [BM, BD]
    b_b = tl.load(p_b, mask=m_md, other=0.0).to(tl.float32)  # [BM, BD]
    tl.store(out_ptr + i_bh.to(tl.int64) * N + o_m, tl.sum(b_a * b_b, axis=1), mask=o_m < N)


ROW_DOT_WARPS = 8


def _row_dot_block_m(block_d: int) -> int:
    return max(16, min(128, 4096 // block_d))  # 4K elements per tile: spill-free on sm_80 / sm_90


@on_tensor_device
def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the last dim of two (B, H, N, D) tensors (unit last stride), in
    float32: returns a contiguous (B, H, N) tensor. Used for the backward's Delta = rowsum(dO * O)."""
    B, H, N, D = a.shape
    out = alloc(B, H, N, device=a.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    BLOCK_D = next_pow2(D)
    BLOCK_M = _row_dot_block_m(BLOCK_D)
    grid = (triton.cdiv(N, BLOCK_M), H, B)
    _row_dot_kernel[grid](
        a, b, out, a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        H, N, D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=ROW_DOT_WARPS,
    )
    return out


@dataclass
class KernelSpec:
    """One shipped kernel configuration, described for ahead-of-time compilation (the resource report
    and the spill test compile these for sm_80 / sm_90 without a GPU).

    ``signature`` maps every argument name of ``fn`` to a Triton type string (``"*fp16"``, ``"*fp32"``,
    ``"*i32"``, ``"i32"``, ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the constexpr values.
    """

    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    archs: Tuple[int, ...] = (80, 90)
    tags: Dict[str, object] = field(default_factory=dict)
    # Arguments the JIT would specialise as multiples of 16 at run time (aligned pointers, strides of
    # head dims that are multiples of 16): compile with ``attrs = {(i,): [["tt.divisibility", 16]]}``.
    divisible_16: Tuple[str, ...] = ()

    def attrs(self) -> Dict[Tuple[int, ...], list]:
        names = list(self.fn.arg_names)
        return {(names.index(n),): [["tt.divisibility", 16]] for n in self.divisible_16}


def ptr_type(dtype: torch.dtype) -> str:
    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
            torch.int32: "*i32", torch.uint8: "*u8", torch.int8: "*i8"}[dtype]


def aot_specs() -> list:
    """Shipped configs of :func:`row_dot` for the resource report: every input dtype and head-dim bucket
    (BLOCK_D = next_pow2(D) in 16..256, BLOCK_M as the launcher picks it), default launch options."""
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for block_d in (16, 32, 64, 128, 256):
            block_m = _row_dot_block_m(block_d)
            sig = {"a_ptr": ptr_type(dtype), "b_ptr": ptr_type(dtype), "out_ptr": "*fp32"}
            sig.update({k: "i32" for k in ("stride_ab", "stride_ah", "stride_an", "stride_bb", "stride_bh",
                                           "stride_bn", "H", "N", "D")})
            specs.append(KernelSpec(
                name=f"row_dot_{str(dtype)[6:]}_d{block_d}", fn=_row_dot_kernel, signature=sig,
                constexprs={"BLOCK_M": block_m, "BLOCK_D": block_d}, num_warps=ROW_DOT_WARPS, num_stages=3,
                tags={"dtype": str(dtype)[6:], "BLOCK_D": block_d, "BLOCK_M": block_m},
            ))
    return specs
