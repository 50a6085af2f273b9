"""tileattn.scaled_dot_product_attention against torch's: masks (bool / float, broadcast shapes),
top-left causal for every Nq / Nk relation, GQA, scale, leading dims, gradients, fallbacks, errors."""

import pytest
import torch
import torch.nn.functional as F

import tileattn
from tileattn import _utils
from helpers import DEVICE, assert_close, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _utils._warned.clear()
    yield


def sdpa_refs(q, k, v, **kw):
    """(float64 reference, same-dtype torch result) from torch's own SDPA."""
    m = kw.get("attn_mask")
    kw64 = dict(kw)
    if m is not None and m.is_floating_point():
        kw64["attn_mask"] = m.double()
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw64)
    ref_lp = F.scaled_dot_product_attention(q, k, v, **kw)
    return ref64, ref_lp


def check(q, k, v, **kw):
    out = tileattn.scaled_dot_product_attention(q, k, v, **kw)
    ref64, ref_lp = sdpa_refs(q, k, v, **kw)
    assert out.dtype == q.dtype
    assert_close("sdpa", out, ref64, ref_lp, dtype=q.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (33, 17), (17, 63), (1, 40)], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_causal_and_lengths(dtype, nq, nk, is_causal):
    q = randn(2, 3, nq, 40, dtype=dtype, layout="bnhd")  # non-contiguous
    k = randn(2, 3, nk, 40, dtype=dtype, layout="bnhd")
    v = randn(2, 3, nk, 24, dtype=dtype)
    check(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(
    "mshape", [(19, 37), (2, 1, 19, 37), (1, 4, 1, 37), (1, 37), (2, 4, 19, 37), (4, 19, 1)], ids=str)
def test_sdpa_masks_broadcast(dtype, kind, mshape):
    q = randn(2, 4, 19, 32, dtype=dtype)
    k = randn(2, 4, 37, 32, dtype=dtype)
    v = randn(2, 4, 37, 32, dtype=dtype)
    if kind == "bool":
        mask = torch.rand(mshape, device=DEVICE) > 0.4
        if mshape[-1] != 1:
            mask[..., 0] = True  # keep every row attending somewhere (torch GPU kernels give NaN otherwise)
        else:
            mask[:] = True
    else:
        mask = torch.randn(mshape, device=DEVICE).to(dtype if dtype != torch.float32 else torch.float32)
    check(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1), (4, 4)], ids=str)
def test_sdpa_gqa_scale(dtype, hq, hkv):
    q = randn(2, hq, 21, 64, dtype=dtype)
    k = randn(2, hkv, 30, 64, dtype=dtype)
    v = randn(2, hkv, 30, 48, dtype=dtype)
    check(q, k, v, enable_gqa=True, scale=0.21)
    check(q, k, v, enable_gqa=True, is_causal=True)
    check(q, k, v, enable_gqa=True, attn_mask=torch.rand(21, 30, device=DEVICE) > 0.2)


@pytest.mark.parametrize(
    "qs,ks,vs,kw",
    [
        ((13, 16), (9, 16), (9, 8), {}),  # 2-d
        ((3, 13, 16), (3, 9, 16), (3, 9, 16), {"is_causal": True}),  # 3-d
        ((2, 3, 4, 13, 16), (2, 3, 2, 9, 16), (2, 3, 2, 9, 16), {"enable_gqa": True}),  # 5-d GQA
        ((2, 3, 4, 13, 16), (1, 3, 4, 9, 16), (1, 3, 4, 9, 16), {}),  # broadcast batch
        ((2, 4, 13, 16), (2, 1, 9, 16), (2, 1, 9, 16), {}),  # a single kv head broadcasts
    ],
    ids=str,
)
def test_sdpa_leading_dims(qs, ks, vs, kw):
    check(randn(*qs, dtype=torch.float32), randn(*ks, dtype=torch.float32), randn(*vs, dtype=torch.float32), **kw)


def test_sdpa_leading_dims_with_mask():
    q = randn(2, 3, 4, 13, 16, dtype=torch.float32)
    k = randn(2, 3, 2, 9, 16, dtype=torch.float32)
    v = randn(2, 3, 2, 9, 16, dtype=torch.float32)
    mask = torch.rand(3, 1, 13, 9, device=DEVICE) > 0.3
    mask[..., 0] = True
    check(q, k, v, enable_gqa=True, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["causal_gqa", "bool_mask", "float_mask", "causal_nq_gt_nk"])
