"""Score mods (soft-cap, ALiBi, user ScoreMod) and attention dropout inside the fused kernels: float64
reference in out, LSE and every gradient under causal / window / GQA / block masks; dropout against the
reference with ``dropout_mask``'s mask, its statistics and reproducibility; the plain path's
main loops unchanged (static SASS report). Bad inputs: tests/test_bad_inputs.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import tileattn
from helpers import DEVICE, assert_close, randn, run_case
from tileattn.reference import attention_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 7  # relative-bias table: distances clamped to R


@triton.jit
def rel_bias(s, b, h, q_idx, kv_idx, TABLE):
    """A learnable-free relative-position bias: TABLE[h, min(|i - j|, R)] added to the score."""
    return s + tl.load(TABLE + h * 8 + tl.minimum(tl.abs(q_idx - kv_idx), 7))


@triton.jit
def rel_bias_grad(s, b, h, q_idx, kv_idx, TABLE):
    return 1.0


@triton.jit
def quad(s, b, h, q_idx, kv_idx):
    """A nonlinear mod (derivative depends on s, b and h): s + c (s^2) with c = 0.05 (1 + b + h)."""
    return s + 0.05 * (1 + b + h) * s * s


@triton.jit
def quad_grad(s, b, h, q_idx, kv_idx):
    return 1.0 + 0.1 * (1 + b + h) * s


def rel_bias_ref(table):
    return lambda s, b, h, i, j: s + table.to(s.dtype)[h, (i - j).abs().clamp(max=R)]


def quad_ref(s, b, h, i, j):
    return s + 0.05 * (1 + b + h).to(s.dtype) * s * s


def _slopes(*shape):
    return (torch.rand(*shape, device=DEVICE) * 0.5 + 0.05).float()


def _table(h):
    return torch.randn(h, R + 1, device=DEVICE)


CASES = [  # (id, B, Hq, Hkv, Nq, Nk, D, dtype, masks, mods builder)
    ("softcap-causal-gqa-fp16", 1, 4, 2, 63, 63, 64, torch.float16, dict(causal=True),
     lambda: ({"softcap": 1.0}, {"softcap": 1.0})),
    ("alibi-bh-window-bf16", 2, 2, 1, 17, 40, 32, torch.bfloat16, dict(window=(8, 4)),
     lambda: (lambda s: ({"alibi_slopes": s}, {"alibi_slopes": s}))(_slopes(2, 2))),
    ("alibi-h-softcap-fp32-d80", 1, 2, 2, 33, 33, 80, torch.float32, dict(causal=True),
     lambda: (lambda s: ({"alibi_slopes": s, "softcap": 2.0}, {"alibi_slopes": s, "softcap": 2.0}))(_slopes(2))),
    ("scoremod-table-causal-gqa-fp16", 1, 4, 1, 20, 45, 16, torch.float16, dict(causal=True),
     lambda: (lambda t: ({"score_mod": tileattn.ScoreMod(rel_bias, rel_bias_grad, t)},
                         {"score_mod": rel_bias_ref(t)}))(_table(4))),
    ("scoremod-quad-alibi-softcap-window-fp32", 2, 2, 2, 40, 23, 32, torch.float32, dict(window=(5, 9)),
     lambda: (lambda s: ({"score_mod": tileattn.ScoreMod(quad, quad_grad), "alibi_slopes": s, "softcap": 3.0},
                         {"score_mod": quad_ref, "alibi_slopes": s, "softcap": 3.0}))(_slopes(2))),
    ("scoremod-neg-scale-fp16", 1, 2, 2, 31, 31, 16, torch.float16, dict(scale=-0.3),
     lambda: ({"score_mod": tileattn.ScoreMod(quad, quad_grad), "softcap": 1.5},
              {"score_mod": quad_ref, "softcap": 1.5})),
]


@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in CASES])
def test_score_mods_match_float64_reference(case):
    B, Hq, Hkv, Nq, Nk, D, dtype, masks, build = case
    mods, ref_mods = build()
    run_case(B, Hq, Hkv, Nq, Nk, D, D, dtype, layout="bnhd" if dtype == torch.float32 else "bhnd",
             mods=mods, ref_mods=ref_mods, **masks)


def test_score_mods_with_block_mask():
    """Soft-cap + a ScoreMod on a block-sparse layout (full, partial and empty blocks)."""
    from tileattn import masks

    bm = tileattn.create_block_mask(masks.causal(), None, None, 48, 48, block_size=16, device=DEVICE)
    t = _table(2)
    run_case(1, 2, 2, 48, 48, 16, 16, torch.float16, block_mask=bm,
             mods={"score_mod": tileattn.ScoreMod(rel_bias, rel_bias_grad, t), "softcap": 2.0},
             ref_mods={"score_mod": rel_bias_ref(t), "softcap": 2.0})


def _replay(gen_state, device=DEVICE):
    """The (seed, offset) an attention call drew from a generator in state ``gen_state``."""
    g = torch.Generator(device="cpu")
    g.set_state(gen_state)
    return torch.randint(0, 2 ** 62, (2,), generator=g).tolist()


DROPOUT_CASES = [
    pytest.param(1, 4, 2, 37, 37, 32, torch.float16, dict(causal=True), {}, id="causal-gqa-fp16"),
    pytest.param(2, 2, 1, 17, 50, 16, torch.bfloat16, dict(window=(6, 3)), {}, id="window-nq<nk-bf16"),
    pytest.param(1, 2, 2, 33, 20, 80, torch.float32, {}, {"softcap": 2.0}, id="softcap-d80-fp32"),
    pytest.param(1, 1, 1, 18, 21, 256, torch.bfloat16, dict(causal=True), {"softcap": 1.0}, id="softcap-causal-d256-bf16"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,dtype,masks,mods", DROPOUT_CASES)
def test_dropout_matches_reference_with_its_mask(B, Hq, Hkv, Nq, Nk, D, dtype, masks, mods):
    p = 0.3
    q = randn(B, Hq, Nq, D, dtype=dtype, requires_grad=True)
    k = randn(B, Hkv, Nk, D, dtype=dtype, requires_grad=True)
    v = randn(B, Hkv, Nk, D, dtype=dtype, requires_grad=True)
    gen = torch.Generator().manual_seed(11)
    state = gen.get_state()
    out, lse = tileattn.attention(q, k, v, dropout_p=p, generator=gen, return_lse=True, **masks, **mods)
    seed, offset = _replay(state)
    keep = tileattn.dropout_mask(q, k, dropout_p=p, seed=seed, offset=offset, **masks)
    assert keep.dtype == torch.bool and keep.shape == (B, Hq, Nq, Nk)
    do, dl = torch.randn_like(out), torch.randn_like(lse)  # gradients through out and the LSE
    torch.autograd.backward((out, lse), (do, dl))
    refs = {}
    for name, upcast in (("64", True), ("lp", False)):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, l = attention_ref(qq, kk, vv, upcast=upcast, dropout_mask=keep, dropout_p=p, **masks, **mods)
        torch.autograd.backward((o, l), (do.to(o.dtype), dl.to(l.dtype)))
        refs[name] = (o, l, qq.grad, kk.grad, vv.grad)
    (o64, l64, *g64), (olp, llp, *glp) = refs["64"], refs["lp"]
    assert_close("out", out, o64, olp, dtype=dtype)
    assert_close("lse", lse, l64, llp, dtype=dtype)  # LSE of the pre-dropout scores
    for name, ours, r64, rlp in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), g64, glp):
        assert_close(name, ours, r64, rlp, dtype=dtype)


def test_dropout_split_kv_and_block_mask():
    """Split-KV decoding and block-sparse walks key the same (i, j) bits."""
    from tileattn import masks
    from tileattn.kernels.attention import attention_forward

    p = 0.25
    q, k, v = randn(1, 2, 5, 32, dtype=torch.float32), randn(1, 2, 300, 32, dtype=torch.float32), \
        randn(1, 2, 300, 32, dtype=torch.float32)
    rng = torch.tensor([1234, 99], dtype=torch.int64, device=DEVICE)
    keep = tileattn.dropout_mask(q, k, dropout_p=p, seed=1234, offset=99)
    o64, l64 = attention_ref(q, k, v, upcast=True, dropout_mask=keep, dropout_p=p)
    olp, llp = attention_ref(q, k, v, dropout_mask=keep, dropout_p=p)
    out, lse = attention_forward(q, k, v, scale=32 ** -0.5, num_splits=3, dropout_p=p, rng=rng)
    assert_close("out", out, o64, olp, dtype=torch.float32)
    assert_close("lse", lse, l64, llp, dtype=torch.float32)
    bm = tileattn.create_block_mask(masks.sliding_window(16, 0), None, None, 64, 64, block_size=16, device=DEVICE)
    run_drop = dict(dropout_p=p, generator=torch.Generator().manual_seed(2))
    q2, k2, v2 = (randn(1, 2, 64, 16, dtype=torch.float16) for _ in range(3))
    state = torch.Generator().manual_seed(2).get_state()
    out = tileattn.attention(q2, k2, v2, block_mask=bm, **run_drop)
    seed, offset = _replay(state)
    keep = tileattn.dropout_mask(q2, k2, dropout_p=p, seed=seed, offset=offset)
    o64, _ = attention_ref(q2, k2, v2, upcast=True, mask=bm.to_dense(), dropout_mask=keep, dropout_p=p)
    olp, _ = attention_ref(q2, k2, v2, mask=bm.to_dense(), dropout_mask=keep, dropout_p=p)
    assert_close("out", out, o64, olp, dtype=torch.float16)


@pytest.mark.parametrize("p,causal", [pytest.param(0.1, False, id="p0.1"), pytest.param(0.5, True, id="p0.5-causal")])
def test_dropout_kept_fraction_within_binomial_bounds(p, causal):
    q = torch.empty(2, 2, 130, 16, device=DEVICE)
    k = torch.empty(2, 1, 127, 16, device=DEVICE)
    keep = tileattn.dropout_mask(q, k, dropout_p=p, seed=2 ** 40 + 5, offset=7, causal=causal)
    vis = tileattn.reference.visible_mask(130, 127, causal=causal, device=DEVICE).expand_as(keep)
    assert not (keep & ~vis).any()
    n = int(vis.sum())
    frac = keep.sum().item() / n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, (frac, 1 - p, sigma)
    # heads / batches / offsets get independent streams (no repeated mask)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    other = tileattn.dropout_mask(q, k, dropout_p=p, seed=2 ** 40 + 5, offset=8, causal=causal)
    assert ((other != keep) & vis).sum().item() / n > p * (1 - p)  # about 2 p (1 - p) differ


def _step(q, k, v, **kw):
    out = tileattn.attention(q, k, v, causal=True, dropout_p=0.4, **kw)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [out.detach()] + grads


def test_dropout_reproducible_bitwise_and_seeds_differ():
    q, k, v = (randn(1, 2, 33, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    a = _step(q, k, v, generator=torch.Generator().manual_seed(5))
    b = _step(q, k, v, generator=torch.Generator().manual_seed(5))
    c = _step(q, k, v, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    # the default generator: torch.manual_seed reproduces a training step; consecutive calls differ
    torch.manual_seed(123)
    d1, d2 = _step(q, k, v), _step(q, k, v)
    torch.manual_seed(123)
    e1 = _step(q, k, v)
    assert all(torch.equal(x, y) for x, y in zip(d1, e1))
    assert not torch.equal(d1[0], d2[0])


def test_dropout_edges():
    q, k, v = (randn(1, 2, 20, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    out = tileattn.attention(q, k, v, dropout_p=1.0)
    out.sum().backward()
    assert torch.all(out == 0) and all(torch.all(t.grad == 0) for t in (q, k, v))
    assert torch.equal(tileattn.attention(q, k, v, dropout_p=0.0), tileattn.attention(q, k, v))


def test_score_mod_without_grad_fn_is_inference_only():
    t = _table(2)
    q, k, v = (randn(1, 2, 9, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))

    out = tileattn.attention(q, k, v, score_mod=tileattn.ScoreMod(rel_bias, None, t))
    ref, _ = attention_ref(q, k, v, score_mod=rel_bias_ref(t), upcast=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    with pytest.raises(NotImplementedError, match="grad_fn"):
        out.sum().backward()


def test_sdpa_and_mha_dropout_run_fused_without_warning():
    import warnings

    import torch.nn.functional as F

    q, k, v = (randn(2, 2, 19, 16, dtype=torch.float32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(4)
        a = tileattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
        torch.manual_seed(4)
        b = tileattn.attention(q, k, v, dropout_p=0.3, causal=True)
        c = tileattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    torch.manual_seed(0)
    mha = tileattn.nn.MultiheadAttention(32, 2, dropout=0.5, batch_first=True).to(DEVICE)
    x = torch.randn(2, 11, 32, device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(1)
        o1, _ = mha(x, x, x, need_weights=False)
        torch.manual_seed(1)
        o2, _ = mha(x, x, x, need_weights=False)
        o3, _ = mha(x, x, x, need_weights=False)
        o1.sum().backward()
        mha.eval()
        o4, _ = mha(x, x, x, need_weights=False)
        o5, _ = mha(x, x, x, need_weights=False)
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    assert torch.equal(o4, o5) and not torch.allclose(o1, o4)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _report_loops(filters, extra=()):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, os.path.join(REPO, "scripts", "kernel_report.py"), "--sass", "--module", "attention",
            "--arch", "80", "--arch", "90", "--json", "-", "-j", "2", *extra]
    for f in filters:
        args += ["--filter", f]
    res = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    return json.loads(res.stdout)["rows"]


def test_plain_path_main_loops_unchanged():
    """Score mods and dropout cost nothing when off: the plain path's main loops (interior and boundary,
    forward / dQ / dK-dV, several families) compile to the same SASS instruction counts, per category, as
    the engine before they existed (tests/plain_loops_baseline.json, recorded from it)."""
    path = os.path.join(REPO, "tests", "plain_loops_baseline.json")
    with open(path) as f:
        base = json.load(f)["loops"]
    filters = sorted({k.split(" @")[0] for k in base})
    rows = _report_loops(filters)
    got = {r["name"].split(" (")[0] + " @" + r["arch"]: [dict(instructions=lp["instructions"], counts=lp["counts"])
                                                         for lp in r["loops"]] for r in rows if not r["error"]}
    if os.environ.get("TILEATTN_UPDATE_BASELINE"):
        with open(path) as f:
            doc = json.load(f)
        doc["loops"] = got
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
    assert set(got) == set(base), (sorted(set(base) - set(got)), sorted(set(got) - set(base)))
    for key, loops in base.items():
        assert got[key] == loops, (key, loops, got[key])


MOD_COMPILE = r"""
import json, sys
import triton
from tileattn import _aot
from tileattn.kernels import attention as A
sys.path.insert(0, sys.argv[1])
import test_score_mods as T
rows = []
for tag, table in (("fwd", A.FWD_CONFIGS), ("bwd_dq", A.DQ_CONFIGS), ("bwd_dkdv", A.DKDV_CONFIGS)):
    spec = A.make_spec(tag, "mask90", 64, table["mask90"][64][0], "bias", None)
    spec.constexprs.update(MOD=(T.rel_bias, T.rel_bias_grad, 1, True, True), DROPOUT=True, BIAS=0)
    for name in ("BIAS_PTR",):
        spec.signature[name] = "*u8"
    row = _aot.compile_spec(spec, 90, sass=True)
    rows.append(dict(tag=tag, error=row["error"], spills=row["spills"], regs=row["regs"],
                     loops=[lp["instructions"] for lp in row.get("loops") or []]))
