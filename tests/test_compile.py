"""torch.compile(fullgraph=True) of the public ops equals eager (forward and backward), i.e. the ops
trace through torch.library with fake implementations and registered autograd, without graph breaks.

On CPU the backend is ``aot_eager`` (Dynamo + AOTAutograd + fake-tensor propagation, the parts that
break when an op is not registered properly) because inductor's C++ compile is too slow for CI on a
shared CPU; on a GPU the default inductor backend is used.
"""
import pytest
import torch
import triton
import triton.language as tl

import tileattn
import tileattn.nn as tnn
from helpers import DEVICE, ON_GPU, randn, rel_err

BACKEND = "inductor" if ON_GPU else "aot_eager"


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend=BACKEND)


def same(name, a, b, tol=1e-6):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"{name}: compiled vs eager rel err {err:.3g}"


def fwd_bwd(fn, inputs, do=None):
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    do = torch.randn_like(out) if do is None else do
    grads = torch.autograd.grad(out, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], do)
    return out, grads, do


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_compile_attention_fwd_bwd(layout):
    q = randn(2, 4, 19, 32, dtype=torch.float16, requires_grad=True, layout=layout)
    k = randn(2, 2, 23, 32, dtype=torch.float16, requires_grad=True, layout=layout)
    v = randn(2, 2, 23, 32, dtype=torch.float16, requires_grad=True, layout=layout)

    def fn(q, k, v):
        return tileattn.attention(q, k, v, causal=True)

    o1, g1, do = fwd_bwd(fn, (q, k, v))
    o2, g2, _ = fwd_bwd(compiled(fn), (q, k, v), do)
    same("out", o2, o1)
    for n, a, b in zip("qkv", g2, g1):
        same(f"d{n}", a, b)


def test_compile_sdpa_dropin():
    q = randn(2, 4, 21, 16, dtype=torch.float32, requires_grad=True)
    k = randn(2, 2, 13, 16, dtype=torch.float32, requires_grad=True)
    v = randn(2, 2, 13, 16, dtype=torch.float32, requires_grad=True)
    mask = torch.rand(21, 13, device=DEVICE) > 0.3
    mask[:, 0] = True

    def fn(q, k, v, mask):
        a = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # Nq > Nk
        b = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
        return a + b

    o1, g1, do = fwd_bwd(fn, (q, k, v, mask))
    o2, g2, _ = fwd_bwd(compiled(fn), (q, k, v, mask), do)
    same("out", o2, o1)
    for n, a, b in zip("qkv", g2, g1):
        same(f"d{n}", a, b)


def test_compile_attention_weights():
    q = randn(1, 4, 17, 16, dtype=torch.float16)
    k = randn(1, 2, 29, 16, dtype=torch.float16)

    def fn(q, k):
        full = tileattn.attention_weights(q, k, causal=True)
        sub = tileattn.attention_weights(q, k, window=(5, 2), heads=[1, 3], rows=slice(3, 12))
        return full, sub

    f1, s1 = fn(q, k)
    f2, s2 = compiled(fn)(q, k)
    same("full", f2, f1)
    same("sub", s2, s1)


@pytest.mark.parametrize("need_weights", [False, True])
def test_compile_mha(need_weights):
    torch.manual_seed(0)
    m = tnn.MultiheadAttention(32, 4, batch_first=True, device=DEVICE)
    x = torch.randn(2, 11, 32, device=DEVICE, requires_grad=True)
    kpm = torch.rand(2, 11, device=DEVICE) > 0.7
    kpm[:, 0] = False

    def fn(x, kpm):
        return m(x, x, x, key_padding_mask=kpm, need_weights=need_weights)

    (o1, w1) = fn(x, kpm)
    (o2, w2) = compiled(fn)(x, kpm)
    same("out", o2, o1)
    if need_weights:
        same("weights", w2, w1)
    do = torch.randn_like(o1)
    g1 = torch.autograd.grad(o1, [x] + list(m.parameters()), do)
    g2 = torch.autograd.grad(o2, [x] + list(m.parameters()), do)
    for i, (a, b) in enumerate(zip(g2, g1)):
        same(f"grad {i}", a, b, tol=1e-5)


def test_compile_score_mods_and_dropout():
    """Soft-cap, ALiBi and dropout go through the custom ops (no graph break); with a fixed generator the
    compiled call draws the same seed as eager and matches it bitwise-closely, gradients too."""
    q, k, v = (randn(1, 2, 17, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.1, 0.3], device=DEVICE)

    def fn(q, k, v):
        return tileattn.attention(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes, dropout_p=0.2)

    torch.manual_seed(7)
    o1, g1, do = fwd_bwd(fn, (q, k, v))
    torch.manual_seed(7)
    o2, g2, _ = fwd_bwd(compiled(fn), (q, k, v), do)
    same("out", o2, o1)
    for a, b in zip(g2, g1):
        same("grad", a, b)


def test_compile_score_mod():
    """A ScoreMod reaches the custom ops as a registry id plus its tensors: no graph break."""
    from test_score_mods import R, rel_bias, rel_bias_grad

    q, k, v = (randn(1, 2, 17, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    sm = tileattn.ScoreMod(rel_bias, rel_bias_grad, torch.randn(2, R + 1, device=DEVICE))

    def fn(q, k, v):
        return tileattn.attention(q, k, v, causal=True, softcap=3.0, score_mod=sm)

    o1, g1, do = fwd_bwd(fn, (q, k, v))
    o2, g2, _ = fwd_bwd(compiled(fn), (q, k, v), do)
    same("out", o2, o1)
    for a, b in zip(g2, g1):
        same("grad", a, b)


@triton.jit
def _shift(s, b, h, q_idx, kv_idx):
    return s - 0.25 * (kv_idx % 3).to(tl.float32)


@triton.jit
def _shift_grad(s, b, h, q_idx, kv_idx):
    return s * 0.0 + 1.0


def test_compile_fresh_score_mod():
    """A ScoreMod whose first call is compiled (never run eagerly): its registry id is assigned when the
    ScoreMod is built, so the traced custom op finds it."""
    q, k, v = (randn(1, 2, 9, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    sm = tileattn.ScoreMod(_shift, _shift_grad)
    fn = lambda q, k, v: tileattn.attention(q, k, v, score_mod=sm)
    o2, g2, do = fwd_bwd(compiled(fn), (q, k, v))
    o1, g1, _ = fwd_bwd(fn, (q, k, v), do)
    same("out", o2, o1)
    for a, b in zip(g2, g1):
        same("grad", a, b)
