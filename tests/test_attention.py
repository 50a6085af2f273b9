"""Fused softmax attention vs the float64 reference: outputs, LSE and every gradient."""
import warnings

import pytest
import torch

import tileattn
from tileattn.reference import attention_ref, visible_mask
from helpers import DEVICE, ON_GPU, assert_close, randn, run_case

DTYPES = [torch.float16, torch.float32, torch.bfloat16]


CASES = [
    # B, Hq, Hkv, Nq, Nk, D, Dv, causal, window
    pytest.param(1, 2, 2, 17, 17, 16, 16, False, None, id="dense-17-d16"),
    pytest.param(2, 2, 2, 63, 63, 64, 64, True, None, id="causal-63-d64"),
    pytest.param(1, 2, 2, 257, 257, 32, 32, True, None, id="causal-257"),
    pytest.param(1, 4, 2, 40, 70, 80, 80, False, None, id="gqa2-nq<nk-d80"),
    pytest.param(1, 4, 1, 70, 40, 96, 48, True, None, id="mqa-nq>nk-causal-d96-dv48"),
    pytest.param(1, 2, 1, 1, 65, 128, 128, True, None, id="decode-nq1-d128"),
    pytest.param(1, 1, 1, 1, 1, 16, 16, False, None, id="n1"),
    pytest.param(2, 2, 2, 65, 65, 24, 40, False, (8, 4), id="window-8-4-dv40"),
    pytest.param(1, 2, 2, 90, 90, 16, 16, True, (20, -1), id="causal-window-20"),
    pytest.param(1, 2, 1, 33, 95, 16, 16, False, (-1, 5), id="window-right-only-nq<nk"),
    pytest.param(1, 1, 1, 45, 45, 256, 256, True, None, id="d256"),
    pytest.param(1, 1, 1, 37, 37, 192, 64, False, None, id="d192-dv64"),
    pytest.param(1, 1, 1, 19, 23, 3, 5, False, None, id="d3-dv5"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,causal,window", CASES)
def test_attention_matches_reference(B, Hq, Hkv, Nq, Nk, D, Dv, causal, window, dtype):
    run_case(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal=causal, window=window)


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,causal,window", [CASES[1], CASES[4], CASES[7]])
def test_attention_bf16(B, Hq, Hkv, Nq, Nk, D, Dv, causal, window):
    run_case(B, Hq, Hkv, Nq, Nk, D, Dv, torch.bfloat16, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_non_contiguous_inputs(dtype):
    # (B, N, H, D) buffers viewed as (B, H, N, D), as users get from x.transpose(1, 2)
    run_case(2, 4, 2, 50, 61, 64, 32, dtype, causal=True, layout="bnhd")


def test_custom_scale():
    run_case(1, 2, 2, 30, 30, 32, 32, torch.float32, scale=0.3)


@pytest.mark.parametrize(
    "nq,nk,causal,window",
    [
        pytest.param(40, 10, True, None, id="causal-nq>nk"),
        pytest.param(40, 10, False, (3, 0), id="window-nq>nk"),
        pytest.param(50, 20, False, (0, 0), id="window-diag-only"),
    ],
)
def test_masked_rows_zero_not_nan(nq, nk, causal, window):
    q = randn(1, 2, nq, 16, dtype=torch.float32, requires_grad=True)
    k = randn(1, 2, nk, 16, dtype=torch.float32, requires_grad=True)
    v = randn(1, 2, nk, 16, dtype=torch.float32, requires_grad=True)
    out, lse = tileattn.attention(q, k, v, causal=causal, window=window, return_lse=True)
    empty = ~visible_mask(nq, nk, causal=causal, window=window).any(-1)
    assert empty.any()
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, empty])) and torch.isfinite(lse[:, :, ~empty]).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, empty] == 0)
    run_case(1, 2, 2, nq, nk, 16, 16, torch.float32, causal=causal, window=window)


def test_lse_gradient():
    q, k, v = (randn(1, 2, 21, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o2, l2 = attention_ref(q2, k2, v2, causal=True, upcast=True)
    (o2.square().sum() + l2.sum()).backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert_close("grad", a.grad, b.grad, dtype=torch.float32, floor=1e-5)


def test_backward_is_deterministic():
    q = randn(2, 4, 70, 32, dtype=torch.float16, requires_grad=True)
    k = randn(2, 2, 90, 32, dtype=torch.float16, requires_grad=True)
    v = randn(2, 2, 90, 32, dtype=torch.float16, requires_grad=True)
    do = torch.randn(2, 4, 70, 32, dtype=torch.float16, device=DEVICE)
    grads = []
    for _ in range(3):
        for t in (q, k, v):
            t.grad = None
        tileattn.attention(q, k, v, causal=True).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], g))


