"""Lightning attention (linear attention with decay): Triton kernels (under the interpreter on CPU) against the
float64 references, states, chunking, decoding, compile, bad input, determinism and linear work."""
import math

import pytest
import torch

import tileattn
from tileattn import reference
from tileattn.lightning import LightningAttention, _lightning_attention, lightning_attention
from tileattn.lightning import lightning_decay_rates, lightning_decode
from tileattn.kernels import lightning as klightning
from helpers import DEVICE, ON_GPU, TF32_FLOOR, assert_close, mismatch_report, randn, rel_err

H = 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# on GPU fp32 inputs run TF32 dots (documented); the interpreter computes them in fp32
FP32_FLOOR = TF32_FLOOR if ON_GPU else None


def _floor(dtype):
    return FP32_FLOOR if dtype == torch.float32 else None


def _inputs(B, Hh, N, D, DV, dtype, layout="bhnd", state=True):
    q = randn(B, Hh, N, D, dtype=dtype, layout=layout, requires_grad=True)
    k = randn(B, Hh, N, D, dtype=dtype, layout=layout, requires_grad=True)
    v = randn(B, Hh, N, DV, dtype=dtype, layout=layout, requires_grad=True)
    h0 = (0.5 * torch.randn(B, Hh, D, DV, device=DEVICE)).requires_grad_() if state else None
    return q, k, v, h0


def _grads(out, ht, do, dht, inputs):
    ins = [x for x in inputs if x is not None]
    loss = (out.float() * do.float()).sum() + (ht.float() * dht.float()).sum()
    return torch.autograd.grad(loss, ins)


def check_against_reference(q, k, v, h0, decay, *, g=None, scale=None, block_size=None, grads=True, ref=None,
                            dg_atol=None):
    """Output, final state and gradients (q, k, v, initial_state, g) vs the float64 reference with the
    flash-attention tolerance rule (2x the error of the same computation by PyTorch in q's dtype)."""
    dtype = q.dtype
    ref = ref or reference.linear_attention_quadratic_ref
    out, ht = _lightning_attention(q, k, v, decay, g=g, scale=scale, initial_state=h0, output_final_state=True,
                                   block_size=block_size)
    assert out.dtype == dtype and ht.dtype == torch.float32
    o64, h64 = ref(q, k, v, decay, g=g, scale=scale, initial_state=h0, upcast=True)
    olp, hlp = reference.linear_attention_quadratic_ref(q, k, v, decay, g=g, scale=scale, initial_state=h0,
                                                        upcast=False)
    assert_close("out", out, o64, olp, floor=_floor(dtype))
    assert_close("final_state", ht, h64, hlp, dtype=dtype, floor=_floor(dtype))
    if not grads:
        return
    do = torch.randn_like(o64)
    dht = torch.randn_like(h64)
    ins = (q, k, v, h0, g)
    gr = _grads(out, ht, do, dht, ins)
    g64 = _grads(o64, h64, do, dht, ins)
    glp = _grads(olp, hlp, do.to(olp.dtype), dht.to(hlp.dtype), ins)
    names = [n for n, x in zip(("dq", "dk", "dv", "dh0", "dg"), ins) if x is not None]
    for name, a, b, c in zip(names, gr, g64, glp):
        floor = _floor(dtype)
        if name == "dg" and dtype != torch.float32:
            # dg is a reverse cumulative sum over the sequence of q.dq - k.dk (fla's identity), whose terms
            # carry the 16-bit rounding of the dq / dk dot operands (truncation under the interpreter);
            # PyTorch's same-dtype baseline gets dg through float64 decay factors, so it is no like-for-like
            # baseline here: a larger floor instead
            floor = 3e-2
        if name == "dg" and dg_atol is not None:  # a dg that is ~0 in exact arithmetic: absolute error
            assert (a - b).abs().max() < dg_atol, mismatch_report(a, b)
            continue
        assert_close(name, a, b, c, dtype=dtype, floor=floor)


# ----------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 17, 63, 130])
def test_matches_quadratic_reference(N, dtype):
    q, k, v, h0 = _inputs(1, H, N, 32, 48, dtype)
    check_against_reference(q, k, v, h0, lightning_decay_rates(H, device=DEVICE))


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_block_sizes(block_size):
    q, k, v, h0 = _inputs(1, H, 70, 16, 24, torch.float32)
    decay = torch.tensor([0.02, 0.7], device=DEVICE)
    check_against_reference(q, k, v, h0, decay, block_size=block_size)


