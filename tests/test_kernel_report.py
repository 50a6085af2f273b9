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
