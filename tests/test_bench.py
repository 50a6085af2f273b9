"""The benchmark harness ``python -m bench``: the CPU run (interpreter checks, kernel report, work plots), the
measurement pipeline exercised on CPU (``--cpu-timing``), FLOP rules, sweep planning and the README table."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _bench(*args, timeout=600):
    res = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"python -m bench {' '.join(args)} exited {res.returncode}:\n" \
                                f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="CPU-mode run (no CUDA)")
def test_quick_cpu_run(tmp_path):
    """Without CUDA: exit 0, interpreter correctness checks that pass and ran Triton kernels, the kernel
    report, PNGs, and a plain statement that timings need a GPU."""
    out = _bench("--quick", "--ops", "softmax", "--head-dims", "16", "--report-filter", "row_dot_float32_d16",
                 "--out", str(tmp_path))
    assert "Timings need a GPU" in out
    rows = json.loads((tmp_path / "correctness.json").read_text())["rows"]
    assert rows and all(r["status"] == "pass" for r in rows), rows
    ours = [r for r in rows if r["provider"] == "tileattn"]
    assert ours and all(r["kernels"] for r in ours), "tileattn checks launched no Triton kernel"
    assert (tmp_path / "correctness.csv").exists()
    report = json.loads((tmp_path / "kernel_report.json").read_text())
    assert len(report["rows"]) == 2 and not report["failures"]
    for png in ("correctness.png", "kernel_registers.png", "kernel_smem.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert any(p.name.startswith("work_") for p in tmp_path.glob("*.png"))


def test_measurement_pipeline_on_cpu(tmp_path):
    """--cpu-timing runs the GPU code path (gate, rotated inputs, timing, rows, CSV, plots) on PyTorch
    providers at tiny sizes; rows carry device, versions, shapes, time, TFLOP/s and the FLOP rule."""
    _bench("--cpu-timing", "--ops", "softmax,sparse", "--lengths", "64", "--head-dims", "16", "--modes",
           "fwd,fwdbwd", "--densities", "0.5", "--rep", "5", "--providers", "sdpa-math,naive", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = doc["rows"]
    assert {(r["sweep"], r["provider"]) for r in rows} >= {("softmax", "sdpa-math"), ("softmax", "naive"),
                                                          ("sparse", "naive")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["gate_err"] <= 1.0
        for k in ("device", "torch", "triton", "B", "H", "N", "D", "dtype", "mode", "flop_rule", "peak_mem_mb"):
            assert k in r
        if r["sweep"] == "sparse":
            assert 0 < r["density"] <= 1
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "tflops" in header and "device" in header
    assert (tmp_path / "softmax_tflops_fwd_bf16.png").exists()
    assert (tmp_path / "sparse_time_vs_density_fwd_bf16.png").exists()


def test_flop_rules():
    from bench.measure import linear_flops, softmax_flops

    B, H, N, D = 2, 3, 1024, 64
    fwd = 4 * B * H * N * N * D
    assert softmax_flops(B, H, N, D, D, "fwd") == fwd
    assert softmax_flops(B, H, N, D, D, "bwd") == 2.5 * fwd
    assert softmax_flops(B, H, N, D, D, "fwdbwd") == 3.5 * fwd
    assert softmax_flops(B, H, N, D, D, "fwd", causal=True) == 0.5 * fwd
    assert softmax_flops(B, H, N, D, D, "fwd", density=0.25) == 0.25 * fwd
    assert linear_flops(B, H, N, D, D, "fwd") == 4 * B * H * N * D * D
    assert linear_flops(B, H, N, D, D, "fwdbwd") == 3 * 4 * B * H * N * D * D


def test_plan_and_options():
    from bench.cli import build_parser, parse_lengths, plan
    from bench.env import device_slug

    assert parse_lengths("512,1k, 32k") == [512, 1024, 32768]
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    args = build_parser().parse_args(["--ops", "softmax,sparse,lightning", "--lengths", "8k", "--modes", "fwd",
                                      "--head-dims", "128", "--densities", "0.1,0.5"])
    tasks = plan(args, quick=False)
    soft = [c for s, p, c in tasks if s == "softmax" and p == "tileattn"]
    assert {(c.B, c.H, c.N, c.causal) for c in soft} == {(2, 16, 8192, False), (2, 16, 8192, True)}
    dense = [c for s, p, c in tasks if s == "sparse" and p == "tileattn" and c.op == "softmax"]
    assert len(dense) == 1 and dense[0].mask == "" and not dense[0].causal  # one dense baseline per (N, mode)
    sparse = [c for s, p, c in tasks if s == "sparse" and p == "tileattn" and c.op == "sparse"]
    assert {c.mask for c in sparse} >= {"random:0.1", "random:0.5", "window:1024"}
    light = {(p, c.op, c.causal) for s, p, c in tasks if s == "lightning"}
    assert ("tileattn-lightning", "lightning", True) in light and ("tileattn", "softmax", True) in light
    # lightning B x H: few programs (1 x 16) and fla's published setting (8 x 32); fla compared on both
    shapes = {(p, c.B, c.H) for s, p, c in tasks if s == "lightning" and c.op == "lightning"}
    assert {("tileattn-lightning", 1, 16), ("tileattn-lightning", 8, 32), ("fla-simple-gla", 1, 16),
            ("fla-simple-gla", 8, 32)} <= shapes


def test_readme_table_ratios():
    from bench.report import render_summary

    base = dict(sweep="softmax", op="softmax", mode="fwd", dtype="bf16", B=4, H=16, D=128, causal=False, mask="",
                status="ok", ms=1.0, device="NVIDIA H100", torch="2.11", triton="3.6", cuda="12.8",
                tileattn="0.1", commit="abc", time="2025-01-01T00:00:00", capability="sm_90")
    rows = []
    for N in (1024, 4096):
        for prov, tf in (("tileattn", 300.0), ("sdpa-flash", 200.0), ("sdpa-cudnn", 250.0), ("flex", 150.0)):
            rows.append(dict(base, N=N, provider=prov, tflops=tf))
    md = render_summary(rows)
    line = [ln for ln in md.splitlines() if ln.startswith("| bf16 | fwd |")][0]
    assert "300–300" in line and "1.20×" in line and "(cudnn)" in line and "2.00×" in line
    assert "NVIDIA H100" in md and "4·B·H·N²·D" in md
    assert "No timed measurements" in render_summary([dict(base, N=1024, provider="tileattn", status="skip")])


def test_resume_measures_only_missing_configs(tmp_path, capsys):
    """--resume (what scripts/gpu_session.sh passes, so a stage cut off by its time limit continues when run
    again): rows already in --out are kept as they are and only the missing configs are measured."""
    from bench.cli import build_parser, load_rows, run_sweep

    base = ["--cpu-timing", "--ops", "softmax", "--lengths", "32", "--head-dims", "16", "--causal", "false",
            "--rep", "1", "--warmup", "1", "--providers", "naive", "--out", str(tmp_path)]
    first = run_sweep(build_parser().parse_args(base + ["--modes", "fwd"]), False, str(tmp_path))
    assert [(r["mode"], r["status"]) for r in first] == [("fwd", "ok")]
    args = build_parser().parse_args(base + ["--modes", "fwd,bwd", "--resume"])
    rows = run_sweep(args, False, str(tmp_path))
    assert "resuming 1 earlier rows" in capsys.readouterr().out
    assert sorted(r["mode"] for r in rows) == ["bwd", "fwd"]
    assert [r for r in rows if r["mode"] == "fwd"] == first  # not measured again
    assert load_rows(str(tmp_path / "results.json"))[0] == rows
