"""``python -m bench``: verify, measure, plot.

With CUDA: for every (sweep, case, provider) the provider must first pass the correctness gate at a small
size, then it is timed (``triton.testing.do_bench`` median over rotated input sets) and its peak memory
measured; rows go to ``<out>/results.json`` / ``results.csv`` after every measurement, plots at the end.
Without CUDA: the correctness sweep under the Triton interpreter, the kernel resource report and the plots
that need no timing (see :mod:`bench.cpu`); timings need a GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from typing import Dict, List, Sequence, Tuple

from bench.env import REPO, device_slug, env_info, on_cuda, timestamp

DEFAULT_OUT = os.path.join(REPO, "bench", "out")
RESULTS_DIR = os.path.join(REPO, "bench", "results")

# --------------------------------------------------------------------------------------------- sweeps
SOFTMAX_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
SPARSE_LENGTHS = [8192, 16384, 32768]
LIGHTNING_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
LIGHTNING_BH = ((1, 16, 1 << 17), (8, 32, 32768))  # (B, H, longest N) of the lightning sweep
DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
WINDOWS = [256, 1024, 4096]
QUICK = {"softmax": [1024, 4096, 16384], "sparse": [8192], "lightning": [1024, 8192, 32768],
         "densities": [0.1, 0.3, 1.0], "windows": [1024], "head_dims": [128], "modes": ["fwd", "bwd"]}
VARLEN_LENGTHS = [16384]  # packed tokens per row (the documents' lengths sum to N)
DECODE_LENGTHS = [1024 << i for i in range(8)]  # cache length L, 1k .. 128k
DECODE_BATCHES = [1, 8, 64]
DECODE_HEADS, DECODE_GROUP = 32, 4  # Hq = 32 query heads over Hkv = 8 key / value heads
QUICK["decode"] = [1024, 8192, 65536]
HIDDEN = 2048  # FA2/FA3 charts: hidden size 2048 (H = 2048 / D), batch = 16k / N


def parse_lengths(text: str) -> List[int]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        mult = 1024 if tok.endswith("k") else 1
        out.append(int(float(tok.rstrip("k")) * mult))
    return out


def _csv_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--ops", default="softmax,sparse,lightning,varlen,decode",
                   help="sweeps to run: softmax, sparse (time vs block density), lightning (time vs length), "
                        "varlen (packed documents of mixed lengths vs padded batches and a Flex document mask), "
                        "decode (one query per sequence over a KV cache: K/V bandwidth as a fraction of a "
                        "device copy's)")
    p.add_argument("--dtypes", default="bf16", help="bf16, fp16, fp32 (comma separated)")
    p.add_argument("--head-dims", default=None, help="head dims for the softmax sweep (default 64,128)")
    p.add_argument("--causal", default="both", choices=["both", "true", "false"],
                   help="softmax sweep: causal, non-causal or both (varlen: non-causal only with false)")
    p.add_argument("--lengths", default=None,
                   help="sequence lengths for every selected sweep, e.g. 512,1k,4k (default per sweep: "
                        "softmax 512..32k, sparse 8k/16k/32k, lightning 1k..128k; varlen: packed tokens, 16k; "
                        "decode: cache length, 1k..128k)")
    p.add_argument("--densities", default=None, help="sparse sweep: random block-layout densities")
    p.add_argument("--doc-seeds", default="0",
                   help="varlen sweep: one packed row per seed, document lengths log-uniform in [128, 4096] "
                        "(at N = 16k) drawn from the seed (comma separated)")
    p.add_argument("--seqlens", default="equal",
                   help="decode sweep: cache lengths of the B sequences, 'equal' (all L) and/or 'ragged:<seed>' "
                        "(uniform in [1, L], one of them L) (comma separated)")
    p.add_argument("--modes", default="fwd,bwd,fwdbwd", help="fwd, bwd, fwdbwd (decode: fwd only, always)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size for every case (default: 16k / N for softmax and sparse, 1 for lightning, "
                        "1, 8 and 64 for decode; varlen is always one packed row)")
    p.add_argument("--heads", type=int, default=None,
                   help="heads for every case (default: 2048 / D; decode: 32 query heads, key / value heads = "
                        "heads / 4, or = heads when 4 does not divide them)")
    p.add_argument("--providers", default=None, help="only these providers (comma separated names)")
    p.add_argument("--quick", action="store_true", help="a short sweep (CPU: small interpreter checks)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/out)")
    p.add_argument("--append", action="store_true",
                   help="keep rows of an earlier run in --out (new measurements replace equal configs)")
    p.add_argument("--resume", action="store_true",
                   help="like --append, but configs that already have a row in --out are not measured again "
                        "(continue a sweep cut off by a time limit)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--save-results", action="store_true",
                   help="after the run, copy results and plots to bench/results/<device>/ (curated, committed)")
    p.add_argument("--report", action="store_true", help="also run the kernel resource report on CUDA")
    p.add_argument("--no-report", action="store_true", help="skip the kernel resource report (CPU mode)")
    p.add_argument("--report-filter", default=None, help="substring filter passed to the kernel report")
    p.add_argument("--cpu-timing", action="store_true",
                   help="harness self-test without CUDA: time the PyTorch providers on CPU at tiny sizes "
                        "(wall clock; not a benchmark of any kernel)")
    return p


def _softmax_cases(args, dtypes, modes, quick) -> List:
    from bench.measure import Case

    lengths = parse_lengths(args.lengths) if args.lengths else (QUICK["softmax"] if quick else SOFTMAX_LENGTHS)
    dims = [int(d) for d in _csv_list(args.head_dims)] if args.head_dims else (QUICK["head_dims"] if quick else [64, 128])
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    cases = []
    for dt in dtypes:
        for D in dims:
            H = max(1, HIDDEN // D)
            for causal in causals:
                for mode in modes:
                    for N in lengths:
                        cases.append(Case("softmax", max(1, 16384 // N), H, N, D, dt, causal, mode))
    return cases


def _sparse_cases(args, dtypes, modes, quick) -> List:
    from bench.measure import Case

    lengths = parse_lengths(args.lengths) if args.lengths else (QUICK["sparse"] if quick else SPARSE_LENGTHS)
    dens = [float(x) for x in _csv_list(args.densities)] if args.densities else (QUICK["densities"] if quick else DENSITIES)
    wins = QUICK["windows"] if quick else WINDOWS
    D = 128
    H = HIDDEN // D
    cases = []
    for dt in dtypes:
        for mode in modes:
            for N in lengths:
                masks = [f"random:{d:g}" for d in dens] + [f"window:{w}" for w in wins if w < N]
                for m in masks:
                    cases.append(Case("sparse", max(1, 16384 // N), H, N, D, dt, False, mode, m))
    return cases


def _lightning_cases(args, dtypes, modes, quick) -> List:
    from bench.measure import Case

    lengths = parse_lengths(args.lengths) if args.lengths else (QUICK["lightning"] if quick else LIGHTNING_LENGTHS)
    D = 128
    # B x H: few programs (1 x 16, where the chunk-parallel kernels matter most) and a training-size batch
    # (8 x 32, fla's published setting: N up to 32k, where q / k / v / o and the chunk states fit an H100)
    return [Case("lightning", B, H, N, D, dt, True, mode) for B, H, nmax in LIGHTNING_BH for dt in dtypes
            for mode in modes for N in lengths if N <= nmax]


def _varlen_cases(args, dtypes, modes, quick) -> List:
    """B=1 row of N packed tokens (mask ``docs:<seed>``: its document lengths, bench.measure.doc_lengths),
    H = 2048 / D; causal unless ``--causal false``."""
    from bench.measure import Case

    lengths = parse_lengths(args.lengths) if args.lengths else VARLEN_LENGTHS
    dims = [int(d) for d in _csv_list(args.head_dims)] if args.head_dims else (QUICK["head_dims"] if quick else [64, 128])
    causal = args.causal != "false"
    return [Case("varlen", 1, max(1, HIDDEN // D), N, D, dt, causal, mode, f"docs:{int(seed)}")
            for dt in dtypes for D in dims for mode in modes for N in lengths for seed in _csv_list(args.doc_seeds)]


def _decode_cases(args, dtypes, modes, quick) -> List:
    """Forward only (whatever --modes says): B in 1, 8, 64 (``--batch``), Hq = 32 (``--heads``), Hkv = Hq / 4,
    D = 128 (``--head-dims``), one query per sequence over a cache of L = N keys (``--lengths``, 1k..128k), cache
    lengths per ``--seqlens`` (mask ``""`` = all L, ``ragged:<seed>``). Largest batch last, so a stage cut off
    by its time limit has measured every length at the smaller batches."""
    from bench.measure import Case

    lengths = parse_lengths(args.lengths) if args.lengths else (QUICK["decode"] if quick else DECODE_LENGTHS)
    dims = [int(d) for d in _csv_list(args.head_dims)] if args.head_dims else [128]
    batches = [args.batch] if args.batch else ([1] if args.cpu_timing else DECODE_BATCHES)
    hq = args.heads or (2 * DECODE_GROUP if args.cpu_timing else DECODE_HEADS)
    hkv = hq // DECODE_GROUP if hq % DECODE_GROUP == 0 else hq
    masks = ["" if m == "equal" else m for m in _csv_list(args.seqlens)]
    return [Case("decode", B, hq, L, D, dt, False, "fwd", m, Hkv=hkv)
            for dt in dtypes for D in dims for m in masks for B in batches for L in lengths]


def _override(case, args):
    if case.op == "decode":  # batch and heads applied by _decode_cases (Hkv follows the heads)
        return case
    b, h = args.batch, args.heads
    if args.cpu_timing:
        b, h = b or 1, h or 2
    if b or h:
        case = replace(case, B=b or case.B, H=h or case.H)
    if case.op == "varlen" and case.B != 1:  # one packed row: its batch is the documents in it
        case = replace(case, B=1)
    return case


def plan(args, quick: bool) -> List[Tuple[str, str, object]]:
    """Every (sweep, provider, case) task in run order; the dense baselines of the sparse sweep and the
    causal-softmax baselines of the lightning sweep are deduplicated. The decode sweep always runs its copy
    baseline (the denominator of its bandwidth fractions), whatever ``--providers`` says."""
    from bench.providers import SWEEP_PROVIDERS

    dtypes = _csv_list(args.dtypes)
    modes = _csv_list(args.modes)
    if quick and args.modes == "fwd,bwd,fwdbwd":
        modes = QUICK["modes"]
    only = set(_csv_list(args.providers)) if args.providers else None
    builders = {"softmax": _softmax_cases, "sparse": _sparse_cases, "lightning": _lightning_cases,
                "varlen": _varlen_cases, "decode": _decode_cases}
    tasks, seen = [], set()
    for sweep in _csv_list(args.ops):
        if sweep not in builders:
            raise SystemExit(f"unknown op {sweep!r}: expected softmax, sparse, lightning, varlen or decode")
        for case in builders[sweep](args, dtypes, modes, quick):
            case = _override(case, args)
            for pname, op in SWEEP_PROVIDERS[sweep]:
                if only and pname not in only and (sweep, pname) != ("decode", "copy"):
                    continue
                c = case
                if op != case.op:  # a dense / causal softmax baseline inside the sparse / lightning sweep
                    c = replace(case, op="softmax", mask="", causal=(sweep == "lightning"))
                key = (sweep, pname, c)
                if key in seen:
                    continue
                seen.add(key)
                tasks.append((sweep, pname, c))
    return tasks


# --------------------------------------------------------------------------------------------- results
FIELDS = ["sweep", "op", "provider", "provider_id", "mode", "dtype", "B", "H", "Hkv", "N", "D", "Dv", "causal", "mask",
          "density", "ms", "ms_p20", "ms_p80", "tflops", "flops", "kv_bytes", "gbps", "copy_gbps", "bw_frac", "peak_mem_mb", "extra_mem_mb", "sets", "status", "note",
          "gate_err", "kernels", "flop_rule", "device", "capability", "torch", "triton", "cuda", "tileattn",
          "commit", "interpreter", "time"]


def row_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("sweep", "op", "provider", "mode", "dtype", "B", "H", "Hkv", "N", "D", "Dv",
                                    "causal", "mask"))


def write_results(out: str, rows: Sequence[dict], meta: dict, name: str = "results") -> Tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    jpath, cpath = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.csv")
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=1, default=str)
    os.replace(tmp, jpath)
    fields = list(FIELDS) + sorted({k for r in rows for k in r} - set(FIELDS))
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return jpath, cpath


def load_rows(path: str) -> Tuple[List[dict], dict]:
    with open(path) as f:
        doc = json.load(f)
    return doc.get("rows", []), doc.get("meta", {})


# --------------------------------------------------------------------------------------------- run
def _fmt_row(r: dict) -> str:
    what = f"{r['sweep']:<9} {r['provider']:<18} {r['mode']:<6} {r['dtype']} D{r['D']:<3} " \
           f"{'causal' if r['causal'] else 'full  '} N={r['N']:<6}"
    if r.get("mask"):
        what += f" {r['mask']}"
    if r["status"] == "ok" and r.get("gbps") is not None:  # decode: bandwidth, and its fraction of the copy's
        frac = f" = {r['bw_frac']:.2f} of copy" if r.get("bw_frac") is not None else ""
        return f"{what} B={r['B']:<3} -> {r['ms']:9.4f} ms {r['gbps']:7.0f} GB/s{frac}"
    if r["status"] == "ok":
        mem = r.get("peak_mem_mb")
        mem = "" if mem is None or mem != mem else f" {mem:8.0f} MiB"
        return f"{what} -> {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s{mem}"
    return f"{what} -> {r['status']}: {r['note']}"


def run_sweep(args, quick: bool, out: str) -> List[dict]:
    from bench import measure as M
    from bench.providers import all_providers, series_name

    device = "cuda" if on_cuda() else "cpu"
    providers = all_providers()
    tasks = plan(args, quick)
    if args.cpu_timing:
        tasks = [t for t in tasks if providers[t[1]].cpu_ok]
    rows: List[dict] = []
    if (args.append or args.resume) and os.path.exists(os.path.join(out, "results.json")):
        rows, _ = load_rows(os.path.join(out, "results.json"))
        print(f"{'resuming' if args.resume else 'appending to'} {len(rows)} earlier rows in {out}/results.json")
    notes: Dict[str, str] = {}
    for name, p in providers.items():
        if any(t[1] == name for t in tasks):
            why = p.unavailable()
            if why:
                notes[name] = why
    for name, why in notes.items():
        print(f"skip provider {name}: {why}")
    meta = {"env": env_info(), "argv": sys.argv[1:], "provider_notes": notes, "flop_rules":
            {"softmax": M.SOFTMAX_RULE, "linear": M.LINEAR_RULE, "varlen": M.VARLEN_RULE, "decode": M.DECODE_RULE},
            "started": timestamp(),
            "timing": "triton.testing.do_bench median (L2 flushed), rotated input sets" if on_cuda() else
            "CPU wall clock (harness self-test; not a kernel benchmark)"}
    gates: Dict[tuple, object] = {}
    total = len(tasks)
    t0 = time.perf_counter()
    index = {row_key(r): i for i, r in enumerate(rows)}
    done = set(index) if args.resume else set()
    try:
        last_mask = None
        for i, (sweep, pname, case) in enumerate(tasks, 1):
            p = providers[pname]
            if case.op == "sparse" and (case.N, case.mask) != last_mask:
                M.MASKS.clear()  # dense masks are large: keep only the current case's
                M.free_memory()
                last_mask = (case.N, case.mask)
            row = M.base_row(series_name(pname, sweep, case.op), case, sweep)
            row["provider_id"] = pname
            if pname in notes or row_key(row) in done:
                continue
            if case.op == "sparse":
                try:
                    row["density"] = M.MASKS.density(case.mask, case.N, case.H, device)
                except Exception as e:
                    row["density"] = None
                    row["note"] = f"density unknown ({type(e).__name__})"
            if case.op == "varlen":
                lens = M.doc_lengths(case.mask, case.N)
                row.update(density=M.doc_density(case.mask, case.N), docs=len(lens), max_doc=max(lens))
            flops, rule = M.case_flops(case, row["density"])
            row["flops"], row["flop_rule"] = flops, rule
            why = p.skip(case)
            if why:
                row.update(status="skip", note=why)
            else:
                gk = (pname,) + case.key() + (case.mode != "fwd",)
                if gk not in gates:
                    gates[gk] = M.gate(p, case, device)
                    M.free_memory()
                g = gates[gk]
                row["gate_err"] = None if g.err != g.err else round(g.err, 4)
                row["kernels"] = ";".join(g.kernels)
                if g.raised:
                    row.update(status="error" if p.ours else "skip", note=f"not supported here: {g.detail}")
                elif not g.ok:
                    row.update(status="fail", note=f"correctness gate failed: {g.detail}")
                elif p.ours and on_cuda() and not g.kernels:
                    row.update(status="skip", note="no Triton kernel launched (PyTorch fallback path); not timed")
                else:
                    try:
                        res = M.measure(p, case, device, warmup=args.warmup, rep=args.rep)
                        row.update(res)
                        row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
                        row["status"] = "ok"
                        if case.op == "decode":
                            row.update(M.decode_metrics(case, res["ms"], copy=pname == "copy"))
                            if pname == "copy":  # moves bytes, computes nothing
                                row.update(flops=None, tflops=None)
                        if not on_cuda():
                            row["note"] = "CPU wall clock (harness self-test)"
                    except Exception as e:
                        if M.is_oom(e):
                            row.update(status="oom", note="out of memory")
                        else:
                            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                            row.update(status="error", note=f"{type(e).__name__}: {msg}")
                    finally:
                        M.free_memory()
            k = row_key(row)
            if k in index:
                rows[index[k]] = row
            else:
                index[k] = len(rows)
                rows.append(row)
            if case.op == "decode":
                M.decode_fractions(rows)
            el = time.perf_counter() - t0
            print(f"[{i}/{total} {el:6.0f}s] {_fmt_row(row)}", flush=True)
            write_results(out, rows, meta)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
    M.MASKS.clear()
    meta["finished"] = timestamp()
    write_results(out, rows, meta)
    return rows


def save_results(out: str, rows: List[dict]) -> str:
    """Copy results + plots of ``out`` to ``bench/results/<device-slug>/`` and write its summary.md."""
    from bench.report import render_summary

    slug = device_slug(rows[0]["device"] if rows else None)
    dest = os.path.join(RESULTS_DIR, slug)
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(out):
        if name.endswith((".json", ".csv", ".png")):
            shutil.copy2(os.path.join(out, name), os.path.join(dest, name))
    with open(os.path.join(dest, "summary.md"), "w") as f:
        f.write(render_summary(rows, image_dir="."))
    return dest


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    if not on_cuda() and not args.cpu_timing:
        from bench.cpu import run_cpu

        return run_cpu(args, out)
    info = env_info()
    print(f"tileattn bench on {info['device']} | torch {info['torch']} | triton {info['triton']} | out: {out}")
    if not on_cuda():
        print("NOTE: --cpu-timing: PyTorch providers timed on CPU at the sizes given. This tests the harness "
              "only; it measures no kernel. Timings need a GPU.")
    rows = run_sweep(args, args.quick, out)
    from bench.plots import plot_all

    pngs = plot_all(rows, out)
    print(f"wrote {len(rows)} rows to {out}/results.json and results.csv, {len(pngs)} plots")
    if on_cuda() and args.report:
        from bench.cpu import run_kernel_report

        run_kernel_report(out, quick=args.quick, filt=args.report_filter)
    if args.save_results:
        if not on_cuda():
            print("--save-results ignored: only GPU measurements are curated under bench/results/")
        else:
            print(f"saved to {save_results(out, rows)}")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"done in {time.perf_counter() - t0:.0f} s: {ok} measurements, "
          f"{sum(r['status'] in ('skip', 'oom') for r in rows)} skipped, "
          f"{sum(r['status'] in ('fail', 'error') for r in rows)} failed")
    return 0
