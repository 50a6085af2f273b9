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


# --------------------------------------------------------------------------------------------- varlen sweep
def test_varlen_documents_and_flops():
    """docs:<seed> packs N tokens from mixed lengths (deterministic in seed and N, in [128, 4096] at 16k but for
    one remainder); FLOPs are the softmax rule at density Σ len² / N², i.e. 4·H·D·Σ len² × 0.5 causal."""
    from bench.measure import Case, case_flops, doc_density, doc_lengths

    lens = doc_lengths("docs:0", 16384)
    assert sum(lens) == 16384 and lens == doc_lengths("docs:0", 16384) != doc_lengths("docs:1", 16384)
    assert len(set(lens)) > 3 and max(lens) <= 4096 and sum(n < 128 for n in lens) <= 1
    for N in (1, 17, 129, 257):
        small = doc_lengths("docs:3", N)
        assert sum(small) == N and min(small) >= 1
    assert doc_density("docs:0", 16384) == sum(n * n for n in lens) / 16384 ** 2
    H, D = 16, 128
    for causal, mode, mult in ((True, "fwd", 0.5), (False, "fwd", 1.0), (True, "fwdbwd", 0.5 * 3.5)):
        flops, rule = case_flops(Case("varlen", 1, H, 16384, D, "bf16", causal, mode, "docs:0"), None)
        assert flops == pytest.approx(4 * H * D * sum(n * n for n in lens) * mult, rel=1e-12)
        assert "Σ len_i² / N²" in rule
    with pytest.raises(ValueError, match="docs:<seed>"):
        doc_lengths("random:0.5", 64)


def test_varlen_plan():
    from bench.cli import build_parser, plan

    tasks = plan(build_parser().parse_args(["--ops", "varlen", "--modes", "fwd,bwd"]), quick=False)
    assert {p for _, p, _ in tasks} == {"tileattn-varlen", "tileattn-padded", "flex", "sdpa-flash-padded"}
    cases = {c for _, p, c in tasks if p == "tileattn-varlen"}
    assert {(c.op, c.B, c.H, c.N, c.D, c.causal, c.mask) for c in cases} == {
        ("varlen", 1, 32, 16384, 64, True, "docs:0"), ("varlen", 1, 16, 16384, 128, True, "docs:0")}
    assert {c.mode for c in cases} == {"fwd", "bwd"}
    args = build_parser().parse_args(["--ops", "varlen", "--lengths", "4k,32k", "--doc-seeds", "0,7", "--causal",
                                      "false", "--head-dims", "128", "--modes", "fwd"])
    cases = [c for _, p, c in plan(args, quick=False) if p == "tileattn-varlen"]
    assert {(c.N, c.mask, c.causal) for c in cases} == {(n, f"docs:{s}", False) for n in (4096, 32768) for s in (0, 7)}
    from bench.providers import all_providers

    assert "key-padding" in all_providers()["tileattn-padded"].skip(cases[0])
    args = build_parser().parse_args(["--ops", "varlen", "--batch", "4", "--heads", "8", "--modes", "fwd"])
    assert {(c.B, c.H) for _, _, c in plan(args, quick=False)} == {(1, 8)}  # one packed row whatever --batch says


def _wrong_varlen_provider():
    """Causal attention over the whole packed row, ignoring the document boundaries: the gate must fail it."""
    from tileattn.reference import attention_ref

    from bench.providers import Built, Provider

    class Leaky(Provider):
        name, ops = "leaky", ("varlen",)

        def build(self, case, inp, masks, for_gate):
            q, k, v = inp.q, inp.k, inp.v
            return Built(lambda: attention_ref(q, k, v, causal=case.causal)[0], [q, k, v])

    return Leaky()