def test_sdpa_backward(dtype, case):
    nq, nk = (29, 13) if case == "causal_nq_gt_nk" else (23, 23)
    hkv = 2 if case == "causal_gqa" else 4
    q = randn(2, 4, nq, 32, dtype=dtype, requires_grad=True)
    k = randn(2, hkv, nk, 32, dtype=dtype, requires_grad=True)
    v = randn(2, hkv, nk, 32, dtype=dtype, requires_grad=True)
    kw = {"enable_gqa": hkv != 4}
    if case in ("causal_gqa", "causal_nq_gt_nk"):
        kw["is_causal"] = True
    elif case == "bool_mask":
        m = torch.rand(nq, nk, device=DEVICE) > 0.3
        m[:, 0] = True
        kw["attn_mask"] = m
    else:
        kw["attn_mask"] = torch.randn(2, 1, nq, nk, device=DEVICE, dtype=dtype)
    do = randn(2, 4, nq, 32, dtype=dtype)
    out = tileattn.scaled_dot_product_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    kw64 = dict(kw)
    if case == "float_mask":
        kw64["attn_mask"] = kw["attn_mask"].double()
    g64 = torch.autograd.grad(F.scaled_dot_product_attention(q64, k64, v64, **kw64), (q64, k64, v64), do.double())
    g_lp = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, **kw), (q, k, v), do)
    for name, g, r, rl in zip("qkv", grads, g64, g_lp):
        assert_close(f"d{name}", g, r, rl, dtype=dtype)


def test_sdpa_fully_masked_rows_are_zero():
    q = randn(1, 2, 6, 16, dtype=torch.float32, requires_grad=True)
    k = randn(1, 2, 9, 16, dtype=torch.float32)
    v = randn(1, 2, 9, 16, dtype=torch.float32)
    mask = torch.rand(6, 9, device=DEVICE) > 0.3
    mask[:, 0] = True
    mask[2] = False
    out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 2] == 0) and not out.isnan().any()
    out.sum().backward()
    assert torch.all(q.grad[:, :, 2] == 0)


def test_sdpa_fallbacks_warn_and_match_torch():
    q = randn(1, 2, 7, 16, dtype=torch.float32)
    k = randn(1, 2, 7, 16, dtype=torch.float32)
    v = randn(1, 2, 7, 16, dtype=torch.float32)
    with pytest.warns(UserWarning, match="float64"):
        out = tileattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert torch.allclose(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True))
    bias = torch.randn(7, 7, device=DEVICE, requires_grad=True)
    with pytest.warns(UserWarning, match="requires grad"):
        out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out.sum().backward()
    assert bias.grad is not None
    qb = randn(1, 1, 3, 300, dtype=torch.float32)
    with pytest.warns(UserWarning, match="head dims"):
        tileattn.scaled_dot_product_attention(qb, qb, qb)


def test_sdpa_errors():
    q = randn(1, 4, 7, 16, dtype=torch.float32)
    k = randn(1, 2, 7, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="is_causal"):
        tileattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(7, 7, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        tileattn.scaled_dot_product_attention(q, k, k)
    with pytest.raises(TypeError, match="attn_mask"):
        tileattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(7, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        tileattn.scaled_dot_product_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="broadcast"):
        tileattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="query"):
        tileattn.scaled_dot_product_attention(q.tolist(), q, q)


def test_large_sparse_bool_mask_runs_as_block_mask(monkeypatch):
    """A large boolean mask with mostly empty blocks runs on the block-sparse path (empty blocks skipped)
    and still equals torch."""
    import tileattn.block_mask as bmod

    calls = []
    orig = bmod.create_block_mask

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(bmod, "create_block_mask", spy)
    n = 1024
    doc = torch.arange(n, device=DEVICE) // 256
    mask = (doc[:, None] == doc[None, :])[None, None]  # 4 documents: 75% of blocks empty
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for _ in range(3))
    out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert calls, "block-sparse path not taken"
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_block_mask_cache_never_serves_a_stale_mask():
    """The eager BlockMask cache is keyed by tensor identity + version: an in-place edit or a new mask
    (even at a reused address) is rebuilt, never served stale."""
    n = 1024
    doc = torch.arange(n, device=DEVICE) // 256
    mask = (doc[:, None] == doc[None, :])[None, None].clone()
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for _ in range(3))

    def ref(m):
        return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m)

    for _ in range(2):
        out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert (out.double() - ref(mask)).norm() / ref(mask).norm() < 1e-5
    mask[..., 300:500, 0:200] = True  # in place: version bump
    out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out.double() - ref(mask)).norm() / ref(mask).norm() < 1e-5
    del mask
    mask2 = (doc[:, None] >= doc[None, :])[None, None].clone()  # may reuse the freed address
    out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask2)
    assert (out.double() - ref(mask2)).norm() / ref(mask2).norm() < 1e-5


