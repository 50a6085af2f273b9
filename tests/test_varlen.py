"""attention_varlen: packed variable-length sequences (FlashAttention's varlen interface) against a float64
reference and against per-sequence ``attention`` (out, lse, dq, dk, dv), odd lengths, empty sequences,
causal / windows / GQA / Dv != D, strided packed-qkv inputs, determinism, the visit counter (no work on
other sequences or on padding), bad inputs and torch.compile."""
import pytest
import torch

import tileattn
from tileattn.kernels import attention as ka
from tileattn.kernels.utils import interpreter_enabled
from tileattn.reference import attention_varlen_ref
from helpers import DEVICE, ON_GPU, assert_close

pytestmark = pytest.mark.skipif(not (ON_GPU or interpreter_enabled()), reason="needs a GPU or TRITON_INTERPRET=1")


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def packed(total, h, d, dtype, requires_grad=True):
    return torch.randn(total, h, d, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def check_against_reference(q, k, v, cu_q, cu_k, causal=False, window=None, dtype=torch.float16, lse_grad=True):
    out, lse = tileattn.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, window=window, return_lse=True)
    r64 = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, window=window, upcast=True)
    rlp = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, window=window)
    assert_close("out", out, r64[0], rlp[0], dtype)
    assert_close("lse", lse, r64[1], rlp[1].float(), torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(r64[1])), "lse -inf rows differ"
    do = torch.randn_like(out)
    dl = torch.randn_like(lse) if lse_grad else None

    def loss(o, l):
        val = (o.float() * do.to(o.dtype).float()).sum()
        if dl is not None:
            val = val + (torch.where(torch.isinf(l), 0.0, l.double()) * dl.double()).sum()
        return val

    g = torch.autograd.grad(loss(out, lse), (q, k, v))
    g64 = torch.autograd.grad(loss(*r64), (q, k, v))
    glp = torch.autograd.grad(loss(*rlp), (q, k, v))
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g64, glp):
        assert_close(name, a, b, c, dtype)
    return out, lse, g


CASES = [
    # lens_q, lens_k, Hq, Hkv, D, Dv, causal, window
    pytest.param([5, 0, 40, 1, 17], [7, 3, 40, 0, 33], 4, 2, 32, 32, False, None, id="ragged-empty-gqa"),
    pytest.param([63, 17, 1], [63, 17, 1], 2, 2, 64, 64, True, None, id="causal-self"),
    pytest.param([20, 70, 3], [45, 33, 9], 3, 1, 16, 40, True, None, id="causal-nq!=nk-mqa-dv"),
    pytest.param([33, 8], [50, 65], 2, 2, 80, 80, False, (9, 4), id="window-d80"),
    pytest.param([1, 1, 1, 1], [31, 64, 1, 7], 8, 2, 96, 64, True, None, id="decode-rows-d96"),
]


