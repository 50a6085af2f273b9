"""Kernel resource report: every shipped config AOT-compiles for sm_80 / sm_90 without a GPU.

AOT compilation needs real JITFunctions, so the report runs in a subprocess started without TRITON_INTERPRET
(this test session has it on). The exhaustive per-module check is the issue-3 requirement "every shipped
config compiles with zero spills"; modules with many configs are marked ``slow``.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "kernel_report.py")
SLOW_ABOVE = 60  # compiles; a cold compile takes ~1-3 s on one core


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _report(*args, timeout=900):
    res = subprocess.run([sys.executable, SCRIPT, "--json", "-", "-j", "1", *args], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode in (0, 1), f"kernel_report.py crashed (exit {res.returncode}):\n{res.stderr[-3000:]}"
    doc = json.loads(res.stdout)
    return res.returncode, doc


def _modules():
    import tileattn.kernels as pkg

    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if callable(getattr(mod, "aot_specs", None)):
            n = sum(len(s.archs) for s in mod.aot_specs())
            marks = [pytest.mark.slow] if n > SLOW_ABOVE else []
            out.append(pytest.param(info.name, marks=marks, id=f"{info.name}-{n}compiles"))
    return out


def test_parse_resource_usage():
    from tileattn._aot import parse_resource_usage, tensor_core_kind

    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _attn_fwd:
  REG:168 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    got = parse_resource_usage(text)
    assert got == {"_attn_fwd": {"REG": 168, "STACK": 16, "SHARED": 1024, "LOCAL": 0, "CONSTANT[0]": 608,
                                 "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}
    assert tensor_core_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert tensor_core_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert tensor_core_kind("fma.rn.f32") == "-"


def test_interpreted_functions_are_refused():
    """Under TRITON_INTERPRET (this session) the report says why it cannot compile instead of crashing."""
    from tileattn import _aot
    from tileattn.kernels.utils import aot_specs

    row = _aot.compile_spec(aot_specs()[0], 80)
    assert row["error"] and "TRITON_INTERPRET" in row["error"]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _aot.run_report()


def test_report_row_dot_table(tmp_path):
    """The row_dot subset (bf16, every head-dim bucket) compiles for both archs with zero spills, and the
    printed table and JSON agree."""
    jpath = tmp_path / "r.json"
    res = subprocess.run([sys.executable, SCRIPT, "--filter", "row_dot_bfloat16", "--json", str(jpath), "-j", "1"],
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(jpath.read_text())["rows"]
    assert len(rows) == 10 and {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["error"] is None
        assert 0 < r["regs"] <= 255 and r["stack"] == 0 and r["local"] == 0 and not r["spills"]
        assert 0 <= r["shared"] <= r["shared_limit"]
        assert r["tensor_cores"] == "-"  # a reduction, no dot
    head = res.stdout.splitlines()[0]
    for col in ("config", "arch", "regs", "spill/stack B", "smem KB", "TC"):
        assert col in head
    assert res.stdout.count(" ok") >= 10 and "all configs compile with zero spills" in res.stdout


def test_report_one_config_per_module():
    """The first config of every kernel module compiles for sm_80 and sm_90 and its numbers are sane; the
    attention-type modules use tensor cores (mma on sm_80, wgmma or mma on sm_90)."""
    rc, doc = _report("--quick")
    rows = doc["rows"]
    assert rows, "no kernel module defines aot_specs()"
    assert not [r for r in rows if r.get("error")], [r for r in rows if r.get("error")]
    for r in rows:
        assert r["arch"] in ("sm_80", "sm_90")
        assert 0 < r["regs"] <= 255 and r["shared"] <= r["shared_limit"]
        if r["tensor_cores"] != "-":
            assert r["tensor_cores"] in (("mma",) if r["arch"] == "sm_80" else ("mma", "wgmma"))
    assert rc == (1 if doc["failures"] else 0)


@pytest.mark.parametrize("module", _modules())
def test_every_shipped_config_compiles_without_spills(module):
    """Issue-3 requirement: every shipped config of the module AOT-compiles for sm_80 and sm_90 with zero
    spills and within the arch's shared memory."""
    rc, doc = _report("--module", module, timeout=1800)
    assert doc["rows"], f"{module}: aot_specs() returned nothing"
    assert not doc["failures"], f"{module}: {len(doc['failures'])} problems:\n" + "\n".join(doc["failures"])
    assert rc == 0