@pytest.mark.parametrize("decay", ["none", "small", "large", "mixed", "huge"])
def test_decay_regimes(decay):
    rates = {
        "none": None,
        "small": torch.full((H,), 1e-3),
        "large": torch.tensor([8.0, 30.0]),  # lambda^BT underflows to 0; must not give NaN / inf
        "mixed": torch.tensor([0.0, 3.0]),
        "huge": torch.tensor([1e4, 88.0]),  # lambda = 0: each token sees only itself
    }[decay]
    rates = None if rates is None else rates.to(DEVICE)
    q, k, v, h0 = _inputs(1, H, 50, 16, 16, torch.float16)
    check_against_reference(q, k, v, h0, rates, block_size=16)


def test_matches_recurrent_reference():
    q, k, v, h0 = _inputs(2, H, 33, 24, 40, torch.float32)
    check_against_reference(q, k, v, h0, torch.tensor([0.1, 0.5], device=DEVICE), scale=1.0,
                            ref=reference.linear_attention_recurrent_ref)


@pytest.mark.parametrize("D,DV", [(16, 80), (96, 32), (1, 1), (3, 130), (256, 20)], ids=str)
def test_head_dims(D, DV):
    q, k, v, h0 = _inputs(1, 1 if max(D, DV) > 128 else H, 37, D, DV, torch.bfloat16)
    check_against_reference(q, k, v, h0, torch.full((q.shape[1],), 0.05, device=DEVICE))


def test_no_initial_state_and_no_decay():
    q, k, v, _ = _inputs(2, H, 40, 16, 32, torch.float16, state=False)
    check_against_reference(q, k, v, None, None)


def test_noncontiguous_inputs():
    q, k, v, h0 = _inputs(2, H, 45, 32, 16, torch.float16, layout="bnhd")
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_against_reference(q, k, v, h0, lightning_decay_rates(H, device=DEVICE))
    # strided (non-contiguous) output gradient
    out = lightning_attention(q, k, v)
    do = torch.randn(2, 45, H, 16, device=DEVICE, dtype=out.dtype).transpose(1, 2)
    dq, = torch.autograd.grad(out, q, do)
    dq_ref, = torch.autograd.grad(lightning_attention(q, k, v), q, do.contiguous())
    assert torch.equal(dq, dq_ref)


def test_default_scale_and_output_forms():
    q, k, v, _ = _inputs(1, H, 9, 16, 16, torch.float32, state=False)
    out = lightning_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (1, H, 9, 16)
    o64, _ = reference.linear_attention_quadratic_ref(q, k, v, scale=1 / 4.0)
    assert rel_err(out, o64) < 1e-5
    res = lightning_attention(q, k, v, scale=1.0, output_final_state=True)
    assert isinstance(res, tuple) and res[1].shape == (1, H, 16, 16)


# ----------------------------------------------------------------------------------------------------
# states, chunking, decoding
# ----------------------------------------------------------------------------------------------------
def test_two_chunked_calls_equal_one_call():
    N, n1 = 100, 37
    q, k, v, h0 = _inputs(1, H, N, 16, 24, torch.float32)
    decay = torch.tensor([0.05, 0.4], device=DEVICE)
    out, ht = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
    o1, s1 = lightning_attention(q[:, :, :n1], k[:, :, :n1], v[:, :, :n1], decay, initial_state=h0,
                                 output_final_state=True)
    o2, s2 = lightning_attention(q[:, :, n1:], k[:, :, n1:], v[:, :, n1:], decay, initial_state=s1,
                                 output_final_state=True)
    assert rel_err(torch.cat([o1, o2], dim=2), out) < 1e-5
    assert rel_err(s2, ht) < 1e-5
    # gradients through the passed state equal the one-call gradients
    do, dht = torch.randn_like(out), torch.randn_like(ht)
    g_one = _grads(out, ht, do, dht, (q, k, v, h0))
    g_two = _grads(torch.cat([o1, o2], dim=2), s2, do, dht, (q, k, v, h0))
    for a, b in zip(g_one, g_two):
        assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_token_by_token_equals_full(dtype):
    N, prompt = 24, 19
    q, k, v, h0 = _inputs(2, H, N, 20, 36, dtype)
    q, k, v, h0 = (x.detach() for x in (q, k, v, h0))
    decay = lightning_decay_rates(H, device=DEVICE)
    out, ht = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
    o_p, state = lightning_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], decay,
                                     initial_state=h0, output_final_state=True)
    outs = [o_p]
    for t in range(prompt, N):
        sl = slice(t, t + 1)
        o_t, new_state = lightning_decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, decay)
        assert o_t.shape == (2, H, 1, 36) and new_state.dtype == torch.float32
        outs.append(o_t)
        state = new_state
    floor = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(torch.cat(outs, dim=2), out) < floor
    assert rel_err(state, ht) < floor
    # decode from scratch (no state) is the first token of the op
    o0, s0 = lightning_decode(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    ref0, refs0 = lightning_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], output_final_state=True)
    assert rel_err(o0, ref0) < floor and rel_err(s0, refs0) < 1e-5


