"""tileattn.attention_weights: the Triton weights kernel against float64 probabilities (under the
interpreter on CPU), selections, masks, LSE reuse, bad input, the AOT specs, and the maps script."""
import importlib.util
import math
import os

import pytest
import torch

import tileattn
from tileattn.reference import _expand_kv, visible_mask
from tileattn.weights import attention_weights
from helpers import DEVICE, assert_close, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def probs_ref(q, k, *, causal=False, window=None, bias=None, scale=None, upcast=True):
    """softmax(scale q k^T + bias) with masks; float64 when ``upcast``, else matmul in q's dtype and the
    softmax in float32 (what a same-dtype PyTorch program does). Rows with no visible key are 0."""
    hq, nq, nk, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = _expand_kv(k, hq)
    if upcast:
        s = torch.matmul(q.double(), kk.double().transpose(-1, -2)) * scale
    else:
        s = (torch.matmul(q, kk.transpose(-1, -2)) * scale).float()
    ok = visible_mask(nq, nk, causal=causal, window=window, device=q.device)
    if bias is not None:
        if bias.dtype == torch.bool:
            ok = ok & bias
        else:
            s = s + bias.to(s.dtype)
    s = s.masked_fill(~ok, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p if upcast else p.to(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,flags",
    [
        ((1, 1, 1, 1, 1, 16), {}),
        ((2, 4, 2, 17, 63, 40), {}),
        ((2, 4, 2, 17, 63, 40), {"causal": True}),
        ((1, 2, 1, 33, 17, 64), {"causal": True}),  # Nq > Nk: the first rows see nothing -> 0
        ((1, 3, 3, 37, 70, 24), {"window": (9, 3)}),
        ((1, 2, 1, 20, 20, 256), {"causal": True, "scale": 0.3}),
    ],
    ids=str,
)
def test_weights_match_reference(dtype, shape, flags):
    B, Hq, Hkv, Nq, Nk, D = shape
    q = randn(B, Hq, Nq, D, dtype=dtype, layout="bnhd")  # non-contiguous
    k = randn(B, Hkv, Nk, D, dtype=dtype, layout="bnhd")
    w = attention_weights(q, k, **flags)
    assert w.shape == (B, Hq, Nq, Nk) and w.dtype == dtype
    ref64 = probs_ref(q, k, **flags)
    assert_close("weights", w, ref64, probs_ref(q, k, upcast=False, **flags), dtype=dtype)
    visible = ref64.sum(-1) > 0
    assert torch.all(w[~visible] == 0)
    sums = w.double().sum(-1)[visible]
    assert torch.allclose(sums, torch.ones_like(sums), atol={torch.float32: 1e-5}.get(dtype, 2e-2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_weights_with_saved_lse_and_selection(dtype):
    q = randn(2, 4, 29, 32, dtype=dtype)
    k = randn(2, 2, 45, 32, dtype=dtype)
    v = randn(2, 2, 45, 32, dtype=dtype)
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
    full = attention_weights(q, k, lse, causal=True)
    assert torch.equal(full, attention_weights(q, k, causal=True))  # lse computed internally: same bits
    # P @ V reproduces the fused output
    pv = torch.matmul(full.double(), _expand_kv(v, 4).double())
    assert_close("P@V", pv, out.double(), dtype=dtype, floor=5e-3 if dtype == torch.float16 else 1e-5)
    # A selection runs other tiles than the full computation: the fp32 dot products (BLAS under the
    # interpreter, tensor cores on a GPU) may sum in another order, so the entries agree to rounding of the
    # output dtype, not bitwise (bitwise equality held on some CPUs and not on others).
    eps = torch.finfo(dtype).eps
    sub = attention_weights(q, k, lse, causal=True, heads=[3, 0, -1], rows=slice(5, 29, 3))
    torch.testing.assert_close(sub, full[:, [3, 0, 3]][:, :, 5:29:3], rtol=4 * eps, atol=4 * eps)
    one = attention_weights(q, k, lse, causal=True, heads=1, rows=torch.tensor([28, 0]))
    torch.testing.assert_close(one, full[:, 1:2][:, :, [28, 0]], rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mshape", [(29, 45), (2, 1, 29, 45), (1, 4, 1, 45), (45,)], ids=str)
def test_weights_bias(kind, mshape):
    q = randn(2, 4, 29, 16, dtype=torch.float32)
    k = randn(2, 4, 45, 16, dtype=torch.float32)
    if kind == "bool":
        bias = torch.rand(mshape, device=DEVICE) > 0.3
        bias[..., 0] = True
    else:
        bias = torch.randn(mshape, device=DEVICE)
        bias[..., 1] = -math.inf
    w = attention_weights(q, k, bias=bias, window=(20, 5))
    assert_close("weights", w, probs_ref(q, k, bias=bias, window=(20, 5)), dtype=torch.float32)


def test_weights_block_mask():
    from tileattn import masks

    q = randn(1, 2, 40, 32, dtype=torch.float16)
    k = randn(1, 2, 40, 32, dtype=torch.float16)
    bm = tileattn.create_block_mask(masks.sliding_window(7, 0), None, None, 40, 40, block_size=16, device=DEVICE)
    w = attention_weights(q, k, block_mask=bm)
    ref = probs_ref(q, k, window=(7, 0))
    assert_close("weights", w, ref, probs_ref(q, k, window=(7, 0), upcast=False), dtype=torch.float16)


def test_weights_bad_input():
    q = randn(1, 2, 8, 16, dtype=torch.float32)
    k = randn(1, 2, 8, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="lse"):
        attention_weights(q, k, torch.zeros(1, 2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="heads"):
        attention_weights(q, k, heads=[2])
    with pytest.raises(ValueError, match="rows"):
        attention_weights(q, k, rows=torch.tensor([8]))
    with pytest.raises(TypeError, match="heads"):
        attention_weights(q, k, heads=True)
    with pytest.raises(ValueError, match="4 dimensions"):
        attention_weights(q[0], k)
    with pytest.raises(ValueError, match="multiple"):
        attention_weights(randn(1, 3, 8, 16, dtype=torch.float32), k)
    with pytest.raises(TypeError, match="dtype"):
        attention_weights(q, k.half())


def test_weights_aot_specs():
    import inspect

    from tileattn.kernels import weights as kw
    from tileattn.kernels.utils import KernelSpec

    specs = kw.aot_specs()
    assert specs and all(isinstance(s, KernelSpec) for s in specs)
    fn = getattr(kw._attn_weights_kernel, "fn", kw._attn_weights_kernel)
    params = list(inspect.signature(fn).parameters)
    for s in specs:
        assert list(s.signature) == params, s.name
        assert all(s.signature[c] == "constexpr" for c in s.constexprs)


def test_attention_maps_script(tmp_path):
    spec = importlib.util.spec_from_file_location("attention_maps", os.path.join(ROOT, "scripts", "attention_maps.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "maps.png"
    assert mod.main(["--out", str(out), "--seq", "20", "--dim", "16", "--heads", "2", "--layers", "1",
                     "--window", "4"]) == 0
    assert out.stat().st_size > 1000


def test_weights_validate_block_mask_and_bias_first():
    q = torch.randn(1, 2, 16, 16, device=DEVICE)
    lse = torch.zeros(1, 2, 16, device=DEVICE)
    with pytest.raises(TypeError, match="BlockMask"):
        tileattn.attention_weights(q, q, lse, block_mask=torch.ones(16, 16, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError):
        tileattn.attention_weights(q, q, lse, bias=[1, 2])
