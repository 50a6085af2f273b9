"""Shared test helpers: inputs, the tolerance rule, a verbose mismatch report, poisoned buffers."""
from __future__ import annotations

import math
from typing import Optional

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# Small absolute floor added to the flash-attention rule (2x the same-dtype PyTorch error).
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
# fp32 inputs run TF32 tensor-core dots on GPU (documented), so their floor there is TF32's, not fp32's.
TF32_FLOOR = 5e-3


def randn(*shape, dtype=torch.float16, device=DEVICE, requires_grad=False, layout="bhnd"):
    """Fresh standard-normal tensor. ``layout='bnhd'`` returns a non-contiguous (B, H, N, D) view of a
    (B, N, H, D) buffer (what ``x.transpose(1, 2)`` gives users)."""
    if layout == "bnhd" and len(shape) == 4:
        b, h, n, d = shape
        x = torch.randn(b, n, h, d, dtype=torch.float32, device=device).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius-norm error ||x - ref|| / ||ref|| in float64 (ignores positions where both are
    -inf, as for LSE of masked rows)."""
    x, ref = x.double(), ref.double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    x = torch.where(both_inf, torch.zeros_like(x), x)
    ref = torch.where(both_inf, torch.zeros_like(ref), ref)
    num = torch.linalg.vector_norm(x - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if math.isnan(num):
        return float("inf")
    return num / max(den, 1e-30)


def mismatch_report(x: torch.Tensor, ref: torch.Tensor, n: int = 8) -> str:
    """The first ``n`` largest mismatches, with indices (Liger-style verbose allclose)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    diff = (x - ref).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    flat = diff.flatten()
    k = min(n, flat.numel())
    vals, idx = flat.topk(k)
    lines = [f"shape {tuple(x.shape)}, {int((flat > 0).sum())} differing elements; nan: {int(torch.isnan(x).sum())}"]
    for v, i in zip(vals.tolist(), idx.tolist()):
        pos = tuple(torch.unravel_index(torch.tensor(i), x.shape))
        pos = tuple(int(p) for p in pos)
        lines.append(f"  at {pos}: got {x[pos].item():.6g}, expected {ref[pos].item():.6g} (|diff| {v:.3g})")
    return "\n".join(lines)


def assert_close(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lp: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None, factor: float = 2.0, floor: Optional[float] = None) -> None:
    """flash-attention tolerance rule on relative norm error:
    ``rel(out, ref64) <= factor * rel(ref_lp, ref64) + floor``, where ``ref_lp`` is the same computation
    done by PyTorch in the low-precision dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output\n" + mismatch_report(out, ref64)
    dtype = dtype or out.dtype
    floor = FLOOR.get(dtype, 1e-3) if floor is None else floor
    base = rel_err(ref_lp, ref64) if ref_lp is not None else 0.0
    err = rel_err(out, ref64)
    tol = factor * base + floor
    assert err <= tol, f"{name}: rel err {err:.3g} > tol {tol:.3g} (pytorch {dtype} err {base:.3g})\n" + mismatch_report(out, ref64)


def poison_like(x: torch.Tensor) -> torch.Tensor:
    """A NaN-filled buffer shaped like ``x`` (so unwritten elements fail comparisons)."""
    return torch.full_like(x, float("nan"))


def run_case(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, *, causal=False, window=None, layout="bhnd", scale=None,
             device=DEVICE, check_grad=True, block_mask=None, bias=None, floor=None, mods=None, ref_mods=None):
    """Run ``tileattn.attention`` forward + backward on fresh random inputs and check out, LSE, dq, dk, dv
    against the float64 reference with the flash-attention rule (baseline: same-dtype PyTorch); ``floor``
    overrides the dtype's absolute floor (e.g. TF32_FLOOR for fp32 on GPU). ``bias``: a bool (True = attend)
    or float (added to the scaled scores) tensor broadcastable to (B, Hq, Nq, Nk), through the internal
    ``_attention`` entry point the SDPA drop-in uses. ``mods``: extra keyword arguments of the op (score
    mods), ``ref_mods`` those of ``attention_ref``."""
    import tileattn
    from tileattn.attention import _attention
    from tileattn.reference import attention_ref

    q = randn(B, Hq, Nq, D, dtype=dtype, device=device, layout=layout, requires_grad=True)
    k = randn(B, Hkv, Nk, D, dtype=dtype, device=device, layout=layout, requires_grad=True)
    v = randn(B, Hkv, Nk, Dv, dtype=dtype, device=device, layout=layout, requires_grad=True)
    extra = {} if bias is None else {"bias": bias}
    extra.update(mods or {})
    out, lse = (_attention if bias is not None else tileattn.attention)(
        q, k, v, causal=causal, window=window, scale=scale, block_mask=block_mask, return_lse=True, **extra)
    mask = None if block_mask is None else block_mask.to_dense()
    ref_bias = None
    if bias is not None and bias.dtype == torch.bool:
        mask = bias if mask is None else mask & bias
    elif bias is not None:
        ref_bias = bias
    assert out.dtype == dtype and out.shape == (B, Hq, Nq, Dv)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Nq)

    refs = {}
    for name, upcast in (("64", True), ("lp", False)):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, l = attention_ref(qq, kk, vv, causal=causal, window=window, mask=mask, bias=ref_bias, scale=scale,
                             upcast=upcast, **(ref_mods or {}))
        refs[name] = (qq, kk, vv, o, l)
    q64, k64, v64, o64, l64 = refs["64"]
    qlp, klp, vlp, olp, llp = refs["lp"]
    assert_close("out", out, o64, olp, dtype=dtype, floor=floor)
    assert_close("lse", lse, l64, llp, dtype=dtype, floor=floor)
    if not check_grad:
        return out, lse
    do = torch.randn_like(out)
    out.backward(do)
    o64.backward(do.double())
    olp.backward(do)
    for name, ours, r64, rlp in (("dq", q, q64, qlp), ("dk", k, k64, klp), ("dv", v, v64, vlp)):
        assert ours.grad.dtype == dtype and ours.grad.shape == ours.shape
        if r64.grad.norm() == 0:  # e.g. a single visible key: softmax is constant
            assert ours.grad.float().abs().max() < 1e-2, name
        else:
            assert_close(name, ours.grad, r64.grad, rlp.grad, dtype=dtype, floor=floor)
    return out, lse


def spy_ws(monkeypatch) -> list:
    """Record, per forward kernel launch, whether it took the warp-specialized walk (``meta["WS"]``: "off",
    "auto" or "on"); returns the list the launches append to."""
    from tileattn.kernels import attention as A

    seen, launch = [], A._launch

    def spy(kernel, table, grid_fn, args, meta, *rest):
        if A._kernel_name(kernel) == "_attn_fwd":
            seen.append(meta.get("WS", "off"))
        return launch(kernel, table, grid_fn, args, meta, *rest)

    monkeypatch.setattr(A, "_launch", spy)
    return seen
