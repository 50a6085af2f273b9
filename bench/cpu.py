"""What ``python -m bench`` does without CUDA: everything that is honest to do without a GPU.

1. The correctness sweep: tileattn's kernels under the Triton interpreter (and the PyTorch SDPA CPU paths,
   as a check of the harness) at small sizes (varlen: a packed row of mixed-length documents; decode: 3 sequences
   over paged and contiguous caches, equal and ragged lengths, and the copy baseline checked bitwise), against
   the float64 references, with the same gate the GPU
   run applies before timing. Written to ``correctness.json`` / ``.csv`` and ``correctness.png``.
2. The kernel resource report (``scripts/kernel_report.py``, in a subprocess without TRITON_INTERPRET):
   registers, spills and shared memory of every shipped config for sm_80 / sm_90. ``kernel_report.json``
   and ``kernel_registers.png`` / ``kernel_smem.png``.
3. Work counts that need no timing: tiles visited vs block density (from the BlockMask lists) and
   launched programs x loop trips vs length for lightning (from its launch plan), vs causal softmax
   tiles; score elements per varlen provider (packed, padded, document mask) over the useful ones.
   ``work.json`` / ``.csv``, ``work_sparse_visited_blocks.png``, ``work_lightning_vs_softmax.png``,
   ``work_varlen.png``.

No timing is produced: timings need a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List, Optional

from bench.env import REPO, env_info


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- 1. checks
def correctness_cases(quick: bool, dtypes: List[str], head_dims: Optional[List[int]]):
    from bench.measure import Case

    dims = head_dims or ([32] if quick else [64, 128])
    n = 129 if quick else 257
    cases = []
    for dt in dtypes:
        for D in dims:
            for causal in (False, True):
                cases.append(("tileattn", Case("softmax", 1, 2, n, D, dt, causal, "fwdbwd")))
                cases.append(("sdpa-math", Case("softmax", 1, 2, n, D, dt, causal, "fwdbwd")))
            for m in (["random:0.3", "window:100"] if quick else ["random:0.2", "random:0.5", "window:100"]):
                cases.append(("tileattn", Case("sparse", 1, 2, 300 if quick else 520, D, dt, False, "fwdbwd", m)))
            cases.append(("tileattn-lightning", Case("lightning", 1, 2, n, D, dt, True, "fwdbwd")))
            # varlen: n packed tokens in documents of mixed lengths (bench.measure.doc_lengths), and the padded baselines
            for causal in (True, False):
                cases.append(("tileattn-varlen", Case("varlen", 1, 2, n, D, dt, causal, "fwdbwd", "docs:0")))
            for pname in ("tileattn-padded", "sdpa-flash-padded"):
                cases.append((pname, Case("varlen", 1, 2, n, D, dt, True, "fwdbwd", "docs:0")))
            # decode: one query per sequence over a cache of n keys, GQA 8 / 2 (bench.measure.decode_inputs)
            for pname in ("tileattn-kvcache", "tileattn-kvcache-contig", "sdpa-math"):
                for m in ("", "ragged:0"):
                    cases.append((pname, Case("decode", 3, 8, n, D, dt, False, "fwd", m, Hkv=2)))
            cases.append(("copy", Case("decode", 3, 8, n, D, dt, False, "fwd", "ragged:0", Hkv=2)))
    return cases


def run_checks(args, out: str, quick: bool) -> List[dict]:
    from bench import measure as M
    from bench.cli import _csv_list, write_results
    from bench.plots import plot_bars
    from bench.providers import all_providers

    providers = all_providers()
    dims = [int(d) for d in _csv_list(args.head_dims)] if args.head_dims else None
    ops = set(_csv_list(args.ops))
    cases = [(p, c) for p, c in correctness_cases(quick, _csv_list(args.dtypes), dims) if c.op in ops]
    if args.providers:
        keep = set(_csv_list(args.providers))
        cases = [(p, c) for p, c in cases if p in keep]
    rows = []
    for i, (pname, case) in enumerate(cases, 1):
        p = providers[pname]
        row = M.base_row(pname, case, "check")
        row["provider_id"] = pname
        t0 = time.perf_counter()
        why = p.unavailable() or p.skip(case)
        if why:
            row.update(status="skip", note=why)
        else:
            g = M.gate(p, case, "cpu", small=case)
            row["gate_err"] = None if g.err != g.err else round(g.err, 4)
            row["kernels"] = ";".join(g.kernels)
            if p.ours:
                path = "triton interpreter" if g.kernels else "PyTorch fallback (no Triton kernel launched)"
            else:
                path = "PyTorch"
            row.update(status="pass" if g.ok else "FAIL", note=f"{path}; {g.detail}")
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        what = f"{case.op:<9} {pname:<18} {case.dtype} D{case.D:<3} N={case.N:<4} " \
               f"{'causal' if case.causal else 'full'} {case.mask}"
        _say(f"[check {i}/{len(cases)}] {what} -> {row['status']} ({row['note']}) {row['seconds']:.1f}s")
    meta = {"env": env_info(), "argv": sys.argv[1:],
            "rule": "err(x, fp64 ref) <= 2 * err(same-dtype PyTorch, fp64 ref) + floor (tests/helpers.py); "
                    "gate_err = worst err/tol over out, dq, dk, dv (<= 1 passes)"}
    write_results(out, rows, meta, name="correctness")
    done = [r for r in rows if r.get("gate_err") is not None]
    if done:
        labels = [f"{r['op']} {r['provider']} {r['dtype']} D{r['D']} {'causal' if r['causal'] else ''}{r['mask']}"
                  for r in done]
        plot_bars(labels, {"err / tol (worst of out, dq, dk, dv)": [r["gate_err"] for r in done]},
                  "correctness under the Triton interpreter (small sizes): error / tolerance, < 1 passes",
                  "err / tol", os.path.join(out, "correctness.png"), limits={"tolerance": 1.0},
                  footer=f"{env_info()['device']} | triton {env_info()['triton']} | torch {env_info()['torch']}")
    return rows


# --------------------------------------------------------------------------------------------- 2. report
def run_kernel_report(out: str, quick: bool, filt: Optional[str] = None, timeout: int = 1800) -> Optional[dict]:
    """Run scripts/kernel_report.py in a subprocess without TRITON_INTERPRET (AOT compile needs real
    JITFunctions); print its table, plot registers and shared memory per config."""
    from bench.plots import plot_bars

    jpath = os.path.join(out, "kernel_report.json")
    cmd = [sys.executable, os.path.join(REPO, "scripts", "kernel_report.py"), "--json", jpath]
    if quick:
        cmd.append("--quick")
    if filt:
        cmd += ["--filter", filt]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _say("kernel resource report: " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd[1:]))
    try:
        res = subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        _say(f"kernel report timed out after {timeout} s")
        return None
    _say(res.stdout.rstrip())
    if res.returncode not in (0, 1):
        _say(f"kernel report failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
        return None
    if res.returncode == 1:
        _say("NOTE: the kernel report found configs that spill, exceed shared memory or fail to compile (above).")
    with open(jpath) as f:
        doc = json.load(f)
    rows = [r for r in doc["rows"] if r.get("regs") is not None]
    foot = f"AOT-compiled on CPU with triton {doc.get('triton')}; cuobjdump --dump-resource-usage; " \
           "shared memory from the kernel metadata"
    if rows and len(rows) <= 40:
        labels = [f"{r['module']}.{r['name']} {r['arch']}" for r in rows]
        plot_bars(labels, {"registers / thread": [r["regs"] for r in rows],
                           "spill/stack bytes": [(r.get("stack") or 0) + (r.get("local") or 0) for r in rows]},
                  "registers and spills per shipped kernel config", "count", os.path.join(out, "kernel_registers.png"),
                  limits={"255 regs": 255}, footer=foot)
        plot_bars(labels, {"shared memory (KB)": [r["shared"] / 1024 for r in rows]},
                  "shared memory per shipped kernel config", "KB", os.path.join(out, "kernel_smem.png"),
                  limits={"sm_80 163 KB": 163, "sm_90 227 KB": 227}, footer=foot)
    if rows:
        _resource_scatter(rows, os.path.join(out, "kernel_resources.png"), foot)
    return doc


def _resource_scatter(rows, path: str, footer: str) -> str:
    """Registers vs shared memory, one point per (config, arch); spilling configs drawn as crosses."""
    from bench.plots import _COLORS, plt

    mods = sorted({r["module"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, arch, lim in zip(axes, ("sm_80", "sm_90"), (163, 227)):
        for j, m in enumerate(mods):
            pts = [r for r in rows if r["module"] == m and r["arch"] == arch]
            ok = [r for r in pts if not r.get("spills")]
            bad = [r for r in pts if r.get("spills")]
            ax.scatter([r["regs"] for r in ok], [r["shared"] / 1024 for r in ok], s=18, alpha=0.7,
                       color=_COLORS[j % len(_COLORS)], label=f"{m} ({len(pts)})")
            if bad:
                ax.scatter([r["regs"] for r in bad], [r["shared"] / 1024 for r in bad], s=60, marker="x",
                           linewidths=2, color=_COLORS[j % len(_COLORS)], label=f"{m}: SPILLS ({len(bad)})")
        ax.axhline(lim, color="red", linestyle="--", linewidth=1)
        ax.axvline(255, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"{arch}: registers vs shared memory per shipped config", fontsize=10)
        ax.set_xlabel("registers / thread")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("shared memory (KB); dashed: arch limit")
    fig.text(0.5, 0.005, footer, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- 3. work
def _causal_tile_pairs(N: int, bm: int = 128, bn: int = 64) -> int:
    """(query tile, key tile) pairs a causal tiled softmax visits per (batch, head): the model count for
    BM x BN tiles (tiles entirely above the diagonal are skipped)."""
    nq, nk = -(-N // bm), -(-N // bn)
    return sum(min(nk, -(-((i + 1) * bm) // bn)) for i in range(nq))


def _element_density(bm, H: int) -> Optional[float]:
    """Attended (q, k) pairs / all pairs of a BlockMask, from its lists: full blocks count whole, partial
    blocks by their stored element mask. None if the mask does not expose its lists."""
    try:
        import torch

        full = int(bm.kv_num_full.sum()) * bm.bs_q * bm.bs_k
        nk = bm.kv_mask_id_part.shape[-1]
        valid = torch.arange(nk) < bm.kv_num_part[..., None].cpu()
        ids = bm.kv_mask_id_part.cpu()[valid].long()
        per_mask = bm.masks.cpu().reshape(bm.masks.shape[0], -1).sum(1)
        part = int(per_mask[ids].sum())
        reps = (H if bm.H == 1 else 1)
        return (full + part) * reps / (H * bm.q_len * bm.kv_len)
    except Exception:
        return None


def run_work(out: str, quick: bool) -> List[dict]:
    import tileattn

    from bench import measure as M
    from bench.cli import write_results
    from bench.plots import plt

    rows = []
    figs = []
    H, D = 16, 128
    # block-sparse: tiles visited per forward vs the mask's element density (from the BlockMask lists)
    if hasattr(tileattn, "BlockMask") or hasattr(tileattn, "create_block_mask"):
        lengths = [8192, 32768] if quick else [8192, 16384, 32768]
        dens = [0.05, 0.1, 0.3, 0.5, 1.0] if quick else [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
        wins = [128, 512, 2048] if quick else [64, 128, 256, 512, 1024, 2048, 4096]
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        for N in lengths:
            # windows go through create_block_mask (predicate evaluated over N x N in chunks): slow on CPU at
            # 32k, so --quick builds them at the first length only
            masks = [f"random:{d:g}" for d in dens] + ([f"window:{w}" for w in wins] if not quick or N == lengths[0] else [])
            pts = []
            for m in masks:
                try:
                    bm = M.MASKS.tileattn(m, N, H, "cpu")
                    pts.append((m, float(bm.density), int(bm.visited_blocks(heads=H)), _element_density(bm, H)))
                except Exception as e:
                    _say(f"work: block mask {m} at N={N} failed: {type(e).__name__}: {e}")
                M.MASKS.clear()
            nb = -(-N // M.MaskCache.BLOCK)
            for m, bd, vis, ed in pts:
                rows.append({"sweep": "work", "op": "sparse", "N": N, "H": H, "mask": m, "density": bd,
                             "element_density": ed, "visited_blocks": vis, "all_blocks": H * nb * nb})
            for kind, marker, ls in (("random", "o", "-"), ("window", "^", ":")):
                kp = sorted([p for p in pts if p[0].startswith(kind) and p[3] is not None], key=lambda p: p[3])
                if kp:
                    ax.plot([p[3] for p in kp], [p[2] / (H * nb * nb) for p in kp], marker=marker, linestyle=ls,
                            label=f"N={N // 1024}k {'random block layout' if kind == 'random' else 'causal sliding window'}")
        ax.plot([0, 1], [0, 1], color="gray", linewidth=1, label="tiles = attended fraction (no block overhead)")
        ax.set_xlabel("mask density (attended (q, k) pairs / all pairs)")
        ax.set_ylabel("tiles visited / all tiles (128×128)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title("block-sparse work: tiles the kernels visit vs mask density\n"
                     "(counted from the BlockMask lists; windows pay for partial diagonal blocks)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.text(0.5, 0.005, f"B=1, H={H}; counts, not timings: timings need a GPU", ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        p = os.path.join(out, "work_sparse_visited_blocks.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)
    else:
        _say("work: tileattn has no BlockMask yet; block-sparse work plot skipped")
    # lightning: launched programs x chunk-loop trips vs length, against causal softmax tile pairs
    try:
        from tileattn.kernels.lightning import lightning_work
    except Exception:
        lightning_work = None
    if lightning_work is not None:
        lengths = [1024 << i for i in range(8)]
        lw, sw = [], []
        def steps(v):  # an int, or (programs, trips per program)
            if isinstance(v, (tuple, list)):
                out = 1
                for x in v:
                    out *= int(x)
                return out
            return int(v)

        for N in lengths:
            w = lightning_work(N, D, D, B=1, H=H)
            fwd = sum(steps(v) for k, v in w.items() if k.startswith("fwd"))
            bwd = sum(steps(v) for k, v in w.items() if k.startswith("bwd"))
            s = H * _causal_tile_pairs(N)
            lw.append((fwd, bwd))
            sw.append(s)
            rows.append({"sweep": "work", "op": "lightning", "N": N, "H": H, "D": D, "lightning_fwd_steps": fwd,
                         "lightning_bwd_steps": bwd, "softmax_causal_tile_pairs": s})
        fig, ax = plt.subplots(figsize=(6.5, 4.4))
        ax.plot(lengths, [a for a, _ in lw], marker="o", label="lightning fwd: programs × chunk trips (3 phases)")
        ax.plot(lengths, [b for _, b in lw], marker="o", label="lightning bwd (states, dstates, dq, dk, dv)")
        ax.plot(lengths, sw, marker="s", linestyle="--", label="causal softmax fwd: 128×64 tile pairs (model)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{n // 1024}k" for n in lengths], fontsize=8)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(f"tile steps (B=1, H={H}, D=Dv={D})")
        ax.set_title("work vs length: lightning is linear (slope 1), causal softmax quadratic (slope 2)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.text(0.5, 0.005, "counts from the launch plans (tileattn.kernels.lightning.lightning_work), not timings",
                 ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        p = os.path.join(out, "work_lightning_vs_softmax.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)
    else:
        _say("work: tileattn.kernels.lightning.lightning_work not available; lightning work plot skipped")
    try:
        figs.append(_varlen_work_plot(out, rows, quick))
    except Exception as e:  # like the others: never fail the run for a work plot
        _say(f"work: varlen work plot skipped: {type(e).__name__}: {e}")
    if rows:
        write_results(out, rows, {"env": env_info(), "note": "work counts (no timing)"}, name="work")
    return rows


def varlen_work(N: int, mask: str, bm: int = 128, bn: int = 64, fb: int = 128) -> dict:
    """Causal (q, k) score elements each varlen provider computes for a packed row, in the tile model of
    :func:`_causal_tile_pairs`: per-document BM x BN tiles (attention_varlen), every document padded to the
    longest (padded batch), FB x FB blocks of the packed row holding a same-document causal pair (FlexAttention's
    document block mask), and causal attention over the whole row (no document mask); ``useful`` = Σ n(n+1)/2."""
    import bisect

    from bench.measure import doc_lengths

    lens = doc_lengths(mask, N)
    doc = [d for d, n in enumerate(lens) for _ in range(n)]
    nb = -(-N // fb)
    last = [doc[min(N, (j + 1) * fb) - 1] for j in range(nb)]  # non-decreasing
    blocks = sum(i + 1 - bisect.bisect_left(last, doc[i * fb]) for i in range(nb))
    return {"N": N, "mask": mask, "docs": len(lens), "max_doc": max(lens),
            "useful": sum(n * (n + 1) // 2 for n in lens),
            "packed": sum(_causal_tile_pairs(n, bm, bn) for n in lens) * bm * bn,
            "padded": len(lens) * _causal_tile_pairs(max(lens), bm, bn) * bm * bn,
            "flex_doc_mask": blocks * fb * fb,
            "whole_row_causal": _causal_tile_pairs(N, bm, bn) * bm * bn}


def _varlen_work_plot(out: str, rows: List[dict], quick: bool) -> str:
    """Bars: computed / useful score elements per varlen provider vs packed length (recipe docs:0)."""
    from bench.plots import _COLORS, plt

    lengths = [4096, 16384] if quick else [4096, 8192, 16384, 32768]
    pts = [varlen_work(N, "docs:0") for N in lengths]
    rows += [dict(p, sweep="work", op="varlen") for p in pts]
    series = [("packed", "tileattn-varlen: per-document 128×64 tiles"),
              ("flex_doc_mask", "flex: 128×128 document-mask blocks of the row"),
              ("padded", "padded batch: every document to the longest"),
              ("whole_row_causal", "causal over the whole row (no document mask)")]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    w = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(pts))]
        bars = ax.bar(xs, [p[key] / p["useful"] for p in pts], width=w, label=label, color=_COLORS[j % len(_COLORS)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(pts)))
    ax.set_xticklabels([f"N={p['N'] // 1024}k\n{p['docs']} docs ≤ {p['max_doc']}" for p in pts], fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_ylabel("score elements computed / useful (causal, per head)")
    ax.set_title("varlen work: packed documents vs document mask vs padding (recipe docs:0)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.text(0.5, 0.005, "tile-model counts (tile sizes fixed for the count; the kernels autotune theirs), not "
             "timings: timings need a GPU", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = os.path.join(out, "work_varlen.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- main
def run_cpu(args, out: str) -> int:
    t0 = time.perf_counter()
    info = env_info()
    _say(f"tileattn bench: no CUDA device ({info['device']}; torch {info['torch']}, triton {info['triton']}).")
    _say("Timings need a GPU: none are measured here. This run checks correctness under the Triton "
         "interpreter at small sizes, reports kernel resources (AOT compile for sm_80 / sm_90) and plots "
         "work counts.")
    if not info["interpreter"]:
        _say("NOTE: TRITON_INTERPRET is off, so tileattn ops take their PyTorch fallback path on CPU.")
    if args.save_results:
        _say("--save-results ignored: only GPU measurements are curated under bench/results/.")
    quick = args.quick
    checks = run_checks(args, out, quick)
    n_fail = sum(r["status"] == "FAIL" for r in checks)
    report = None
    if not args.no_report:
        report = run_kernel_report(out, quick=quick, filt=args.report_filter)
    try:
        run_work(out, quick)
    except Exception as e:  # the work counts read other modules' launch plans; never fail the run for them
        _say(f"work plots skipped: {type(e).__name__}: {e}")
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    _say("")
    _say(f"correctness: {sum(r['status'] == 'pass' for r in checks)} pass, {n_fail} FAIL, "
         f"{sum(r['status'] == 'skip' for r in checks)} skipped (see {os.path.join(out, 'correctness.csv')})")
    if report is not None:
        _say(f"kernel report: {len(report['rows'])} compiles, {len(report['failures'])} problems "
             f"({os.path.join(out, 'kernel_report.json')})")
    _say(f"plots: {', '.join(pngs)} in {out}")
    _say(f"done in {time.perf_counter() - t0:.0f} s. Timings need a GPU: run `python -m bench` on a machine "
         "with an NVIDIA GPU (sm_80 / sm_90).")
    return 0
