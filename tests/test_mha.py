"""tileattn.nn.MultiheadAttention against torch.nn.MultiheadAttention with copied weights: outputs,
attention weights (from the Triton weights kernel) and gradients; state_dict compatibility; fallbacks;
the LightningAttention re-export; a smoke run of scripts/train_tiny_gpt.py."""
import importlib.util
import os

import pytest
import torch

import tileattn
import tileattn.nn as tnn
from tileattn import _utils
from helpers import DEVICE, assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, L, S, E, H = 2, 11, 17, 32, 4


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _utils._warned.clear()
    yield


def make_pair(dtype=torch.float32, **kw):
    ref = torch.nn.MultiheadAttention(E, H, device=DEVICE, **kw)
    with torch.no_grad():  # non-zero biases so they are exercised
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.2)
    ours = tnn.MultiheadAttention(E, H, device=DEVICE, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


def inputs(batch_first, batched=True, kdim=E, vdim=E, dtype=torch.float32, self_attn=False):
    def mk(n, d):
        if not batched:
            return torch.randn(n, d, device=DEVICE).to(dtype)
        x = torch.randn(N, n, d, device=DEVICE).to(dtype)
        return x if batch_first else x.transpose(0, 1).contiguous()

    q = mk(L, E)
    if self_attn:
        return q, q, q
    return q, mk(S, kdim), mk(S, vdim)


def kpm_mask(n_keys, kind, batched=True, extra_pad=False):
    m = torch.rand(N, n_keys, device=DEVICE) > 0.7  # True = ignore
    m[:, 0] = False
    if kind == "float":
        m = torch.zeros(m.shape, device=DEVICE).masked_fill(m, float("-inf"))
    return m if batched else m[0]


def attn_mask(n_q, n_keys, kind, three_d=False, batched=True):
    m = torch.rand((N * H if batched else H) if three_d else 1, n_q, n_keys, device=DEVICE) > 0.7
    m[..., 0] = False
    if not three_d:
        m = m[0]
    if kind == "float":
        m = torch.randn(m.shape, device=DEVICE).masked_fill(m, float("-inf"))
    return m


def run_both(ref, ours, q, k, v, dtype=torch.float32, **fkw):
    o1, w1 = ref(q, k, v, **fkw)
    o2, w2 = ours(q, k, v, **fkw)
    ref64 = ref.double()
    o64, w64 = ref64(q.double(), k.double(), v.double(),
                     **{n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                        for n, x in fkw.items()})
    ref.to(dtype)
    assert o2.shape == o1.shape and o2.dtype == o1.dtype
    assert_close("out", o2, o64, o1, dtype=dtype)
    if w1 is None:
        assert w2 is None
    else:
        assert w2.shape == w1.shape and w2.dtype == w1.dtype
        assert_close("weights", w2, w64, w1, dtype=dtype)
    return o2, w2


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "attn2d_bool+kpm_bool", "attn3d_float+kpm_bool", "attn2d_float"])
def test_mha_matches_torch(batch_first, need_weights, average, masks):
    ref, ours = make_pair(batch_first=batch_first)
    q, k, v = inputs(batch_first)
    fkw = {"need_weights": need_weights, "average_attn_weights": average}
    if "kpm_bool" in masks:
        fkw["key_padding_mask"] = kpm_mask(S, "bool")
    if "attn2d" in masks:
        fkw["attn_mask"] = attn_mask(L, S, masks.split("_")[1].split("+")[0])
    if "attn3d" in masks:
        fkw["attn_mask"] = attn_mask(L, S, "float", three_d=True)
    run_both(ref, ours, q, k, v, **fkw)


@pytest.mark.parametrize(
    "kw",
    [dict(kdim=12, vdim=20), dict(add_bias_kv=True), dict(add_zero_attn=True),
     dict(add_bias_kv=True, add_zero_attn=True, kdim=12, vdim=20), dict(bias=False)],
    ids=str,
)
@pytest.mark.parametrize("with_masks", [False, True])
def test_mha_options(kw, with_masks):
    ref, ours = make_pair(batch_first=True, **kw)
    q, k, v = inputs(True, kdim=kw.get("kdim", E), vdim=kw.get("vdim", E))
    fkw = {}
    if with_masks:
        fkw = {"key_padding_mask": kpm_mask(S, "float"), "attn_mask": attn_mask(L, S, "bool")}
    run_both(ref, ours, q, k, v, **fkw)