print(json.dumps(rows))
"""


def test_mod_and_dropout_variants_compile_for_sm90():
    """The heaviest variant (user ScoreMod with a table, ALiBi, soft-cap and dropout) AOT-compiles for
    sm_90 in the family modded calls use there (the "mask90" tiles), forward and both backward kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", MOD_COMPILE, os.path.join(REPO, "tests")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for r in rows:
        assert r["error"] is None and len(r["loops"]) == 2, r


@triton.jit
def _mask_row3(s, b, h, q_idx, kv_idx):
    return tl.where(q_idx == 3, float("-inf"), s)


@triton.jit
def _mask_row3_grad(s, b, h, q_idx, kv_idx):
    return tl.where(q_idx == 3, float("nan"), s * 0.0 + 1.0)  # undefined where masked: must not leak


def test_softcap_keeps_a_mods_minus_inf():
    """A score the user mod masks (-inf) stays masked through the soft-cap: a fully masked row gives out 0,
    lse -inf and zero, NaN-free gradients (even with a grad_fn that is NaN there)."""
    q, k, v = (randn(1, 2, 9, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    out, lse = tileattn.attention(q, k, v, softcap=2.0, score_mod=tileattn.ScoreMod(_mask_row3, _mask_row3_grad),
                                  return_lse=True)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and torch.isinf(lse[:, :, 3]).all()
    mod = lambda s, b, h, i, j: s.masked_fill(i == 3, float("-inf"))
    ref, ref_lse = attention_ref(q, k, v, softcap=2.0, score_mod=mod, upcast=True)
    assert_close("out", out, ref, None, torch.float32)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    g_ref = torch.autograd.grad(ref, (q, k, v), do.double())
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert_close("grad", a, b, None, torch.float32)