@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,d,dv,causal,window", CASES)
def test_varlen_matches_reference(lens_q, lens_k, hq, hkv, d, dv, causal, window):
    torch.manual_seed(0)
    q = packed(sum(lens_q), hq, d, torch.float16)
    k = packed(sum(lens_k), hkv, d, torch.float16)
    v = packed(sum(lens_k), hkv, dv, torch.float16)
    check_against_reference(q, k, v, cu(lens_q), cu(lens_k), causal, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_varlen_dtypes_and_d256(dtype):
    lens_q, lens_k = [9, 24], [17, 24]
    q = packed(sum(lens_q), 2, 256, dtype)
    k = packed(sum(lens_k), 1, 256, dtype)
    v = packed(sum(lens_k), 1, 200, dtype)
    check_against_reference(q, k, v, cu(lens_q), cu(lens_k), causal=True, dtype=dtype, lse_grad=False)


def test_varlen_equals_per_sequence_attention():
    """Every sequence's rows equal a plain ``attention`` call on that sequence alone (same tiles: bitwise)."""
    lens_q, lens_k = [37, 0, 5, 64], [21, 9, 70, 64]
    cq, ck = cu(lens_q), cu(lens_k)
    q = packed(sum(lens_q), 4, 32, torch.float16)
    k = packed(sum(lens_k), 2, 32, torch.float16)
    v = packed(sum(lens_k), 2, 48, torch.float16)
    out, lse = tileattn.attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for b in range(len(lens_q)):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0 or k1 == k0:
            assert not out[q0:q1].any() and torch.isinf(lse[:, q0:q1]).all()
            assert not dk[k0:k1].any() and not dv[k0:k1].any()
            continue
        qs, ks, vs = (x.detach()[a:e].transpose(0, 1)[None].requires_grad_() for x, a, e in
                      ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        o, l = tileattn.attention(qs, ks, vs, causal=True, return_lse=True)
        g = torch.autograd.grad(o, (qs, ks, vs), do[q0:q1].transpose(0, 1)[None])
        assert torch.equal(out[q0:q1], o[0].transpose(0, 1))
        assert torch.equal(lse[:, q0:q1], l[0])
        for a, ref in zip((dq[q0:q1], dk[k0:k1], dv[k0:k1]), g):
            assert torch.equal(a, ref[0].transpose(0, 1))


def test_varlen_packed_qkv_strided_inputs():
    """Slices of a packed (total, 3, H, D) qkv tensor go in without a copy; gradients land in it."""
    lens = [13, 40, 1]
    qkv = torch.randn(sum(lens), 3, 2, 32, device=DEVICE).half().requires_grad_()
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.is_contiguous()
    out = tileattn.attention_varlen(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    ref = attention_varlen_ref(q, k, v, cu(lens), cu(lens), causal=True, upcast=True)[0]
    assert_close("out", out, ref, attention_varlen_ref(q, k, v, cu(lens), cu(lens), causal=True)[0])
    out.float().sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_varlen_backward_is_deterministic():
    lens_q, lens_k = [30, 7], [50, 19]
    q = packed(sum(lens_q), 4, 32, torch.float16)
    k = packed(sum(lens_k), 1, 32, torch.float16)
    v = packed(sum(lens_k), 1, 32, torch.float16)
    do = torch.randn(sum(lens_q), 4, 32, device=DEVICE).half()
    runs = []
    for _ in range(3):
        out = tileattn.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), causal=True)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


def test_varlen_visits_only_own_tiles():
    """The visit counter (steps per program slot) equals, slot by slot, the dense count of the same
    (sequence, tile): no program visits another sequence's keys, and the idle slots run nothing."""
    lens_q, lens_k = [45, 0, 3, 64, 20], [45, 12, 80, 30, 0]
    cq, ck = cu(lens_q), cu(lens_k)
    q = packed(sum(lens_q), 2, 32, torch.float16, False)
    k = packed(sum(lens_k), 2, 32, torch.float16, False)
    v = packed(sum(lens_k), 2, 32, torch.float16, False)
    as4 = lambda x: x.transpose(0, 1)[None]
    scale = 32 ** -0.5
    _, _, visits = ka.attention_forward(as4(q), as4(k), as4(v), scale=scale, left=-1, right=0, count_visits=True,
                                        varlen=(cq, ck, max(lens_q), max(lens_k)))
    bm = ka.INTERPRET_CONFIG[0]
    expected = torch.zeros_like(visits)
    for b in range(len(lens_q)):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 == q0 or k1 == k0:  # no keys: the slot's walk is empty (expected 0)
            continue
        _, _, vb = ka.attention_forward(as4(q[q0:q1]), as4(k[k0:k1]), as4(v[k0:k1]), scale=scale, left=-1, right=0,
                                        count_visits=True)
        first = q0 // bm + b
        expected[:, first:first + vb.shape[1]] = vb
    assert torch.equal(visits, expected)
    assert visits.shape[1] == sum(lens_q) // bm + len(lens_q)  # slots: total // BM + nseq, no padding


def bad_call(**over):
    lens = [3, 5]
    args = dict(q=packed(8, 2, 16, torch.float16, False), k=packed(8, 2, 16, torch.float16, False),
                v=packed(8, 2, 16, torch.float16, False), cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens))
    args.update(over)
    return lambda: tileattn.attention_varlen(**args)


