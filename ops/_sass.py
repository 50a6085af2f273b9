"""Static SASS study of a compiled kernel: its main loops and a per-iteration instruction mix.

A *main loop* is the span of a backward branch (``BRA`` to a lower address) whose body holds tensor-core
instructions (``HGMMA`` = Hopper wgmma, ``HMMA`` = mma.sync); when loops nest, the innermost spans with
MMAs are kept, and of spans that overlap without nesting (a loop with a second back edge) the shortest.
For each loop, per iteration and per warp: MMA count and shapes, ``MUFU.EX2``, FP32 ALU, selects, integer/address work, loads by kind, barriers; whether every wgmma wait in the loop is at depth 0
(no MMA in flight while softmax runs); issued MMA FLOPs per CTA and, given the tile's nominal FLOPs, the
replication factor; and issue-time / MMA-time and MUFU-time / MMA-time under :data:`H100_MODEL`.

Every figure here is a **prediction** from static code, not a measurement: a loop body's instructions are
counted once each (branches inside a loop are counted as if both sides ran), latency, memory stalls and
dual issue are ignored. Used by ``scripts/kernel_report.py --sass`` and the tests.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Optional

# H100 SXM model, per SM per clock. Dense bf16/fp16 wgmma: 989 TFLOP/s = 132 SMs x 1.83 GHz x 4096;
# tf32 at half that; mma.sync assumed at half the wgmma rate (it cannot keep Hopper's tensor cores fed);
# MUFU (ex2, lg2, rcp): 16 lanes; 4 sub-partitions each issue one warp-instruction per clock.
H100_MODEL = {
    "wgmma_flops_per_clk": 4096,
    "wgmma_tf32_flops_per_clk": 2048,
    "mma_sync_flops_per_clk": 2048,
    "mma_sync_tf32_flops_per_clk": 1024,
    "mufu_lanes_per_clk": 16,
    "issue_per_clk": 4,
}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
CATEGORIES = ("mma", "mufu_ex2", "mufu_other", "fp32", "convert", "select", "int", "move", "ldg", "ldgsts",
              "tma", "lds", "sts", "stg", "barrier", "control", "other")


def parse(sass: str) -> List[dict]:
    """Instructions of a ``cuobjdump -sass`` listing: ``{"addr", "op", "args", "pred"}`` in order."""
    out = []
    for m in _LINE.finditer(sass):
        out.append({"addr": int(m.group(1), 16), "pred": (m.group(2) or "").strip(), "op": m.group(3),
                    "args": m.group(4).strip()})
    return out


def category(op: str) -> str:
    """Coarse class of one SASS opcode (with its modifiers, e.g. ``HGMMA.64x128x16.F32.BF16``)."""
    base = op.split(".")[0]
    if base in ("HGMMA", "HMMA", "IMMA", "QGMMA"):
        return "mma"
    if base == "MUFU":
        return "mufu_ex2" if op.startswith("MUFU.EX2") else "mufu_other"
    if base in ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FCHK", "FSWZADD", "HADD2", "HMUL2",
                "HFMA2", "HMNMX2", "HSETP2", "DADD", "DMUL", "DFMA"):
        return "fp32"
    if base in ("F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND"):
        return "convert"
    if base in ("FSEL", "SEL", "USEL"):
        return "select"
    if base in ("MOV", "UMOV", "S2R", "S2UR", "R2UR", "CS2R", "SHFL", "R2P", "P2R", "PLOP3", "UPLOP3",
                "VOTE", "VOTEU", "MOVM", "PRMT", "UPRMT"):
        return "move"
    if base in ("LDG",):
        return "ldg"
    if base == "LDGSTS":
        return "ldgsts"
    if base in ("UTMALDG", "UTMAPF", "UBLKCP", "UTMASTG", "UTMACCTL", "UTMACMDFLUSH", "UTMAREDG"):
        return "tma"
    if base in ("LDS", "LDSM", "LDL", "LD"):
        return "lds"
    if base in ("STS", "STSM", "STL", "ST"):
        return "sts"
    if base in ("STG", "RED", "ATOM", "ATOMG", "REDG"):
        return "stg"
    if base in ("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "ARRIVES", "MEMBAR", "WARPSYNC",
                "FENCE", "UCGABAR_ARV", "UCGABAR_WAIT", "ELECT", "CCTL", "ERRBAR"):
        return "barrier"
    if base in ("BRA", "BRX", "EXIT", "RET", "CALL", "JMP", "BSSY", "BSYNC", "YIELD", "NOP", "WARPGROUP"):
        return "control"
    if base in ("IADD3", "IMAD", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX",
                "IABS", "POPC", "FLO", "BMSK", "SGXT", "BREV", "IDP", "LDC", "ULDC", "VIADD", "VIMNMX",
                "UIADD3", "UIMAD", "ULEA", "USHF", "ULOP3", "UISETP", "UIMNMX", "USGXT", "UFLO", "UPOPC",
                "UBMSK", "UBREV", "USHL", "USHR", "ISCADD", "IMUL", "XMAD", "UMNMX", "UVIADD"):
        return "int"
    return "other"


def _mma_flops(op: str) -> Optional[tuple]:
    """(flops of one instruction for its issuing unit, kind) for HGMMA (per warpgroup) / HMMA (per warp)."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = (int(x) for x in m.groups())
        return 2 * a * b * c, ("wgmma_tf32" if ".TF32" in op else "wgmma")
    m = re.match(r"HMMA\.168(\d+)", op)  # m16 n8 k8 / k16
    if m:
        return 2 * 16 * 8 * int(m.group(1)), ("mma_sync_tf32" if ".TF32" in op else "mma_sync")
    return None


