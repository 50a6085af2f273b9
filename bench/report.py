"""Render the README / issue-note tables from a results file.

    python -m bench.report bench/results/<device>/results.json [--detail] [--images DIR]

Ratios are tileattn's TFLOP/s over the other provider's at the same configuration (= their time / ours):
above 1 means tileattn is faster. "best SDPA" is, per configuration, the fastest of the SDPA backends that
ran (flash, efficient, cuDNN, math). Decode: GB/s of K/V read and its fraction of the copy bandwidth measured in
the same run (bench.measure.DECODE_RULE).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from bench.measure import DECODE_RULE, LINEAR_RULE, SOFTMAX_RULE, VARLEN_RULE


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("ms")]


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _ratio_cell(rs: List[float]) -> str:
    if not rs:
        return "—"
    if len(rs) == 1:
        return f"{rs[0]:.2f}×"
    return f"{_geomean(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})"


def softmax_ratios(rows: Sequence[dict]) -> Dict[tuple, List[dict]]:
    """Per (dtype, mode, causal, D): one entry per N with tileattn TFLOP/s, best SDPA (name, TFLOP/s) and
    Flex TFLOP/s."""
    rows = [r for r in _ok(rows) if r["sweep"] == "softmax"]
    by = defaultdict(dict)
    for r in rows:
        by[(r["dtype"], r["mode"], r["causal"], r["D"], r["N"])][r["provider"]] = r
    out = defaultdict(list)
    for (dt, mode, causal, D, N), provs in sorted(by.items()):
        ours = provs.get("tileattn")
        sdpa = [r for p, r in provs.items() if p.startswith("sdpa-")]
        best = max(sdpa, key=lambda r: r["tflops"]) if sdpa else None
        flex = provs.get("flex")
        out[(dt, mode, causal, D)].append({
            "N": N, "ours": ours["tflops"] if ours else None,
            "sdpa": best["tflops"] if best else None, "sdpa_name": best["provider"][5:] if best else "",
            "flex": flex["tflops"] if flex else None})
    return out


def render_softmax(rows: Sequence[dict], detail: bool = False) -> str:
    groups = softmax_ratios(rows)
    if not groups:
        return ""
    lines = ["| dtype | mode | causal | D | N | tileattn TFLOP/s | vs best SDPA | vs FlexAttention |",
             "|---|---|---|---|---|---|---|---|"]
    for (dt, mode, causal, D), pts in groups.items():
        have = [p for p in pts if p["ours"]]
        if not have:
            continue
        rs = [p["ours"] / p["sdpa"] for p in have if p["sdpa"]]
        rf = [p["ours"] / p["flex"] for p in have if p["flex"]]
        names = sorted({p["sdpa_name"] for p in have if p["sdpa"]})
        ns = [p["N"] for p in have]
        lines.append(f"| {dt} | {mode} | {'yes' if causal else 'no'} | {D} | {_len(min(ns))}–{_len(max(ns))} | "
                     f"{min(p['ours'] for p in have):.0f}–{max(p['ours'] for p in have):.0f} | "
                     f"{_ratio_cell(rs)} {'(' + '/'.join(names) + ')' if names else ''} | {_ratio_cell(rf)} |")
        if detail:
            for p in have:
                s = f"{p['ours'] / p['sdpa']:.2f}× ({p['sdpa_name']} {p['sdpa']:.0f})" if p["sdpa"] else "—"
                f = f"{p['ours'] / p['flex']:.2f}× ({p['flex']:.0f})" if p["flex"] else "—"
                lines.append(f"| | | | | {_len(p['N'])} | {p['ours']:.0f} | {s} | {f} |")
    return "\n".join(lines)


def render_sparse(rows: Sequence[dict]) -> str:
    rows = [r for r in _ok(rows) if r["sweep"] == "sparse"]
    if not rows:
        return ""
    dense = {(r["dtype"], r["mode"], r["N"]): r for r in rows if r["provider"] == "tileattn (dense)"}
    by = defaultdict(dict)
    for r in rows:
        if r["op"] == "sparse":
            by[(r["dtype"], r["mode"], r["N"], r["mask"])][r["provider"]] = r
    lines = ["| dtype | mode | N | mask | density | tileattn ms | / dense tileattn | FlexAttention ms | vs Flex |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (dt, mode, N, mask), provs in sorted(by.items(), key=lambda kv: (kv[0][:3], kv[1].get("tileattn", {}).get("density") or 0)):
        ours, flex = provs.get("tileattn"), provs.get("flex")
        if not ours:
            continue
        d = dense.get((dt, mode, N))
        lines.append(f"| {dt} | {mode} | {_len(N)} | {mask} | {ours['density']:.2f} | {ours['ms']:.3f} | "
                     f"{ours['ms'] / d['ms']:.2f} |" if d else
                     f"| {dt} | {mode} | {_len(N)} | {mask} | {ours['density']:.2f} | {ours['ms']:.3f} | — |")
        lines[-1] += (f" {flex['ms']:.3f} | {flex['ms'] / ours['ms']:.2f}× |" if flex else " — | — |")
    return "\n".join(lines)


def render_lightning(rows: Sequence[dict]) -> str:
    rows = [r for r in _ok(rows) if r["sweep"] == "lightning"]
    if not rows:
        return ""
    provs = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("tileattn-lightning"), p))
    by = defaultdict(dict)
    for r in rows:
        by[(r["dtype"], r["mode"], r["N"])][r["provider"]] = r["ms"]
    lines = ["| dtype | mode | N | " + " | ".join(f"{p} ms" for p in provs) + " |",
             "|---|---|---|" + "---|" * len(provs)]
    for (dt, mode, N), ms in sorted(by.items()):
        lines.append(f"| {dt} | {mode} | {_len(N)} | " + " | ".join(f"{ms[p]:.3f}" if p in ms else "—" for p in provs) + " |")
    return "\n".join(lines)


def render_varlen(rows: Sequence[dict]) -> str:
    """tileattn-varlen TFLOP/s per packed row and its ratio to every other provider of the varlen sweep."""
    rows = [r for r in _ok(rows) if r["sweep"] == "varlen"]
    if not rows:
        return ""
    others = sorted({r["provider"] for r in rows} - {"tileattn-varlen"})
    by = defaultdict(dict)
    for r in rows:
        by[(r["dtype"], r["mode"], r["causal"], r["D"], r["N"], r["mask"])][r["provider"]] = r
    lines = ["| dtype | mode | causal | D | N | documents | tileattn-varlen TFLOP/s | "
             + " | ".join(f"vs {p}" for p in others) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(others)]
    for (dt, mode, causal, D, N, mask), provs in sorted(by.items()):
        ours = provs.get("tileattn-varlen")
        if not ours:
            continue
        docs = f"{mask}: {ours['docs']} ≤ {ours['max_doc']}" if ours.get("docs") else mask
        cells = [f"{ours['tflops'] / provs[p]['tflops']:.2f}×" if p in provs else "—" for p in others]
        lines.append(f"| {dt} | {mode} | {'yes' if causal else 'no'} | {D} | {_len(N)} | {docs} | "
                     f"{ours['tflops']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render_decode(rows: Sequence[dict]) -> str:
    """One row per (dtype, D, cache lengths, B, L): the copy bandwidth, then every provider's K/V GB/s and its
    fraction of the copy bandwidth; a last line counts the tileattn-kvcache configs at L >= 8k that reach 0.8."""
    from bench.plots import DECODE_TARGET

    rows = [r for r in _ok(rows) if r["sweep"] == "decode" and r.get("gbps")]
    if not rows:
        return ""
    provs = sorted({r["provider"] for r in rows} - {"copy"}, key=lambda p: (not p.startswith("tileattn"), p))
    by = defaultdict(dict)
    for r in rows:
        by[(r["dtype"], r["D"], r["mask"], r["B"], r["N"])][r["provider"]] = r
    lines = ["| dtype | D | cache lengths | B | L | copy GB/s | " + " | ".join(f"{p} GB/s (of copy)" for p in provs)
             + " |", "|---|---|---|---|---|---|" + "---|" * len(provs)]
    for (dt, D, mask, B, N), ps in sorted(by.items()):
        copy = ps.get("copy")
        cells = []
        for p in provs:
            r = ps.get(p)
            cells.append("—" if r is None else f"{r['gbps']:.0f}" + (f" ({r['bw_frac']:.2f})" if r.get("bw_frac") else ""))
        lines.append(f"| {dt} | {D} | {mask or 'equal'} | {B} | {_len(N)} | {copy['gbps']:.0f} | " if copy else
                     f"| {dt} | {D} | {mask or 'equal'} | {B} | {_len(N)} | — | ")
        lines[-1] += " | ".join(cells) + " |"
    frac, at = DECODE_TARGET
    ours = [r for r in rows if r["provider"] == "tileattn-kvcache" and r["N"] >= at and r.get("bw_frac")]
    if ours:
        hit = sum(r["bw_frac"] >= frac for r in ours)
        lines += ["", f"tileattn-kvcache (paged) at L ≥ {_len(at)}: {hit} of {len(ours)} configs reach {frac:g} of the "
                      f"copy bandwidth (lowest {min(r['bw_frac'] for r in ours):.2f})."]
    return "\n".join(lines)


def render_summary(rows: Sequence[dict], image_dir: Optional[str] = None, detail: bool = False) -> str:
    """Markdown: provenance, FLOP rules, the tables and (with ``image_dir``) the plots."""
    ok = _ok(rows)
    if not ok:
        return "No timed measurements in this results file (timings need a GPU).\n"
    r0 = ok[0]
    cap = f" ({r0['capability']})" if r0.get("capability") else ""
    head = (f"Measured on **{r0.get('device')}**{cap}, torch {r0.get('torch')}, "
            f"triton {r0.get('triton')}, CUDA {r0.get('cuda')}, tileattn {r0.get('tileattn')} "
            f"(commit {r0.get('commit') or '?'}), {min(r['time'] for r in ok)[:10]}. Medians of "
            "`triton.testing.do_bench`. Ratios: tileattn TFLOP/s / other TFLOP/s (> 1: tileattn faster); "
            "geometric mean over lengths (min–max).")
    parts = [head, "", f"- {SOFTMAX_RULE}", f"- {LINEAR_RULE}", f"- {VARLEN_RULE}", f"- {DECODE_RULE}", ""]
    for title, body in (("Softmax attention", render_softmax(rows, detail)),
                        ("Block-sparse (time vs block density)", render_sparse(rows)),
                        ("Lightning (time vs length)", render_lightning(rows)),
                        ("Varlen (packed documents, useful TFLOP/s)", render_varlen(rows)),
                        ("Decode over a KV cache (bandwidth, fraction of a device copy)", render_decode(rows))):
        if body:
            parts += [f"**{title}**", "", body, ""]
    if image_dir is not None:
        d = image_dir.rstrip("/")
        pngs = sorted({os.path.basename(p) for p in _pngs_for(rows)})
        for p in pngs:
            parts.append(f"![{p[:-4]}]({d}/{p})")
    return "\n".join(parts) + "\n"


def _pngs_for(rows):
    names = []
    for r in _ok(rows):
        if r["sweep"] == "softmax":
            names += [f"softmax_tflops_{r['mode']}_{r['dtype']}.png", f"softmax_memory_{r['mode']}_{r['dtype']}.png"]
        elif r["sweep"] == "sparse":
            names.append(f"sparse_time_vs_density_{r['mode']}_{r['dtype']}.png")
        elif r["sweep"] == "lightning":
            names.append(f"lightning_time_vs_length_{r['dtype']}.png")
        elif r["sweep"] == "varlen":
            names.append(f"varlen_tflops_{r['mode']}_{r['dtype']}.png")
        elif r["sweep"] == "decode" and r.get("gbps"):
            from bench.plots import decode_png

            names.append(decode_png(r))
    return names


def main(argv=None) -> int:
    from bench.cli import load_rows

    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json written by python -m bench")
    p.add_argument("--detail", action="store_true", help="one softmax row per sequence length")
    p.add_argument("--images", default=None, help="link the plots from this folder (relative to the README)")
    args = p.parse_args(argv)
    rows, _ = load_rows(args.results)
    sys.stdout.write(render_summary(rows, image_dir=args.images, detail=args.detail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