@pytest.mark.parametrize("call,exc,match", [
    pytest.param(bad_call(cu_seqlens_q=cu([3, 5]).long()), TypeError, "int32", id="int64-cu"),
    pytest.param(bad_call(cu_seqlens_q=cu([3, 5])[None]), ValueError, "1-d", id="2d-cu"),
    pytest.param(bad_call(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "start at 0",
                 id="not-zero-start"),
    pytest.param(bad_call(cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32)), ValueError, "non-decreasing",
                 id="decreasing"),
    pytest.param(bad_call(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "must equal",
                 id="wrong-total"),
    pytest.param(bad_call(cu_seqlens_k=cu([3, 3, 2])), ValueError, "sequences", id="nseq-mismatch"),
    pytest.param(bad_call(max_seqlen_q=4, max_seqlen_k=5), ValueError, "max_seqlen_q", id="beyond-max"),
    pytest.param(bad_call(max_seqlen_q=4.0), TypeError, "max_seqlen_q", id="float-max"),
    pytest.param(bad_call(q=packed(8, 2, 16, torch.float16, False)[None]), ValueError, "3 dimensions", id="4d-q"),
    pytest.param(bad_call(k=packed(8, 3, 16, torch.float16, False), v=packed(8, 3, 16, torch.float16, False)),
                 ValueError, "multiple", id="heads"),
    pytest.param(bad_call(v=packed(7, 2, 16, torch.float16, False)), ValueError, "same length", id="kv-len"),
    pytest.param(bad_call(cu_seqlens_q=[0, 3, 8]), TypeError, "torch.Tensor", id="list-cu"),
    pytest.param(bad_call(cu_seqlens_q=torch.tensor([0, 9, 3, 9, 8, 9], dtype=torch.int32, device=DEVICE)[::2]),
                 ValueError, "contiguous", id="strided-cu"),
])
def test_varlen_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_varlen_unchecked_values_stay_in_bounds(monkeypatch):
    """With the value checks off (TILEATTN_VARLEN_CHECKS=0 and both max lengths given), garbage cu_seqlens
    still never make a kernel read outside the packed tensors (row ranges are clamped)."""
    monkeypatch.setenv("TILEATTN_VARLEN_CHECKS", "0")
    q = packed(8, 2, 16, torch.float16, False)
    bad = torch.tensor([0, 50, -7], dtype=torch.int32, device=DEVICE)
    out = tileattn.attention_varlen(q, q, q, bad, bad, 8, 8)
    assert out.shape == q.shape


def test_varlen_compile_fullgraph():
    torch._dynamo.reset()
    lens = [9, 20]
    q = packed(29, 2, 16, torch.float16)
    k = packed(29, 2, 16, torch.float16)
    v = packed(29, 2, 16, torch.float16)
    cq = cu(lens)
    fn = lambda q, k, v: tileattn.attention_varlen(q, k, v, cq, cq, 20, 20, causal=True)
    backend = "inductor" if ON_GPU else "aot_eager"
    out_c = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v)
    out_e = fn(q, k, v)
    assert torch.equal(out_c, out_e)
    g_c = torch.autograd.grad(out_c.float().sum(), (q, k, v))
    g_e = torch.autograd.grad(out_e.float().sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g_c, g_e))
    torch._dynamo.reset()


def test_varlen_descriptor_path(monkeypatch):
    """The sm_90 interior path (tensor descriptors built per sequence, forced under the interpreter), with
    sequences that have no queries or no keys."""
    if not interpreter_enabled():
        pytest.skip("descriptor path forced only under the interpreter")
    monkeypatch.setattr(ka, "TMA_MODE", "on")
    lens_q, lens_k = [5, 0, 40, 17], [7, 3, 0, 33]
    q = packed(sum(lens_q), 4, 32, torch.float32)
    k = packed(sum(lens_k), 2, 32, torch.float32)
    v = packed(sum(lens_k), 2, 32, torch.float32)
    check_against_reference(q, k, v, cu(lens_q), cu(lens_k), causal=True, dtype=torch.float32)