SASS_SNIPPET = """
        /*0100*/                   MOV R2, RZ ;
        /*0110*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0120*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0130*/                   FMNMX R3, R24, R25, !PT ;
        /*0140*/                   FFMA R4, R24, UR4, -R3 ;
        /*0150*/                   MUFU.EX2 R4, R4 ;
        /*0160*/                   FSEL R5, R4, RZ, P0 ;
        /*0170*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0180*/                   UTMALDG.2D [UR8], [UR10] ;
        /*0190*/               @P1 BRA 0x110 ;
        /*01a0*/                   EXIT ;
"""


def test_sass_loop_study_parses_a_listing():
    """The static study finds the loop (backward branch with an MMA), classifies its instructions, and
    turns its MMA shapes into issued FLOPs and model ratios."""
    from tileattn._sass import H100_MODEL, analyse, category

    assert category("HGMMA.64x128x16.F32.BF16") == "mma" and category("LDGSTS.E.BYPASS.128") == "ldgsts"
    (lp,) = analyse(SASS_SNIPPET, num_warps=8, nominal_flops=2 * 2 * 64 * 128 * 16)
    assert lp["instructions"] == 9 and lp["tensor_cores"] == "wgmma"
    c = lp["counts"]
    assert (c["mma"], c["mufu_ex2"], c["fp32"], c["select"], c["int"], c["tma"], c["barrier"]) == (1, 1, 2, 1, 1, 1, 1)
    assert lp["wgmma_waits"] == [0] and lp["waits_depth0"]
    assert lp["issued_flops"] == 2 * 64 * 128 * 16 * 2 and lp["replication"] == 1.0  # 2 warpgroups
    mma_clk = lp["issued_flops"] / H100_MODEL["wgmma_flops_per_clk"]
    assert abs(lp["issue_over_mma"] - 9 * 8 / H100_MODEL["issue_per_clk"] / mma_clk) < 1e-9


D128 = {  # shipped sm_90 bf16/fp16 d128 configs: (report filter, kernel)
    "fwd-dense": "attn_fwd[sm90,dense,float16,d128] BM128 BN128 BB64 w8",
    "fwd-causal": "attn_fwd[sm90,causal,float16,d128] BM128 BN128 BB64 w8",
    "dq-causal": "attn_bwd_dq[sm90,causal,float16,d128] BM128 BN64",
    "dkdv-causal": "attn_bwd_dkdv[sm90,causal,float16,d128] BM32 BN128",
}


def test_sass_report_sm90_d128():
    """Issue-10 static targets (predictions from SASS, sm_90, d128): the forward's interior loop at a
    128-key tile issues <= 0.55 of its MMA time; causal interior tiles run the same unmasked loop as
    non-causal; dQ / dK-dV interior loops use wgmma with issue/MMA <= 0.75; no loop replicates MMA work;
    everything spill-free."""
    args = []
    for f in D128.values():
        args += ["--filter", f]
    rc, doc = _report("--sass", "--module", "attention", *args)
    rows = {k: [r for r in doc["rows"] if v in r["name"]] for k, v in D128.items()}
    assert all(len(v) == 1 for v in rows.values()), {k: len(v) for k, v in rows.items()}
    rows = {k: v[0] for k, v in rows.items()}
    for k, r in rows.items():
        assert r["error"] is None and not r["spills"], (k, r)
        assert len(r["loops"]) == 2, (k, "expected an interior and a boundary loop")
        for lp in r["loops"]:
            assert lp["tensor_cores"] == "wgmma" and abs(lp["replication"] - 1.0) < 1e-9, (k, lp)
    dense, causal = rows["fwd-dense"]["loops"][0], rows["fwd-causal"]["loops"][0]
    assert dense["issue_over_mma"] <= 0.55, dense
    for cat in ("mma", "mufu_ex2", "fp32", "select"):
        assert dense["counts"][cat] == causal["counts"][cat], (cat, dense["counts"], causal["counts"])
    assert abs(dense["instructions"] - causal["instructions"]) <= 0.03 * dense["instructions"]
    for k in ("dq-causal", "dkdv-causal"):
        assert rows[k]["loops"][0]["issue_over_mma"] <= 0.75, (k, rows[k]["loops"][0])