def _jagged(lens, h, d, dtype=torch.float32):
    seqs = [torch.randn(n, h, d, device=DEVICE).to(dtype) for n in lens]
    return torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=True).transpose(1, 2)


@pytest.mark.parametrize("hq,hk,causal", [(2, 2, False), (4, 2, False), (2, 2, True)], ids=["mha", "gqa", "causal"])
def test_sdpa_nested_jagged_runs_fused(hq, hk, causal):
    """Jagged nested (B, H, j, E) inputs run on the varlen kernels (no fallback warning) and equal torch per
    sequence (and torch's own nested SDPA where it has a kernel: no causal, no GQA)."""
    import warnings

    torch.manual_seed(0)
    q = _jagged([3, 17, 1], hq, 16)
    k = _jagged([5, 9, 40] if not causal else [3, 17, 1], hk, 16)
    v = _jagged([5, 9, 40] if not causal else [3, 17, 1], hk, 24)
    if causal:
        k = torch.nested.nested_tensor_from_jagged(k.values().transpose(0, 1), q.offsets()).transpose(1, 2)
        v = torch.nested.nested_tensor_from_jagged(v.values().transpose(0, 1), q.offsets()).transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tileattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
    assert out.is_nested and out.shape[:2] == q.shape[:2] and out.shape[3] == 24
    do = torch.randn_like(out.values())
    grads = torch.autograd.grad(out.values(), (q, k, v), do)
    parts = [F.scaled_dot_product_attention(a[None], b[None], c[None], is_causal=causal, enable_gqa=hq != hk)[0]
             for a, b, c in zip(q.unbind(), k.unbind(), v.unbind())]
    ref_vals = torch.cat([p.transpose(0, 1) for p in parts]).transpose(0, 1)
    ref_grads = torch.autograd.grad(ref_vals, (q, k, v), do)
    if not causal and hq == hk:  # torch's own nested SDPA agrees
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v).values(), ref_vals, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.values(), ref_vals, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.values(), b.values(), rtol=1e-5, atol=1e-5)


def test_sdpa_nested_with_holes_falls_back():
    """A narrowed jagged tensor (offsets with holes, ``_lengths`` set) is not packed rows: it goes to torch
    with the one-time warning instead of attending over the holes."""
    base = torch.randn(2, 8, 2, 16, device=DEVICE)
    x = torch.nested.narrow(base, 1, torch.tensor([0, 0]), torch.tensor([3, 8]), layout=torch.jagged).transpose(1, 2)
    _utils._warned.clear()
    with pytest.warns(UserWarning, match="holes"):
        try:
            tileattn.scaled_dot_product_attention(x, x, x)
        except RuntimeError:
            pass  # torch itself may have no kernel for it; what matters is that ours did not run


def test_sdpa_nested_errors():
    q = _jagged([3, 5], 2, 16)
    k = _jagged([4, 5], 2, 16)
    with pytest.raises(ValueError, match="equal lengths"):
        tileattn.scaled_dot_product_attention(q, k, k, is_causal=True)
    with pytest.raises(ValueError, match="head counts"):
        tileattn.scaled_dot_product_attention(_jagged([3, 5], 4, 16), k, k)


def test_dropout_on_the_cpu_reference_path():
    """Without CUDA and without the interpreter, SDPA / MHA dropout run the PyTorch path (its own
    torch.rand keep mask) instead of raising."""
    import subprocess
    import sys

    code = (
        "import torch, tileattn\n"
        "q = torch.randn(1, 2, 8, 16, requires_grad=True)\n"
        "torch.manual_seed(0); a = tileattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)\n"
        "torch.manual_seed(0); b = tileattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)\n"
        "assert torch.equal(a, b) and not torch.equal(a, tileattn.scaled_dot_product_attention(q, q, q))\n"
        "a.sum().backward(); assert torch.isfinite(q.grad).all()\n"
        "m = tileattn.nn.MultiheadAttention(16, 2, dropout=0.3, batch_first=True).train()\n"
        "x = torch.randn(2, 5, 16); o, _ = m(x, x, x); assert torch.isfinite(o).all()\n"
        "print('ok')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