def test_mha_self_attention_unbatched_and_causal_hint():
    ref, ours = make_pair(batch_first=False)
    x, _, _ = inputs(False, self_attn=True)
    causal = torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1)
    run_both(ref, ours, x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    run_both(ref, ours, x, x, x, attn_mask=causal, is_causal=True, need_weights=True)
    xu, ku, vu = inputs(False, batched=False)
    run_both(ref, ours, xu, ku, vu, key_padding_mask=kpm_mask(S, "bool", batched=False),
             attn_mask=attn_mask(L, S, "float", three_d=True, batched=False), average_attn_weights=False)
    with pytest.raises(ValueError, match="is_causal"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mha_low_precision(dtype):
    ref, ours = make_pair(dtype, batch_first=True)
    q, k, v = inputs(True, dtype=dtype)
    run_both(ref, ours, q, k, v, dtype=dtype, key_padding_mask=kpm_mask(S, "bool"))


def test_mha_backward_matches_torch():
    ref, ours = make_pair(batch_first=True, add_bias_kv=True)
    q, k, v = (x.requires_grad_() for x in inputs(True))
    kpm = kpm_mask(S, "bool")
    am = attn_mask(L, S, "bool")
    do = torch.randn(N, L, E, device=DEVICE)
    grads = []
    for m in (ref, ours):
        out, _ = m(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
        grads.append(torch.autograd.grad(out, [q, k, v] + list(m.parameters()), do))
    for (name, _), g1, g2 in zip([("q", 0), ("k", 0), ("v", 0)] + list(ref.named_parameters()), *grads):
        assert_close(f"grad {name}", g2, g1.double(), dtype=torch.float32, floor=1e-5)


def test_mha_state_dict_and_isinstance():
    for kw in (dict(), dict(kdim=12, vdim=20, add_bias_kv=True)):
        ref = torch.nn.MultiheadAttention(E, H, **kw)
        ours = tnn.MultiheadAttention(E, H, **kw)
        assert list(ref.state_dict()) == list(ours.state_dict())
        assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
        ours.load_state_dict(ref.state_dict())
        assert isinstance(ours, torch.nn.MultiheadAttention)


def test_mha_fully_masked_row_is_zero():
    _, ours = make_pair(batch_first=True)
    q, k, v = inputs(True)
    am = attn_mask(L, S, "bool")
    am[3] = True  # row 3 sees nothing
    out, w = ours(q, k, v, attn_mask=am)
    assert not out.isnan().any() and torch.all(w[:, 3] == 0)


def test_mha_dropout_is_fused_and_off_in_eval():
    """Training-mode dropout runs in the kernels (no fallback, no warning; tests/test_score_mods.py checks its
    values); eval mode has none and matches torch."""
    ref, ours = make_pair(batch_first=True, dropout=0.5)
    q, k, v = inputs(True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(3)
        o1, _ = ours(q, k, v)
        torch.manual_seed(3)
        o2, _ = ours(q, k, v)
        assert torch.equal(o1, o2) and torch.isfinite(o1).all()
        ref.eval(), ours.eval()
        run_both(ref, ours, q, k, v)


def test_mha_float64_falls_back():
    ref, ours = make_pair(torch.float64, batch_first=True)
    q, k, v = inputs(True, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        o2, w2 = ours(q, k, v)
    o1, w1 = ref(q, k, v)
    assert torch.allclose(o1, o2) and torch.allclose(w1, w2)


def test_lightning_attention_reexport():
    lightning = pytest.importorskip("tileattn.lightning")
    if not hasattr(lightning, "LightningAttention"):
        pytest.skip("tileattn.lightning has no LightningAttention yet")
    assert tnn.LightningAttention is lightning.LightningAttention
    with pytest.raises(AttributeError):
        tnn.NoSuchLayer


def test_train_tiny_gpt_smoke():
    spec = importlib.util.spec_from_file_location("train_tiny_gpt", os.path.join(ROOT, "scripts", "train_tiny_gpt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.train(attn="softmax", steps=4, dim=16, heads=2, layers=1, seq=16, batch=2, lr=1e-2, quiet=True)
    assert len(losses) == 4 and all(l == l for l in losses)
    assert losses[-1] < losses[0]
    data, vocab = mod.make_corpus(100)
    assert data.shape == (100,) and int(data.max()) < len(vocab)
    assert tileattn.attention is not None