def test_sass_report_sm90_backward_tiles():
    """Every shipped 16-bit sm_90 dQ and dK/dV tile (plain and bias-tensor families, causal / bias variant,
    swapped dK/dV tiles included) runs its main loops on wgmma with issued MMA FLOPs equal to the tile's
    nominal FLOPs; the plain family's interior loops issue <= 0.75 of their MMA time (predictions)."""
    rc, doc = _report("--sass", "--module", "attention", "--filter", "bwd_dq[sm90,causal",
                      "--filter", "bwd_dkdv[sm90,causal", "--filter", "bwd_dq[mask90", "--filter", "bwd_dkdv[mask90")
    rows = doc["rows"]
    assert len(rows) >= 10, [r["name"] for r in rows]
    for r in rows:
        assert r["error"] is None and not r["spills"], r["name"]
        assert r["loops"], r["name"]
        for lp in r["loops"]:
            assert lp["tensor_cores"] == "wgmma" and abs(lp["replication"] - 1.0) < 1e-9, (r["name"], lp)
        if "[sm90," in r["name"]:
            assert r["loops"][0]["issue_over_mma"] <= 0.75, (r["name"], r["loops"][0])


_SMALL_BLOCKS = r"""
import json
from tileattn import _aot
from tileattn.kernels import attention as A
rows = []
for spec in A.small_block_specs():
    r = _aot.compile_spec(spec, 90)
    rows.append(dict(name=spec.name, error=r["error"], smem_over=r["smem_over"],
                     in_loops=r.get("spill_instr_in_loops", 0) if r["spills"] else 0))
print(json.dumps(rows))
"""


def test_small_block_fallback_tiles():
    """Block-sparse calls whose blocks are narrower than the sm_90 tiles run the smaller fallback tiles: each
    compiles for sm_90 within shared memory and without a spill inside a main loop."""
    res = subprocess.run([sys.executable, "-c", _SMALL_BLOCKS], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) >= 30
    for r in rows:
        assert r["error"] is None and not r["smem_over"] and r["in_loops"] == 0, r


_SCAN_STUDY = r"""
import collections, json, sys, tempfile, warnings
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tileattn import _aot, _sass
from tileattn.kernels import lightning as kl

out = {}
for spec in kl.aot_specs():
    if spec.name not in sys.argv[1:]:
        continue
    fn = spec.fn
    sig = {a: spec.signature.get(a, "constexpr") for a in fn.arg_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(ASTSource(fn, sig, dict(spec.constexprs)), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ins = _sass.parse(_aot._sass(k.asm["cubin"], tmp) or "")
    out[spec.name] = {"n": len(ins), "mma": sum(_sass.category(x["op"]) == "mma" for x in ins),
                      "loops": [collections.Counter(_sass.category(x["op"]) for x in ins[a:b + 1])
                                for a, b in _sass.loops(ins, require_mma=False)]}
print(json.dumps(out))
"""


def test_lightning_scan_loop_is_state_combine_only():
    """Issue 15's static evidence (sm_90 SASS, bf16 D = Dv = 128): the sequential scan's loop body is the state
    combine only -- global loads and stores, FP32 multiply-adds, one EX2 for the chunk decay -- with no
    tensor-core MMA, shared memory or barrier; the parallel kernels (phases 1 and 3) hold the MMAs and have
    no loop over chunks at all."""
    # the scans and phase 1 compile to one binary for D, Dv in 64..128 (listed once, under d64)
    names = [f"lightning_{k}_bfloat16_d64_dv64_bt64" for k in ("scan", "scan_rev", "state")]
    names += [f"lightning_{k}_bfloat16_d128_dv128_bt64" for k in ("out", "dq")]
    res = subprocess.run([sys.executable, "-c", _SCAN_STUDY, *names], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert set(doc) == set(names)
    for name in names[:2]:
        scan = doc[name]
        print(name, scan)
        assert scan["mma"] == 0 and scan["loops"], scan
        for body in scan["loops"]:
            assert body["ldg"] >= 1 and body["stg"] >= 1 and body["fp32"] >= 1, body
            assert body.get("mufu_ex2", 0) <= 2, body
            for absent in ("mma", "lds", "sts", "barrier", "tma", "ldgsts", "mufu_other"):
                assert body.get(absent, 0) == 0, (absent, body)
            assert sum(body.values()) < 120, body  # a short body: the combine of the slice's elements
    for name in names[2:]:
        print(name, doc[name])
        assert doc[name]["mma"] > 0 and not doc[name]["loops"], (name, doc[name]["loops"])