def _qkv(*shapes, dtype=torch.float16):
    return [torch.randn(*s, device=DEVICE).to(dtype) for s in shapes]


@pytest.mark.parametrize(
    "make,exc,match",
    [
        pytest.param(lambda: _qkv((2, 16, 8), (2, 16, 8), (2, 16, 8)), ValueError, "4 dimensions", id="rank"),
        pytest.param(lambda: _qkv((2, 2, 16, 8), (3, 2, 16, 8), (3, 2, 16, 8)), ValueError, "batch", id="batch"),
        pytest.param(lambda: _qkv((1, 3, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8)), ValueError, "multiple", id="head-ratio"),
        pytest.param(lambda: _qkv((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 15, 8)), ValueError, "same length", id="kv-len"),
        pytest.param(lambda: _qkv((1, 2, 16, 8), (1, 2, 16, 4), (1, 2, 16, 8)), ValueError, "head dims", id="d-mismatch"),
        pytest.param(lambda: _qkv((1, 2, 16, 264), (1, 2, 16, 264), (1, 2, 16, 8)), ValueError, "256", id="d>256"),
        pytest.param(lambda: _qkv((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 300)), ValueError, "256", id="dv>256"),
        pytest.param(lambda: _qkv((1, 2, 0, 8), (1, 2, 16, 8), (1, 2, 16, 8)), ValueError, "empty", id="empty"),
        pytest.param(lambda: _qkv((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8), dtype=torch.float64), TypeError,
                     "float16", id="float64"),
        pytest.param(lambda: [torch.ones(1, 2, 16, 8, dtype=torch.int32)] * 3, TypeError, "float16", id="int"),
        pytest.param(lambda: _qkv((1, 2, 16, 8), (1, 2, 16, 8)) + [torch.randn(1, 2, 16, 8)], TypeError, "dtype",
                     id="dtype-mismatch"),
        pytest.param(lambda: [torch.randn(1, 2, 8, 16).transpose(-1, -2)] + _qkv((1, 2, 16, 8), (1, 2, 16, 8),
                     dtype=torch.float32), ValueError, "unit stride", id="last-stride"),
        pytest.param(lambda: ["q", "k", "v"], TypeError, "torch.Tensor", id="not-a-tensor"),
        pytest.param(lambda: _qkv((1, 2, 16, 8), (1, 2, 16, 8)) + [torch.empty(1, 2, 16, 8, dtype=torch.float16,
                     device="meta")], ValueError, "one device", id="device-mismatch"),
    ],
)
def test_bad_inputs(make, exc, match):
    with pytest.raises(exc, match=match):
        tileattn.attention(*make())


def test_bad_flags():
    q, k, v = _qkv((1, 2, 16, 16), (1, 2, 16, 16), (1, 2, 16, 16))
    with pytest.raises(TypeError, match="window"):
        tileattn.attention(q, k, v, window=4)
    with pytest.raises(ValueError, match="window"):
        tileattn.attention(q, k, v, window=(-3, 0))
    with pytest.raises(TypeError, match="causal"):
        tileattn.attention(q, k, v, causal="yes")
    with pytest.raises(ValueError, match="finite"):
        tileattn.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="BlockMask"):
        tileattn.attention(q, k, v, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))