def test_decode_with_grad_uses_the_differentiable_op():
    q, k, v, h0 = _inputs(1, H, 1, 16, 16, torch.float32)
    out, st = lightning_decode(q, k, v, h0, torch.tensor([0.1, 0.2], device=DEVICE))
    (out.sum() + st.sum()).backward()
    assert q.grad is not None and h0.grad is not None
    o64, s64 = reference.linear_attention_recurrent_ref(q, k, v, torch.tensor([0.1, 0.2]), initial_state=h0)
    assert rel_err(out, o64) < 1e-5 and rel_err(st, s64) < 1e-5


def test_decode_is_one_small_launch():
    q, k, v, h0 = (x.detach() for x in _inputs(1, H, 1, 64, 64, torch.float16))
    lightning_decode(q, k, v, h0)
    programs, trips = klightning.LAST_LAUNCH["decode"]
    assert trips == 1 and programs == H * math.ceil(64 / klightning.plan(64, 64, torch.float16).DEC_BV)


# ----------------------------------------------------------------------------------------------------
# properties: determinism, linear work, compile, CPU path
# ----------------------------------------------------------------------------------------------------
def test_deterministic_bitwise():
    q, k, v, h0 = _inputs(1, H, 77, 32, 32, torch.bfloat16)
    decay = lightning_decay_rates(H, device=DEVICE)
    do = torch.randn(1, H, 77, 32, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out, ht = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
        g = torch.autograd.grad((out * do).sum() + ht.sum(), (q, k, v, h0))
        runs.append((out, ht) + tuple(g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_linear_work_and_parallelism():
    """Launched programs x loop trips (recorded by the launchers for what they ran) grow exactly linearly:
    N = 4096 does 4x the work of N = 1024 in every kernel (a quadratic kernel would do 16x). The parallel
    kernels (phases 1 and 3, forward and backward) launch at least N / BT x B*H programs of one chunk each;
    only the scans loop over the chunks (their loop body is the state combine: see
    test_kernel_report.py::test_lightning_scan_loop_is_state_combine_only for the SASS)."""
    work = {}
    B, Hh, BT = 1, 2, 128
    for N in (1024, 4096):
        q, k, v, h0 = _inputs(B, Hh, N, 16, 16, torch.float16)
        out, ht = _lightning_attention(q, k, v, torch.tensor([0.01, 0.1], device=DEVICE), initial_state=h0,
                                       output_final_state=True, block_size=BT)
        (out.float().sum() + ht.sum()).backward()
        launched = dict(klightning.LAST_LAUNCH)
        launched.pop("decode", None)
        assert launched == klightning.lightning_work(N, 16, 16, B=B, H=Hh, block_size=BT)
        for name, (programs, trips) in launched.items():
            if "scan" in name:
                assert trips == N // BT
            else:
                assert trips == 1 and programs >= N // BT * B * Hh, name
        work[N] = sum(p * t for p, t in launched.values())
    assert work[4096] == 4 * work[1024]
    # the model at B8 H32 D128 N8k bf16 (BT = 64): every parallel kernel has >= 128 x 256 programs
    w = klightning.lightning_work(8192, 128, 128, B=8, H=32, dtype=torch.bfloat16)
    assert all(p >= 128 * 256 for name, (p, t) in w.items() if "scan" not in name)
    assert all(t == 128 for name, (p, t) in w.items() if "scan" in name)


def test_torch_compile_fullgraph():
    """The op is a torch.library custom op (forward, backward and decode with fake impls + autograd):
    dynamo captures it with no graph break. aot_eager keeps this fast under the interpreter (inductor
    works too but takes ~15 s to compile on CPU)."""
    q, k, v, h0 = _inputs(1, H, 20, 16, 24, torch.float32)
    decay = lightning_decay_rates(H, device=DEVICE)

    def f(q, k, v, h0):
        out, ht = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
        return out.square().sum() + ht.sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    g_c = torch.autograd.grad(cf(q, k, v, h0), (q, k, v, h0))
    g_e = torch.autograd.grad(f(q, k, v, h0), (q, k, v, h0))
    for a, b in zip(g_c, g_e):
        assert torch.equal(a, b)

    def step(q, k, v, s):
        return lightning_decode(q, k, v, s, decay)

    with torch.no_grad():
        qs, ks, vs = q[:, :, :1].detach(), k[:, :, :1].detach(), v[:, :, :1].detach()
        a = torch.compile(step, fullgraph=True, backend="aot_eager")(qs, ks, vs, h0.detach())
        b = step(qs, ks, vs, h0.detach())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck():
    q, k, v, h0 = _inputs(1, H, 9, 16, 16, torch.float32)
    rates = torch.tensor([0.1, 0.3], device=DEVICE)
    torch.library.opcheck(torch.ops.tileattn.lightning_fwd.default, (q, k, v, rates, None, 0.25, h0, None, 16),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(ON_GPU, reason="the PyTorch path is for CPU tensors")
def test_cpu_path_without_interpreter(monkeypatch):
    from tileattn import _utils

    q, k, v, h0 = _inputs(1, H, 150, 8, 8, torch.float32)
    decay = torch.tensor([0.1, 0.0])
    out_k, ht_k = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
    gk = torch.autograd.grad(out_k.sum() + ht_k.sum(), (q, k, v, h0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _utils._warned.discard("cpu-fallback-lightning_attention")
    with pytest.warns(UserWarning, match="PyTorch reference path"):
        out, ht = lightning_attention(q, k, v, decay, initial_state=h0, output_final_state=True)
    g = torch.autograd.grad(out.sum() + ht.sum(), (q, k, v, h0))
    assert rel_err(out, out_k) < 1e-5 and rel_err(ht, ht_k) < 1e-5
    for a, b in zip(g, gk):
        assert rel_err(a, b) < 1e-5
    # per-token decay over packed sequences: the same path, per sequence
    cu = torch.tensor([0, 60, 60, 150], dtype=torch.int32)
    gg = _log_decays(1, H, 150)
    hp = torch.randn(3, H, 8, 8, requires_grad=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res_k = lightning_attention(q, k, v, g=gg, initial_state=hp, cu_seqlens=cu, output_final_state=True)
    grad_k = torch.autograd.grad(res_k[0].sum() + res_k[1].sum(), (q, k, v, hp, gg))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = lightning_attention(q, k, v, g=gg, initial_state=hp, cu_seqlens=cu, output_final_state=True)
    grad = torch.autograd.grad(res[0].sum() + res[1].sum(), (q, k, v, hp, gg))
    assert rel_err(res[0], res_k[0]) < 1e-5 and rel_err(res[1], res_k[1]) < 1e-5
    for a, b in zip(grad, grad_k):
        assert rel_err(a, b) < 1e-5
    o1, s1 = lightning_decode(q[:, :, :1].detach(), k[:, :, :1].detach(), v[:, :, :1].detach(), h0.detach(), decay)
    o1k, s1k = reference.linear_attention_recurrent_ref(q[:, :, :1], k[:, :, :1], v[:, :, :1], decay,
                                                         initial_state=h0)
    assert rel_err(o1, o1k) < 1e-6 and rel_err(s1, s1k) < 1e-6


# ----------------------------------------------------------------------------------------------------
# rates helper and module
# ----------------------------------------------------------------------------------------------------
def test_decay_rates_convention():
    r8 = lightning_decay_rates(8)
    assert r8.dtype == torch.float32 and torch.equal(r8, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # non power of two: slopes of 8 heads, then every other slope of 16 heads
    r12 = lightning_decay_rates(12)
    r16 = [2.0 ** (-0.5 * (i + 1)) for i in range(16)]
    assert torch.allclose(r12, torch.tensor([2.0 ** -(i + 1) for i in range(8)] + r16[0::2][:4]))
    # per-layer scaling (TransNormerLLM): first layer full rates, last layer ~0
    first = lightning_decay_rates(4, layer_idx=0, num_layers=5)
    last = lightning_decay_rates(4, layer_idx=4, num_layers=5)
    assert torch.allclose(first, lightning_decay_rates(4) * (1 + 1e-5)) and (last < 1e-4).all()
    with pytest.raises(ValueError):
        lightning_decay_rates(0)
    with pytest.raises(ValueError):
        lightning_decay_rates(4, layer_idx=3, num_layers=3)


def test_module_forward_state_and_decode():
    torch.manual_seed(0)
    m = LightningAttention(48, 3, layer_idx=1, num_layers=4).to(DEVICE)
    x = torch.randn(2, 21, 48, device=DEVICE, requires_grad=True)
    y, st = m(x, output_final_state=True)
    assert y.shape == (2, 21, 48) and st.shape == (2, 3, 16, 16)
    y.square().mean().backward()
    assert x.grad is not None and m.q_proj.weight.grad is not None
    with torch.no_grad():
        y_a, st_a = m(x[:, :15], output_final_state=True)
        outs = [y_a]
        for t in range(15, 21):  # one token at a time: the decode path
            y_t, st_a = m(x[:, t:t + 1], initial_state=st_a, output_final_state=True)
            outs.append(y_t)
    assert rel_err(torch.cat(outs, dim=1), y.detach()) < 1e-4 and rel_err(st_a, st.detach()) < 1e-5
    m16 = m.to(torch.bfloat16)
    assert m16.decay.dtype == torch.float32 and m16.q_proj.weight.dtype == torch.bfloat16
    assert LightningAttention(32, 2, use_decay=False).decay is None


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------
def _bad_cases():
    t = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt)  # noqa: E731
    q, k, v = t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 24)
    return [
        ("q 3-d", dict(q=t(2, 8, 16)), ValueError, "4 dimensions"),
        ("q not a tensor", dict(q=[1.0]), TypeError, "torch.Tensor"),
        ("int dtype", dict(q=q.int()), TypeError, "float16, bfloat16 or float32"),
        ("dtype mismatch", dict(k=k.half()), TypeError, "dtype"),
        ("k shape", dict(k=t(1, 2, 8, 8)), ValueError, "k must have q's shape"),
        ("v length", dict(v=t(1, 2, 7, 24)), ValueError, "v must have shape"),
        ("head dim > 256", dict(q=t(1, 2, 8, 300), k=t(1, 2, 8, 300)), ValueError, "up to 256"),
        ("empty N", dict(q=t(1, 2, 0, 16), k=t(1, 2, 0, 16), v=t(1, 2, 0, 24)), ValueError, "empty"),
        ("last stride", dict(q=t(1, 2, 16, 8).transpose(-1, -2)), ValueError, "unit stride"),
        ("decay shape", dict(decay=torch.ones(3)), ValueError, "decay must have shape"),
        ("decay negative", dict(decay=torch.tensor([0.1, -0.1])), ValueError, "s_h >= 0"),
        ("decay nan", dict(decay=torch.tensor([0.1, float("nan")])), ValueError, "finite"),
        ("decay int", dict(decay=torch.tensor([1, 2])), TypeError, "floating-point"),
        ("decay list", dict(decay=[0.1, 0.2]), TypeError, "decay must be a torch.Tensor"),
        ("state shape", dict(initial_state=torch.zeros(1, 2, 16, 16)), ValueError, "initial_state must have shape"),
        ("state dtype", dict(initial_state=torch.zeros(1, 2, 16, 24, dtype=torch.float16)), TypeError, "float32"),
        ("scale str", dict(scale="1"), TypeError, "scale"),
        ("scale inf", dict(scale=float("inf")), ValueError, "finite"),
        ("final flag", dict(output_final_state=1), TypeError, "output_final_state must be a bool"),
    ], (q, k, v)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_inputs(case):
    cases, (q, k, v) = _bad_cases()
    name, over, exc, match = cases[case]
    args = dict(q=q, k=k, v=v, decay=None)
    args.update(over)
    kw = {key: args.pop(key) for key in ("scale", "initial_state", "output_final_state") if key in args}
    with pytest.raises(exc, match=match):
        lightning_attention(args["q"], args["k"], args["v"], args["decay"], **kw)


def test_bad_decode_and_block_size():
    q, k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    with pytest.raises(ValueError, match="one token"):
        lightning_decode(q, k, v)
    with pytest.raises(ValueError, match="state must have shape"):
        lightning_decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="block_size"):
        _lightning_attention(q, k, v, block_size=24)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_long_sequence(dtype):
    q, k, v, h0 = _inputs(1, H, 2049, 128, 128, dtype)
    check_against_reference(q, k, v, h0, lightning_decay_rates(H, device=DEVICE))


def test_fp16_state_beyond_fp16_range():
    """Positive keys / values without decay: the fp32 state grows past the fp16 maximum (65504). The
    kernels scale the state by a power of two before their fp16 dots, so nothing overflows."""
    N, D = 160, 16
    q = (0.05 * torch.randn(1, 1, N, D, device=DEVICE)).half()
    k = (30 + torch.randn(1, 1, N, D, device=DEVICE)).half()
    v = (30 + torch.randn(1, 1, N, D, device=DEVICE)).half()
    out, ht = lightning_attention(q, k, v, scale=1e-3, output_final_state=True)
    o64, h64 = reference.linear_attention_quadratic_ref(q, k, v, scale=1e-3)
    assert h64.abs().max() > 65504 and torch.isfinite(out).all()
    assert rel_err(out, o64) < 2e-3 and rel_err(ht, h64) < 2e-3


def test_public_exports():
    assert tileattn.lightning_attention is lightning_attention and tileattn.lightning_decode is lightning_decode
    assert tileattn.lightning_decay_rates is lightning_decay_rates
    assert tileattn.LightningAttention is LightningAttention and tileattn.nn.LightningAttention is LightningAttention


def test_fp32_wide_head_dim_splits_exactly():
    """fp32 with D > 128 runs as a sum over D-chunks (only spill-free kernel configs launch): still equal
    to the reference, states and gradients included."""
    q, k, v, h0 = _inputs(1, 2, 29, 200, 24, torch.float32)
    check_against_reference(q, k, v, h0, torch.tensor([0.2, 0.01], device=DEVICE))


# ----------------------------------------------------------------------------------------------------
# per-token decay g (simple GLA), packed sequences (cu_seqlens), fla's decay convention
# ----------------------------------------------------------------------------------------------------
def _log_decays(B, Hh, N, lo=0.0, hi=0.7):
    """Per-token log-decays in [-hi, -lo] (fp32, requires grad)."""
    return (-(lo + (hi - lo) * torch.rand(B, Hh, N, device=DEVICE))).requires_grad_()


# N x chunk length x decay kind; D / Dv not powers of two
_CHUNK_CASES = [pytest.param(N, bt, kind, id=f"N{N}-bt{bt}-{kind}")
                for kind in ("const", "g")
                for N, bt in ((1, 16), (17, 32), (63, 64), (130, 16), (300, 64), (300, 32))]


@pytest.mark.parametrize("N,block_size,kind", _CHUNK_CASES)
def test_chunk_parallel_matches_recurrent(N, block_size, kind):
    """Chunk-parallel kernels == the token-by-token float64 recurrence: out, final state, dq, dk, dv,
    d initial_state and dg (per-token decay)."""
    q, k, v, h0 = _inputs(1, H, N, 24, 40, torch.float32)
    if kind == "g":
        check_against_reference(q, k, v, h0, None, g=_log_decays(1, H, N), block_size=block_size,
                                ref=reference.linear_attention_recurrent_ref)
    else:
        check_against_reference(q, k, v, h0, torch.tensor([0.05, 0.6], device=DEVICE), block_size=block_size,
                                ref=reference.linear_attention_recurrent_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_per_token_decay_low_precision(dtype):
    q, k, v, h0 = _inputs(2, H, 97, 48, 20, dtype)
    check_against_reference(q, k, v, h0, None, g=_log_decays(2, H, 97))


@pytest.mark.parametrize("regime", ["zeros", "strong", "mixed"])
def test_per_token_decay_regimes(regime):
    """g = 0 (no decay), strong decays whose chunk products underflow to 0 (no NaN / inf), and a mix of
    both with resets in the middle of a chunk."""
    N = 70
    g = {"zeros": torch.zeros(1, H, N), "strong": -30 - 10 * torch.rand(1, H, N),
         "mixed": torch.where(torch.rand(1, H, N) < 0.2, -25.0, -0.01 * torch.rand(1, H, N))}[regime]
    q, k, v, h0 = _inputs(1, H, N, 16, 16, torch.float32)
    # strong decays: each token sees only itself, the exact dg is ~1e-14 and ours is the fp32 rounding of
    # q.dq - k.dk (whose terms cancel exactly): checked in absolute terms
    check_against_reference(q, k, v, h0, None, g=g.to(DEVICE).requires_grad_(), block_size=32,
                            dg_atol=1e-4 if regime == "strong" else None)


def test_constant_decay_equals_per_token_g():
    """decay = s is the special case g_t = -s_h: both paths agree (the constexpr specialisation)."""
    q, k, v, h0 = (x.detach() for x in _inputs(1, H, 50, 16, 16, torch.float32))
    rates = torch.tensor([0.3, 0.02], device=DEVICE)
    a = lightning_attention(q, k, v, rates, initial_state=h0, output_final_state=True)
    b = lightning_attention(q, k, v, g=(-rates)[None, :, None].expand(1, H, 50), initial_state=h0,
                            output_final_state=True)
    assert rel_err(a[0], b[0]) < 1e-5 and rel_err(a[1], b[1]) < 1e-5


def test_per_token_decay_chunked_calls_equal_one_call():
    N, n1 = 90, 41
    q, k, v, h0 = _inputs(1, H, N, 16, 24, torch.float32)
    g = _log_decays(1, H, N)
    out, ht = lightning_attention(q, k, v, g=g, initial_state=h0, output_final_state=True)
    o1, s1 = lightning_attention(q[:, :, :n1], k[:, :, :n1], v[:, :, :n1], g=g[:, :, :n1], initial_state=h0,
                                 output_final_state=True)
    o2, s2 = lightning_attention(q[:, :, n1:], k[:, :, n1:], v[:, :, n1:], g=g[:, :, n1:], initial_state=s1,
                                 output_final_state=True)
    assert rel_err(torch.cat([o1, o2], dim=2), out) < 1e-5 and rel_err(s2, ht) < 1e-5
    do, dht = torch.randn_like(out), torch.randn_like(ht)
    g_one = _grads(out, ht, do, dht, (q, k, v, h0, g))
    g_two = _grads(torch.cat([o1, o2], dim=2), s2, do, dht, (q, k, v, h0, g))
    for a, b in zip(g_one, g_two):
        assert rel_err(b, a) < 1e-5


def _packed(lens, D, DV, dtype, kind):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    T = int(cu[-1])
    q, k, v, _ = _inputs(1, H, T, D, DV, dtype, state=False)
    h0 = (0.5 * torch.randn(len(lens), H, D, DV, device=DEVICE)).requires_grad_()
    dec = dict(g=_log_decays(1, H, T)) if kind == "g" else dict(decay=torch.tensor([0.1, 0.4], device=DEVICE))
    return cu, q, k, v, h0, dec


@pytest.mark.parametrize("kind", ["const", "g"])
def test_cu_seqlens_equals_per_sequence_calls(kind):
    """Packed sequences (an empty one, a single token, lengths off the chunk grid) == one call per sequence
    with its own initial / final state: outputs, states and every gradient; and == the float64 reference."""
    lens = [5, 0, 40, 1, 36]
    cu, q, k, v, h0, dec = _packed(lens, 16, 24, torch.float32, kind)
    out, ht = _lightning_attention(q, k, v, **dec, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                   block_size=16)
    assert ht.shape == (len(lens), H, 16, 24)
    outs, states = [], []
    for n, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == e:
            outs.append(torch.zeros(1, H, 0, 24, device=DEVICE))
            states.append(h0[n:n + 1])
            continue
        d = {"g": dec["g"][:, :, a:e]} if kind == "g" else dec
        o, st = _lightning_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], **d, initial_state=h0[n:n + 1],
                                     output_final_state=True, block_size=16)
        outs.append(o)
        states.append(st)
    o_seq, h_seq = torch.cat(outs, dim=2), torch.cat(states, dim=0)
    assert rel_err(out, o_seq) < 1e-5 and rel_err(ht, h_seq) < 1e-5
    o64, h64 = reference.lightning_varlen_ref(q, k, v, cu, dec.get("decay"), g=dec.get("g"), initial_state=h0)
    assert_close("out", out, o64, floor=2e-5)
    assert_close("final_state", ht, h64, floor=2e-5)
    do, dht = torch.randn_like(out), torch.randn_like(ht)
    ins = (q, k, v, h0, dec.get("g"))
    for name, a, b, c in zip(("dq", "dk", "dv", "dh0", "dg"), _grads(out, ht, do, dht, ins),
                             _grads(o_seq, h_seq, do, dht, ins), _grads(o64, h64, do, dht, ins)):
        assert rel_err(a, b) < 1e-5, name
        assert_close(name, a, c, floor=2e-5)


def test_cu_seqlens_bf16_and_decode_after_packed_prefill():
    """bf16 packed prefill with per-token decay, then one decode step per sequence (B = nseq) from the
    packed final states == running each sequence's prompt + token in full."""
    lens = [33, 7, 64]
    cu, q, k, v, h0, dec = _packed(lens, 32, 32, torch.bfloat16, "g")
    q, k, v, h0, g = (x.detach() for x in (q, k, v, h0, dec["g"]))
    out, ht = lightning_attention(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o64, h64 = reference.lightning_varlen_ref(q, k, v, cu, g=g, initial_state=h0)
    olp, hlp = reference.lightning_varlen_ref(q, k, v, cu, g=g, initial_state=h0, upcast=False,
                                              ref=reference.linear_attention_quadratic_ref)
    assert_close("out", out, o64, olp)
    assert_close("final_state", ht, h64, hlp, dtype=torch.bfloat16)
    ns = len(lens)
    qt, kt, vt = (randn(ns, H, 1, d, dtype=torch.bfloat16) for d in (32, 32, 32))
    gt = -torch.rand(ns, H, 1, device=DEVICE)
    o_t, s_t = lightning_decode(qt, kt, vt, ht, g=gt)
    for n, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        cat = lambda x, y: torch.cat([x[:, :, a:e], y[n:n + 1]], dim=2)  # noqa: E731
        of, sf = reference.linear_attention_recurrent_ref(cat(q, qt), cat(k, kt), cat(v, vt), g=cat(g, gt),
                                                          initial_state=h0[n:n + 1])
        assert rel_err(o_t[n:n + 1], of[:, :, -1:]) < 2e-2 and rel_err(s_t[n:n + 1], sf) < 1e-2


def test_deterministic_bitwise_packed_per_token_decay():
    cu, q, k, v, h0, dec = _packed([50, 13, 70], 32, 32, torch.bfloat16, "g")
    do = torch.randn(1, H, 133, 32, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out, ht = lightning_attention(q, k, v, g=dec["g"], initial_state=h0, output_final_state=True, cu_seqlens=cu)
        runs.append((out, ht) + tuple(torch.autograd.grad((out * do).sum() + ht.sum(), (q, k, v, h0, dec["g"]))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_packed_custom_op_passes_opcheck():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    q, k, v, _ = _inputs(1, H, 9, 16, 16, torch.float32, state=False)
    h0 = torch.randn(2, H, 16, 16, device=DEVICE, requires_grad=True)
    g = -torch.rand(1, H, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.tileattn.lightning_fwd.default,
                          (q, k, v, torch.zeros(H, device=DEVICE), g, 0.25, h0, cu, 16),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fla_decay_convention():
    """fla's lightning decay (g_gamma = -(8 / H)(1 - layer_idx / num_layers) h) vs OpenNLPLab's slopes."""
    r = tileattn.fla_lightning_decay_rates(8, layer_idx=1, num_layers=4)
    assert r.dtype == torch.float32 and torch.allclose(r, torch.arange(8.0) * (8 / 8) * (1 - 1 / 4))
    assert r[0] == 0 and not torch.allclose(tileattn.fla_lightning_decay_rates(8), lightning_decay_rates(8))
    with pytest.raises(ValueError):
        tileattn.fla_lightning_decay_rates(4, layer_idx=4, num_layers=4)


def _bad_g_and_packed_cases():
    t = lambda *s: torch.randn(*s)  # noqa: E731
    q, k, v = t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 24)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ("g shape", dict(g=-torch.rand(1, 2, 7)), ValueError, "g must have shape"),
        ("g positive", dict(g=torch.rand(1, 2, 8) + 0.1), ValueError, "g_t <= 0"),
        ("g inf", dict(g=torch.full((1, 2, 8), -math.inf)), ValueError, "finite"),
        ("g int", dict(g=torch.zeros(1, 2, 8, dtype=torch.int32)), TypeError, "floating-point"),
        ("g and decay", dict(g=-torch.rand(1, 2, 8), decay=torch.ones(2)), ValueError, "not both"),
        ("cu dtype", dict(cu_seqlens=cu.long()), TypeError, "int32"),
        ("cu last", dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "must equal"),
        ("cu decreasing", dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        ("cu batch", dict(q=t(2, 2, 8, 16), k=t(2, 2, 8, 16), v=t(2, 2, 8, 24), cu_seqlens=cu), ValueError, "B = 1"),
        ("cu state", dict(cu_seqlens=cu, initial_state=torch.zeros(1, 2, 16, 24)), ValueError, r"\(nseq, H, D, Dv\)"),
    ], (q, k, v)


@pytest.mark.parametrize("case", range(len(_bad_g_and_packed_cases()[0])))
def test_bad_g_and_cu_seqlens(case):
    cases, (q, k, v) = _bad_g_and_packed_cases()
    name, over, exc, match = cases[case]
    args = dict(q=q, k=k, v=v)
    args.update(over)
    with pytest.raises(exc, match=match):
        lightning_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