@pytest.mark.parametrize("pname, causal, mode", [
    pytest.param("tileattn-varlen", True, "fwdbwd", id="varlen-causal-fwdbwd"),
    pytest.param("tileattn-varlen", False, "fwd", id="varlen-full-fwd"),
    pytest.param("tileattn-padded", True, "fwdbwd", id="padded-causal-fwdbwd"),
    pytest.param("sdpa-flash-padded", True, "fwdbwd", id="sdpa-padded-causal-fwdbwd"),
])
def test_varlen_gate(pname, causal, mode):
    """Each varlen provider passes the gate (per-document float64 reference, output and gradients) on a packed
    row whose documents are not block multiples; tileattn providers launch Triton kernels."""
    import torch

    from bench import measure as M
    from bench.providers import all_providers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = M.Case("varlen", 1, 2, 129, 32, "bf16", causal, mode, "docs:0")
    assert any(n % 16 for n in M.doc_lengths(case.mask, case.N))
    p = all_providers()[pname]
    g = M.gate(p, case, device, small=case)
    assert g.ok and not g.raised, g.detail
    assert bool(g.kernels) == p.ours, g.kernels
    if pname == "tileattn-varlen" and causal:
        bad = M.gate(_wrong_varlen_provider(), case, device, small=case)
        assert not bad.ok and not bad.raised, bad.detail


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_varlen_flex_document_mask(monkeypatch):
    """The flex provider's document-causal block mask (eager flex_attention; forward only on CPU) matches the
    per-document reference."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from bench import measure as M
    from bench import providers as P

    monkeypatch.setitem(P._FLEX, "fn", flex_attention)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for causal in (True, False):
        case = M.Case("varlen", 1, 2, 256, 32, "fp32", causal, "fwd", "docs:0")
        g = M.gate(P.Flex(), case, device, small=case)
        assert g.ok and not g.raised, g.detail
    M.MASKS.clear()


def test_varlen_measurement_pipeline_on_cpu(tmp_path):
    """--cpu-timing through the varlen sweep (the PyTorch padded provider): rows carry the document recipe,
    density Σ len² / N², useful FLOPs and the varlen rule; the TFLOP/s plot and the summary table render."""
    from bench.cli import build_parser, run_sweep
    from bench.measure import Case, case_flops, doc_lengths
    from bench.plots import plot_all
    from bench.report import render_summary

    args = build_parser().parse_args(["--cpu-timing", "--ops", "varlen", "--lengths", "200", "--head-dims", "16",
                                      "--modes", "fwd,fwdbwd", "--rep", "1", "--warmup", "1", "--doc-seeds", "0,1",
                                      "--out", str(tmp_path)])
    rows = run_sweep(args, False, str(tmp_path))
    assert len(rows) == 4 and {r["provider"] for r in rows} == {"sdpa-flash-padded"}
    for r in rows:
        lens = doc_lengths(r["mask"], 200)
        assert r["status"] == "ok" and r["gate_err"] <= 1.0, r
        assert (r["docs"], r["max_doc"]) == (len(lens), max(lens)) and r["density"] < 1
        case = Case("varlen", r["B"], r["H"], r["N"], r["D"], r["dtype"], r["causal"], r["mode"], r["mask"])
        assert r["flops"] == case_flops(case, None)[0] and r["flop_rule"].startswith("varlen")
    pngs = plot_all(rows, str(tmp_path))
    assert {os.path.basename(p) for p in pngs} == {"varlen_tflops_fwd_bf16.png", "varlen_tflops_fwdbwd_bf16.png"}
    ours = [dict(r, provider="tileattn-varlen", tflops=2 * r["tflops"]) for r in rows]
    md = render_summary(rows + ours)
    assert "Varlen (packed documents" in md and "2.00×" in md and "vs sdpa-flash-padded" in md


def test_varlen_work_counts():
    """The CPU-mode varlen work counts: Flex's document blocks and the useful elements match the dense
    document-causal mask; packed per-document tiles do less than padding, which does less than the whole row."""
    import torch

    from bench.cpu import varlen_work
    from bench.measure import MASKS

    for N in (300, 2049):
        w = varlen_work(N, "docs:2")
        d = MASKS.dense("docs-causal:2", 1, N, 1, "cpu")[0, 0].float()
        nb = -(-N // 128)
        blocks = torch.nn.functional.pad(d, (0, nb * 128 - N, 0, nb * 128 - N)).view(nb, 128, nb, 128).amax(dim=(1, 3))
        assert w["flex_doc_mask"] == int(blocks.sum()) * 128 * 128 and w["useful"] == int(d.sum())
    MASKS.clear()
    w = varlen_work(16384, "docs:0")
    assert w["useful"] < w["packed"] < w["padded"] < w["whole_row_causal"]


# --------------------------------------------------------------------------------------------- decode sweep
def test_decode_plan():
    """The issue's grid: B in {1, 8, 64}, Hq=32, Hkv=8, D=128, Nq=1, cache 1k..128k, forward only whatever
    --modes says; every provider, the copy baseline first and always (it is the denominator)."""
    from bench.cli import build_parser, plan

    tasks = plan(build_parser().parse_args(["--ops", "decode", "--modes", "fwd,bwd"]), quick=False)
    assert [p for _, p, _ in tasks[:8]] == ["copy", "tileattn-kvcache", "tileattn-kvcache-contig", "sdpa-flash",
                                            "sdpa-efficient", "sdpa-cudnn", "flex", "sdpa-math"]
    cases = [c for _, p, c in tasks if p == "tileattn-kvcache"]
    assert {(c.op, c.H, c.hkv, c.D, c.dv, c.mode, c.mask, c.causal) for c in cases} == {
        ("decode", 32, 8, 128, 128, "fwd", "", False)}
    assert [(c.B, c.N) for c in cases] == [(b, 1024 << i) for b in (1, 8, 64) for i in range(8)]  # largest B last
    args = build_parser().parse_args(["--ops", "decode", "--providers", "tileattn-kvcache", "--lengths", "8k",
                                      "--batch", "4", "--heads", "12", "--seqlens", "equal,ragged:3"])
    tasks = plan(args, quick=False)
    assert {p for _, p, _ in tasks} == {"copy", "tileattn-kvcache"}
    assert {(c.B, c.H, c.hkv, c.N, c.mask) for _, _, c in tasks} == {(4, 12, 3, 8192, ""), (4, 12, 3, 8192, "ragged:3")}
    args = build_parser().parse_args(["--ops", "decode", "--heads", "6", "--lengths", "1k"])
    assert {c.hkv for _, _, c in plan(args, quick=False)} == {6}  # 4 does not divide 6: one kv head per head


def test_decode_lengths_bytes_flops():
    """Cache lengths (equal, or ragged in [1, L] with one at L, deterministic), the K/V bytes a step reads and
    the FLOP rule 4·Hq·Nq·D·Σ L_b (= 4·B·Hq·L·D at equal lengths)."""
    from bench.measure import Case, case_flops, decode_kv_bytes, decode_lengths, decode_metrics

    assert decode_lengths("", 3, 1000) == [1000] * 3
    lens = decode_lengths("ragged:0", 64, 4096)
    assert lens == decode_lengths("ragged:0", 64, 4096) != decode_lengths("ragged:1", 64, 4096)
    assert max(lens) == 4096 and min(lens) >= 1 and len(set(lens)) > 10
    B, H, L, D = 8, 32, 8192, 128
    case = Case("decode", B, H, L, D, "bf16", False, "fwd", "", Hkv=8)
    assert decode_kv_bytes(case) == B * 8 * L * 2 * D * 2  # K and V, bf16
    flops, rule = case_flops(case, None)
    assert flops == 4 * B * H * L * D and rule.startswith("decode")
    ragged = Case("decode", 64, H, 4096, 64, "fp32", False, "fwd", "ragged:0", Dv=32, Hkv=8)
    assert decode_kv_bytes(ragged) == sum(lens) * 8 * (64 + 32) * 4
    assert case_flops(ragged, None)[0] == 2 * H * sum(lens) * (64 + 32)
    m = decode_metrics(case, 2.0, copy=False)
    assert m["gbps"] == pytest.approx(decode_kv_bytes(case) / 2e-3 / 1e9)
    assert decode_metrics(case, 2.0, copy=True)["gbps"] == pytest.approx(2 * m["gbps"])  # read + written
    with pytest.raises(ValueError, match="ragged:<seed>"):
        decode_lengths("docs:0", 2, 64)


def test_decode_paged_cache_layout():
    """The paged pool holds each sequence's keys in its block table's pages, in order (a partial last page)."""
    import torch

    from bench.measure import Case, decode_inputs, paged_cache

    inp = decode_inputs(Case("decode", 3, 4, 150, 16, "fp32", False, "fwd", "", Hkv=2), "cpu")
    kp, vp, table = paged_cache(inp.k, inp.v, 64)
    assert table.dtype == torch.int32 and table.shape == (3, 3) and sorted(table.flatten().tolist()) == list(range(9))
    assert table.flatten().tolist() != list(range(9))  # shuffled
    for pool, x in ((kp, inp.k), (vp, inp.v)):
        seq = pool[table.long()].flatten(1, 2)[:, :150].permute(0, 2, 1, 3)  # (B, Hkv, L, D)
        assert torch.equal(seq, x)
    assert inp.k.data_ptr() == inp.extra["kv"].data_ptr()  # K and V are views of the buffer the copy moves


def _wrong_decode_provider():
    """Attends to the whole cache of every sequence, ignoring cache_seqlens: the gate must fail it."""
    from tileattn.reference import attention_ref

    from bench.providers import Built, Provider

    class Leaky(Provider):
        name, ops = "leaky", ("decode",)

        def build(self, case, inp, masks, for_gate):
            return Built(lambda: attention_ref(inp.q, inp.k, inp.v, causal=False)[0], [])

    return Leaky()


@pytest.mark.parametrize("pname, mask", [
    pytest.param("tileattn-kvcache", "", id="paged-equal"),
    pytest.param("tileattn-kvcache", "ragged:0", id="paged-ragged"),
    pytest.param("tileattn-kvcache-contig", "ragged:0", id="contig-ragged"),
    pytest.param("sdpa-math", "ragged:0", id="sdpa-math-ragged"),
    pytest.param("copy", "ragged:0", id="copy"),
])
def test_decode_gate(pname, mask):
    """Every decode provider passes the gate (float64 reference over per-sequence lengths, GQA 8 / 2, 129
    keys = two 64-key pages and one key); tileattn ones launch Triton kernels; the copy is checked bitwise."""
    import torch

    from bench import measure as M
    from bench.providers import all_providers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = M.Case("decode", 3, 8, 129, 32, "bf16", False, "fwd", mask, Hkv=2)
    p = all_providers()[pname]
    g = M.gate(p, case, device, small=case)
    assert g.ok and not g.raised, g.detail
    assert bool(g.kernels) == p.ours, g.kernels
    if pname == "copy":
        assert g.detail == "bitwise copy"
    if mask and p.ours:
        bad = M.gate(_wrong_decode_provider(), case, device, small=case)
        assert not bad.ok and not bad.raised, bad.detail


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_decode_flex(monkeypatch):
    """The flex provider's decode path (eager flex_attention on CPU: enable_gqa, a kv_idx < L_b block mask for
    ragged lengths) matches the reference."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from bench import measure as M
    from bench import providers as P

    monkeypatch.setitem(P._FLEX, "fn", flex_attention)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for mask in ("", "ragged:0"):
        case = M.Case("decode", 3, 8, 256, 32, "fp32", False, "fwd", mask, Hkv=2)
        g = M.gate(P.Flex(), case, device, small=case)
        assert g.ok and not g.raised, g.detail