@pytest.mark.skipif(ON_GPU, reason="the PyTorch fallback is for CPU tensors without the interpreter")
def test_cpu_fallback_without_interpreter_warns_once(monkeypatch):
    import tileattn._utils as U

    monkeypatch.setattr(U, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(U, "_warned", set())
    q, k, v = (randn(1, 2, 20, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    with pytest.warns(UserWarning, match="PyTorch reference path"):
        out = tileattn.attention(q, k, v, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tileattn.attention(q, k, v, causal=True)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), causal=True)
    assert_close("out", out, ref, dtype=torch.float32)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


# ------------------------------------------------------------------------------------------------
# GPU: larger sizes in the training dtypes (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "B,Hq,Hkv,Nq,Nk,D,Dv,causal,window",
    [
        pytest.param(2, 8, 8, 1024, 1024, 64, 64, False, None, id="1k-d64"),
        pytest.param(2, 8, 2, 1500, 1500, 128, 128, True, None, id="1500-causal-gqa-d128"),
        pytest.param(1, 8, 8, 2048, 2048, 128, 128, True, (256, 0), id="2k-window256"),
        pytest.param(1, 4, 4, 777, 1999, 256, 256, True, None, id="d256-nq<nk"),
        pytest.param(1, 4, 4, 1000, 1000, 80, 80, False, None, id="d80"),
        pytest.param(1, 8, 1, 1, 4096, 128, 128, True, None, id="decode-mqa"),
    ],
)
def test_attention_gpu(B, Hq, Hkv, Nq, Nk, D, Dv, causal, window, dtype):
    run_case(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal=causal, window=window, device="cuda")


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(1, 1, 45, 60), (2, 1, 1, 60), (45, 60)], ids=["11nm", "b1-1m", "nm"])
def test_mask_tensor_path(kind, shape):
    """The masked-tile variant used by the SDPA drop-in: a bool (True = attend) or float (added) tensor
    broadcast to (B, Hq, Nq, Nk), combined with causal; gradients for q, k, v."""
    from tileattn.attention import _attention
    from tileattn.reference import _expand_kv

    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 45, 60, 32
    q = randn(B, Hq, Nq, D, dtype=torch.float32, requires_grad=True)
    k = randn(B, Hkv, Nk, D, dtype=torch.float32, requires_grad=True)
    v = randn(B, Hkv, Nk, D, dtype=torch.float32, requires_grad=True)
    if kind == "bool":
        m = torch.rand(*shape, device=DEVICE) > 0.3
    else:
        m = torch.randn(*shape, device=DEVICE)
        m = m.masked_fill(torch.rand(*shape, device=DEVICE) > 0.8, float("-inf"))
    out, lse = _attention(q, k, v, causal=True, bias=m, return_lse=True)
    do = torch.randn_like(out)
    out.backward(do)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q2 @ _expand_kv(k2, Hq).transpose(-1, -2) / D ** 0.5
    ok = visible_mask(Nq, Nk, causal=True, device=DEVICE).expand(B, Hq, Nq, Nk)
    if kind == "bool":
        ok = ok & m
    else:
        s = s + m.double()
    s = s.masked_fill(~ok, float("-inf"))
    l2 = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(l2), torch.zeros_like(l2), l2)[..., None])
    o2 = p @ _expand_kv(v2, Hq)
    o2.backward(do.double())
    assert_close("out", out, o2, dtype=torch.float32)
    assert_close("lse", lse, l2, dtype=torch.float32)
    for name, a, b in (("dq", q, q2), ("dk", k, k2), ("dv", v, v2)):
        assert_close(name, a.grad, b.grad, dtype=torch.float32)


@pytest.mark.skipif(ON_GPU, reason="the PyTorch fallback is for CPU tensors without the interpreter")
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_cpu_fallback_matches_kernels_with_mask_tensor(monkeypatch, kind):
    import tileattn._utils as U
    from tileattn.attention import _attention

    q, k, v = (randn(2, 2, 33, 16, dtype=torch.float32) for _ in range(3))
    m = torch.rand(33, 33) > 0.3 if kind == "bool" else torch.randn(1, 2, 33, 33)
    out_k, lse_k = _attention(q, k, v, window=(8, 0), bias=m, return_lse=True)
    monkeypatch.setattr(U, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(U, "_warned", set())
    with pytest.warns(UserWarning):
        out_r, lse_r = _attention(q, k, v, window=(8, 0), bias=m, return_lse=True)
    assert_close("out", out_k, out_r.double(), dtype=torch.float32)
    assert_close("lse", lse_k, lse_r.double(), dtype=torch.float32)


@pytest.mark.parametrize(
    "Nq,Nk,causal,window,splits",
    [
        pytest.param(1, 700, True, None, 3, id="decode-3splits"),
        pytest.param(5, 1000, False, (100, 0), 4, id="window-4splits"),
        pytest.param(300, 260, False, (0, 0), 3, id="empty-rows-3splits"),
    ],
)
def test_split_kv_forward(Nq, Nk, causal, window, splits):
    """Split-KV (flash-decoding) forward: per-split partial results combined by LSE equal the reference,
    including rows that see no key in some or all splits."""
    from tileattn.kernels.attention import attention_forward
    from tileattn._utils import check_window

    q = randn(2, 4, Nq, 32, dtype=torch.float16)
    k = randn(2, 2, Nk, 32, dtype=torch.float16)
    v = randn(2, 2, Nk, 16, dtype=torch.float16)
    left, right = check_window(window, causal)
    out, lse = attention_forward(q, k, v, scale=32 ** -0.5, left=left, right=right, num_splits=splits)
    o64, l64 = attention_ref(q, k, v, causal=causal, window=window, upcast=True)
    olp, llp = attention_ref(q, k, v, causal=causal, window=window)
    assert out.dtype == torch.float16 and out.is_contiguous()
    assert_close("out", out, o64, olp, dtype=torch.float16)
    assert_close("lse", lse, l64, llp, dtype=torch.float16)
