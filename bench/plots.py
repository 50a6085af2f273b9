"""PNG plots of the result rows (matplotlib, Agg backend). Every plot states its device, versions and FLOP
rule; only rows with status 'ok' are drawn."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.measure import DECODE_RULE, LINEAR_RULE, SOFTMAX_RULE, VARLEN_RULE  # noqa: E402

_STYLE: Dict[str, dict] = {}
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def style(provider: str) -> dict:
    """A stable colour per provider name (tileattn lines drawn thicker)."""
    if provider not in _STYLE:
        _STYLE[provider] = {"color": _COLORS[len(_STYLE) % len(_COLORS)]}
    s = dict(_STYLE[provider])
    if provider.startswith("tileattn"):
        s["linewidth"] = 2.5
    if "(dense)" in provider or "(causal softmax)" in provider:
        s["linestyle"] = "--"
    return s


def _footer(fig, rows: Sequence[dict], rule: str) -> None:
    r = rows[0]
    txt = f"{r.get('device')} | torch {r.get('torch')} | triton {r.get('triton')} | {rule}"
    fig.text(0.5, 0.005, txt, ha="center", va="bottom", fontsize=7, wrap=True)


def _len_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("ms") is not None]


def _panels(keys):
    n = len(keys)
    cols = min(2, n)
    rws = (n + cols - 1) // cols
    return rws, cols


def plot_softmax(rows: Sequence[dict], out: str) -> List[str]:
    """Per (dtype, mode): panels per (causal, D) of TFLOP/s vs sequence length, and the same for peak
    memory vs length. One line per provider."""
    rows = [r for r in _ok(rows) if r["sweep"] == "softmax"]
    files = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["mode"])].append(r)
    for (dtype, mode), grp in sorted(groups.items()):
        panels = sorted({(r["causal"], r["D"]) for r in grp})
        for metric, ylabel, fname in (("tflops", "TFLOP/s", "softmax_tflops"),
                                      ("peak_mem_mb", "peak memory (MiB)", "softmax_memory")):
            if metric == "peak_mem_mb" and not any((r.get(metric) or 0) > 0 for r in grp):
                continue
            nr, nc = _panels(panels)
            fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 4.2 * nr), squeeze=False)
            for ax, (causal, D) in zip(axes.flat, panels):
                sub = [r for r in grp if r["causal"] == causal and r["D"] == D]
                by_p = defaultdict(list)
                for r in sub:
                    by_p[r["provider"]].append(r)
                for prov, pts in sorted(by_p.items()):
                    pts.sort(key=lambda r: r["N"])
                    ax.plot([r["N"] for r in pts], [r[metric] for r in pts], marker="o", label=prov, **style(prov))
                ax.set_xscale("log", base=2)
                if metric == "peak_mem_mb":
                    ax.set_yscale("log")
                ns = sorted({r["N"] for r in sub})
                ax.set_xticks(ns)
                ax.set_xticklabels([_len_label(n) for n in ns])
                hd = sub[0]
                bs = {r["B"] for r in sub}
                bl = "B=16k/N" if all(r["B"] == max(1, 16384 // r["N"]) for r in sub) and len(bs) > 1 else \
                    "B=" + "/".join(str(b) for b in sorted(bs))
                ax.set_title(f"{mode} {'causal' if causal else 'non-causal'} D={D} {dtype} "
                             f"(H={hd['H']}, {bl})", fontsize=10)
                ax.set_xlabel("sequence length N")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            for ax in list(axes.flat)[len(panels):]:
                ax.axis("off")
            _footer(fig, grp, SOFTMAX_RULE if metric == "tflops" else "peak = torch.cuda.max_memory_allocated, one call")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            path = os.path.join(out, f"{fname}_{mode}_{dtype}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def plot_sparse(rows: Sequence[dict], out: str) -> List[str]:
    """Per (dtype, mode): panels per N of time vs block density; dense baselines as horizontal lines."""
    rows = [r for r in _ok(rows) if r["sweep"] == "sparse"]
    files = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["mode"])].append(r)
    for (dtype, mode), grp in sorted(groups.items()):
        ns = sorted({r["N"] for r in grp})
        nr, nc = _panels(ns)
        fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 4.2 * nr), squeeze=False)
        for ax, N in zip(axes.flat, ns):
            sub = [r for r in grp if r["N"] == N]
            by_p = defaultdict(list)
            for r in sub:
                by_p[r["provider"]].append(r)
            for prov, pts in sorted(by_p.items()):
                st = style(prov)
                if r_dense := [r for r in pts if r["op"] == "softmax"]:
                    ax.axhline(r_dense[0]["ms"], label=prov, **st)
                    continue
                for kind, marker in (("random", "o"), ("window", "^")):
                    kp = sorted([r for r in pts if r["mask"].startswith(kind) and r.get("density") is not None],
                                key=lambda r: r["density"])
                    if kp:
                        ax.plot([r["density"] for r in kp], [r["ms"] for r in kp], marker=marker,
                                label=f"{prov} ({kind})", **{**st, "linestyle": "-" if kind == "random" else ":"})
            hd = sub[0]
            ax.set_title(f"block-sparse {mode} N={_len_label(N)} D={hd['D']} H={hd['H']} B={hd['B']} {dtype}",
                         fontsize=10)
            ax.set_xlabel("block density (visited blocks / all blocks, 128×128)")
            ax.set_ylabel("time (ms, median)")
            ax.set_xlim(0, 1.05)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(ns):]:
            ax.axis("off")
        _footer(fig, grp, SOFTMAX_RULE)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out, f"sparse_time_vs_density_{mode}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_lightning(rows: Sequence[dict], out: str) -> List[str]:
    """Per dtype: panels per mode of time vs length (log-log), linear attention vs causal softmax."""
    rows = [r for r in _ok(rows) if r["sweep"] == "lightning"]
    files = []
    groups = defaultdict(list)
    for r in rows:  # one figure per dtype and B x H shape
        groups[(r["dtype"], r["B"], r["H"])].append(r)
    for (dtype, B, H), grp in sorted(groups.items()):
        modes = [m for m in ("fwd", "bwd", "fwdbwd") if any(r["mode"] == m for r in grp)]
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.4), squeeze=False)
        for ax, mode in zip(axes.flat, modes):
            sub = [r for r in grp if r["mode"] == mode]
            by_p = defaultdict(list)
            for r in sub:
                by_p[r["provider"]].append(r)
            for prov, pts in sorted(by_p.items()):
                pts.sort(key=lambda r: r["N"])
                ax.plot([r["N"] for r in pts], [r["ms"] for r in pts], marker="o", label=prov, **style(prov))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ns = sorted({r["N"] for r in sub})
            ax.set_xticks(ns)
            ax.set_xticklabels([_len_label(n) for n in ns], fontsize=8)
            hd = sub[0]
            ax.set_title(f"lightning {mode}: B={hd['B']} H={hd['H']} D={hd['D']} {dtype}", fontsize=10)
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("time (ms, median)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        _footer(fig, grp, LINEAR_RULE + "; softmax baselines: " + SOFTMAX_RULE)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        shape = "" if (B, H) == (1, 16) else f"_b{B}h{H}"  # the historical name for the 1 x 16 sweep
        path = os.path.join(out, f"lightning_time_vs_length_{dtype}{shape}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_varlen(rows: Sequence[dict], out: str) -> List[str]:
    """Per (dtype, mode): panels per (causal, D) of TFLOP/s (useful FLOPs) per provider, grouped bars per
    packed row (N and document recipe)."""
    rows = [r for r in _ok(rows) if r["sweep"] == "varlen"]
    files = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["mode"])].append(r)
    for (dtype, mode), grp in sorted(groups.items()):
        panels = sorted({(r["causal"], r["D"]) for r in grp})
        nr, nc = _panels(panels)
        fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 4.4 * nr), squeeze=False)
        for ax, (causal, D) in zip(axes.flat, panels):
            sub = [r for r in grp if r["causal"] == causal and r["D"] == D]
            xs = sorted({(r["N"], r["mask"]) for r in sub})
            provs = sorted({r["provider"] for r in sub}, key=lambda p: (not p.startswith("tileattn-varlen"), p))
            w = 0.8 / len(provs)
            for j, prov in enumerate(provs):
                by_x = {(r["N"], r["mask"]): r["tflops"] for r in sub if r["provider"] == prov}
                pos = [i + (j - (len(provs) - 1) / 2) * w for i, x in enumerate(xs) if x in by_x]
                vals = [by_x[x] for x in xs if x in by_x]
                bars = ax.bar(pos, vals, width=w, label=prov, color=style(prov)["color"])
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
            labels = []
            for N, mask in xs:
                r = next(r for r in sub if (r["N"], r["mask"]) == (N, mask))
                docs = f"\n{r['docs']} docs ≤ {r['max_doc']}" if r.get("docs") else ""
                labels.append(f"N={_len_label(N)} {mask}{docs}")
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_title(f"varlen {mode} {'causal' if causal else 'non-causal'} D={D} H={sub[0]['H']} {dtype}: "
                         "packed vs padded vs document mask", fontsize=9)
            ax.set_ylabel("TFLOP/s (useful FLOPs)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        _footer(fig, grp, VARLEN_RULE)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = os.path.join(out, f"varlen_tflops_{mode}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


DECODE_TARGET = (0.8, 8192)  # issue #17: >= 0.8 of the copy bandwidth at cache lengths >= 8k


def decode_png(r: dict) -> str:
    """File name of the decode plot a row belongs to: one per (dtype, D, cache-length recipe)."""
    d = f"_d{r['D']}" if r["D"] != 128 else ""
    m = "_" + r["mask"].replace(":", "") if r.get("mask") else ""
    return f"decode_bandwidth_{r['dtype']}{d}{m}.png"


def plot_decode(rows: Sequence[dict], out: str) -> List[str]:
    """Per (dtype, D, cache lengths): one column per batch size B; top, K/V bandwidth as a fraction of the copy
    bandwidth vs cache length (the target 0.8 at L >= 8k dashed); bottom, GB/s, with the copy's."""
    rows = [r for r in _ok(rows) if r["sweep"] == "decode" and r.get("gbps")]
    files = []
    groups = defaultdict(list)
    for r in rows:
        groups[decode_png(r)].append(r)
    for fname, grp in sorted(groups.items()):
        bs = sorted({r["B"] for r in grp})
        fig, axes = plt.subplots(2, len(bs), figsize=(5.2 * len(bs), 8), squeeze=False)
        for j, B in enumerate(bs):
            sub = [r for r in grp if r["B"] == B]
            ns = sorted({r["N"] for r in sub})
            by_p = defaultdict(list)
            for r in sub:
                by_p[r["provider"]].append(r)
            for ax, metric in zip(axes[:, j], ("bw_frac", "gbps")):
                for prov, pts in sorted(by_p.items()):
                    pts = sorted([r for r in pts if r.get(metric) is not None], key=lambda r: r["N"])
                    if not pts or (metric == "bw_frac" and prov == "copy"):
                        continue
                    st = style(prov)
                    if prov == "copy":
                        st.update(color="black", linestyle=":")
                    elif prov.endswith("-contig"):
                        st["linestyle"] = "--"
                    ax.plot([r["N"] for r in pts], [r[metric] for r in pts], marker="o", label=prov, **st)
                ax.set_xscale("log", base=2)
                ax.set_xticks(ns)
                ax.set_xticklabels([_len_label(n) for n in ns], fontsize=8)
                ax.set_xlabel("cache length L (keys per sequence)")
                ax.grid(alpha=0.3)
                if metric == "bw_frac":
                    frac, at = DECODE_TARGET
                    ax.axhline(frac, color="red", linestyle="--", linewidth=1,
                               label=f"target {frac:g} at L ≥ {_len_label(at)}")
                    if max(ns) > at:
                        ax.axvspan(at, max(ns), color="red", alpha=0.04)
                    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
                    ax.set_ylim(0, max(1.1, max((r["bw_frac"] for r in sub if r.get("bw_frac")), default=0) * 1.05))
                    ax.set_ylabel("K/V bandwidth / copy bandwidth")
                    r0 = sub[0]
                    lens = "equal lengths" if not r0["mask"] else r0["mask"]
                    ax.set_title(f"decode B={B} Hq={r0['H']} Hkv={r0.get('Hkv') or r0['H']} D={r0['D']} Nq=1 "
                                 f"{r0['dtype']}, {lens}", fontsize=9)
                else:
                    ax.set_yscale("log")
                    ax.set_ylabel("GB/s (K/V bytes read / time; copy: read + written)")
                ax.legend(fontsize=7)
        _footer(fig, grp, DECODE_RULE)
        fig.tight_layout(rect=(0, 0.09 if len(bs) == 1 else 0.05, 1, 1))
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_all(rows: Sequence[dict], out: str) -> List[str]:
    os.makedirs(out, exist_ok=True)
    return (plot_softmax(rows, out) + plot_sparse(rows, out) + plot_lightning(rows, out) + plot_varlen(rows, out)
            + plot_decode(rows, out))


def plot_bars(labels: Sequence[str], series: Dict[str, Sequence[float]], title: str, xlabel: str, path: str,
              limits: Dict[str, float] = None, footer: str = "") -> str:
    """Horizontal grouped bar chart (used for the resource report and the correctness sweep)."""
    n = len(labels)
    k = max(1, len(series))
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.28 * n * k + 1.2)))
    h = 0.8 / k
    for j, (name, vals) in enumerate(series.items()):
        ax.barh([i + j * h for i in range(n)], vals, height=h, label=name, color=_COLORS[j % len(_COLORS)])
    for name, x in (limits or {}).items():
        ax.axvline(x, color="red", linestyle="--", linewidth=1)
        ax.text(x, -0.6, name, color="red", fontsize=7, ha="right", va="top")
    ax.set_yticks([i + h * (k - 1) / 2 for i in range(n)])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    if k > 1:
        ax.legend(fontsize=8)
    if footer:
        fig.text(0.5, 0.005, footer, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