def test_decode_measurement_pipeline_on_cpu(tmp_path):
    """--cpu-timing through the decode sweep: the copy baseline runs although --providers omits it, rows carry
    K/V bytes, GB/s and the fraction of the same configuration's copy bandwidth; plot and table render."""
    from bench.cli import build_parser, run_sweep
    from bench.measure import Case, case_flops, decode_kv_bytes
    from bench.plots import plot_all
    from bench.report import render_summary

    args = build_parser().parse_args(["--cpu-timing", "--ops", "decode", "--lengths", "64,200", "--batch", "2",
                                      "--seqlens", "equal,ragged:0", "--providers", "sdpa-math", "--rep", "1",
                                      "--warmup", "1", "--out", str(tmp_path)])
    rows = run_sweep(args, False, str(tmp_path))
    assert len(rows) == 8 and {r["provider"] for r in rows} == {"copy", "sdpa-math"}
    copies = {(r["N"], r["mask"]): r for r in rows if r["provider"] == "copy"}
    for r in rows:
        case = Case("decode", r["B"], r["H"], r["N"], r["D"], r["dtype"], r["causal"], r["mode"], r["mask"],
                    Hkv=r["Hkv"])
        assert r["status"] == "ok" and (r["B"], r["H"], r["Hkv"]) == (2, 8, 2), r
        assert r["kv_bytes"] == decode_kv_bytes(case) and r["flop_rule"].startswith("decode")
        c = copies[(r["N"], r["mask"])]
        assert r["copy_gbps"] == c["gbps"] == pytest.approx(2 * c["kv_bytes"] / (c["ms"] * 1e-3) / 1e9)
        if r["provider"] == "copy":
            assert r["bw_frac"] == 1.0 and r["tflops"] is None
        else:
            assert r["gbps"] == pytest.approx(r["kv_bytes"] / (r["ms"] * 1e-3) / 1e9)
            assert r["bw_frac"] == pytest.approx(r["gbps"] / c["gbps"])
            assert r["tflops"] == pytest.approx(case_flops(case, None)[0] / (r["ms"] * 1e-3) / 1e12)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"Hkv", "kv_bytes", "gbps", "copy_gbps", "bw_frac"} <= set(header)
    pngs = plot_all(rows, str(tmp_path))
    assert {os.path.basename(p) for p in pngs} == {"decode_bandwidth_bf16.png", "decode_bandwidth_bf16_ragged0.png"}
    ours = [dict(r, provider="tileattn-kvcache", N=8192, gbps=r["copy_gbps"] * f, bw_frac=f)
            for r, f in zip([r for r in rows if r["provider"] == "sdpa-math"], (0.9, 0.85, 0.5, 0.95))]
    md = render_summary(rows + ours)
    assert "Decode over a KV cache" in md and "tileattn-kvcache GB/s (of copy)" in md
    assert "3 of 4 configs reach 0.8" in md and "(lowest 0.50)" in md