def loops(instrs: List[dict], require_mma: bool = True, overlapping: bool = False) -> List[tuple]:
    """(first, last) instruction index of every innermost loop whose body holds an MMA (any loop with
    ``require_mma=False``), in address order; ``overlapping``: also the longer of spans that overlap without
    nesting (for spill counting: every instruction that may run each iteration)."""
    index = {ins["addr"]: i for i, ins in enumerate(instrs)}
    spans = []
    for i, ins in enumerate(instrs):
        if ins["op"].startswith("BRA"):
            m = re.match(r"(?:`?\(?\.?L_x_\d+\)?|0x([0-9a-f]+))", ins["args"])
            if not m or m.group(1) is None:
                continue
            target = int(m.group(1), 16)
            if target < ins["addr"] and target in index:
                j = index[target]
                if not require_mma or any(category(x["op"]) == "mma" for x in instrs[j:i + 1]):
                    spans.append((j, i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    if overlapping:
        return sorted(set(inner))
    kept = []  # of spans that overlap without nesting (a rotated loop's second back edge), the shortest
    for s in sorted(set(inner), key=lambda s: (s[1] - s[0], s[0])):
        if not any(s[0] <= k[1] and k[0] <= s[1] for k in kept):
            kept.append(s)
    return sorted(kept)


def spills_in_loops(sass: str) -> int:
    """Number of local-memory (spill) loads / stores inside a main loop: the spills that cost every
    iteration (spills outside the loops run once per program or per outer step)."""
    instrs = parse(sass)
    spans = loops(instrs, overlapping=True)
    return sum(1 for i, x in enumerate(instrs) if x["op"].startswith(("STL", "LDL"))
               and any(a <= i <= b for a, b in spans))


def loop_stats(instrs: List[dict], span: tuple, num_warps: int, nominal_flops: Optional[float] = None,
               model: Dict[str, float] = H100_MODEL) -> dict:
    """Per-iteration mix of one loop and the model's ratios (see the module docstring)."""
    body = instrs[span[0]:span[1] + 1]
    cats = Counter(category(x["op"]) for x in body)
    shapes = Counter(x["op"] for x in body if category(x["op"]) == "mma")
    issued = 0.0
    mma_clk = 0.0
    for op, n in shapes.items():
        f = _mma_flops(op)
        if f is None:
            continue
        flops, kind = f
        per_cta = flops * n * (num_warps / 4 if kind.startswith("wgmma") else num_warps)
        issued += per_cta
        mma_clk += per_cta / model[f"{kind}_flops_per_clk"]
    waits = [x["args"] for x in body if x["op"].startswith("WARPGROUP.DEPBAR")]
    depths = [int(m.group(1), 16) for a in waits for m in [re.search(r"0x([0-9a-f]+)", a)] if m]
    n = len(body)
    issue_clk = n * num_warps / model["issue_per_clk"]
    mufu_clk = cats["mufu_ex2"] * 32 * num_warps / model["mufu_lanes_per_clk"]
    return {
        "instructions": n,
        "counts": {c: cats.get(c, 0) for c in CATEGORIES},
        "mma_shapes": dict(shapes),
        "tensor_cores": "wgmma" if any(s.startswith("HGMMA") for s in shapes) else "mma.sync",
        "wgmma_waits": depths,
        "waits_depth0": bool(depths) and all(d == 0 for d in depths),
        "issued_flops": issued,
        "nominal_flops": nominal_flops,
        "replication": (issued / nominal_flops) if nominal_flops else None,
        "issue_over_mma": issue_clk / mma_clk if mma_clk else None,
        "mufu_over_mma": mufu_clk / mma_clk if mma_clk else None,
    }


def analyse(sass: str, num_warps: int, nominal_flops=None) -> List[dict]:
    """Stats of every main loop of one kernel's SASS (address order). ``nominal_flops``: one number for
    every loop, or a list giving loop i its entry (the last entry for any further loop)."""
    instrs = parse(sass)
    if not isinstance(nominal_flops, (list, tuple)):
        nominal_flops = [nominal_flops]
    return [dict(loop_stats(instrs, s, num_warps, nominal_flops[min(i, len(nominal_flops) - 1)]),
                 span=(hex(instrs[s[0]]["addr"]), hex(instrs[s[1]]["addr"])))
            for i, s in enumerate(loops(instrs))]


def format_loops(rows: List[dict]) -> str:
    """Plain-text table: one line per main loop of every row that has ``loops`` (from the SASS report)."""
    head = ["kernel", "loop", "TC", "MMA/shape", "instr", "ex2", "fp32", "cvt", "sel", "int", "mov", "ldg",
            "ldgsts", "tma", "lds", "bar", "repl", "wait0", "issue/MMA", "MUFU/MMA", "regs", "spill", "smemKB"]
    lines = []
    for r in rows:
        for i, lp in enumerate(r.get("loops") or []):
            c = lp["counts"]
            shapes = ",".join(f"{n}x{op.split('.')[1]}" for op, n in lp["mma_shapes"].items())
            lines.append([
                r["name"] if i == 0 else "", f"{i + 1}/{len(r['loops'])}", lp["tensor_cores"], shapes,
                str(lp["instructions"]), str(c["mufu_ex2"]), str(c["fp32"]), str(c["convert"]), str(c["select"]),
                str(c["int"]), str(c["move"]), str(c["ldg"]), str(c["ldgsts"]), str(c["tma"]),
                str(c["lds"]), str(c["barrier"]),
                "-" if lp["replication"] is None else f"{lp['replication']:.2f}",
                "yes" if lp["waits_depth0"] else ("-" if not lp["wgmma_waits"] else "no"),
                "-" if lp["issue_over_mma"] is None else f"{lp['issue_over_mma']:.2f}",
                "-" if lp["mufu_over_mma"] is None else f"{lp['mufu_over_mma']:.2f}",
                str(r.get("regs", "")) if i == 0 else "", str(r.get("stack", "")) if i == 0 else "",
                f"{(r.get('shared') or 0) / 1024:.0f}" if i == 0 else "",
            ])
    if not lines:
        return "(no main loops found)"
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])
