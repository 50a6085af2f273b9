#!/usr/bin/env python
"""Kernel resource report: AOT-compile every shipped kernel config for sm_80 / sm_90 (no GPU needed).

Discovers every ``tileattn.kernels`` module with ``aot_specs()``, compiles each spec for each arch in
``spec.archs``, and prints registers, spill/stack bytes (cuobjdump), shared memory (kernel metadata) and
tensor-core use (mma / wgmma in the PTX). Exits 1 if a config spills, exceeds the arch's shared memory
(sm_80: 163 KB, sm_90: 227 KB) or fails to compile.

    python scripts/kernel_report.py [--filter SUBSTR] [--quick] [--json PATH|-] [--jobs N]
    python scripts/kernel_report.py --sass [--arch 90] [--filter SUBSTR]   # static main-loop study

``--sass`` also disassembles each kernel and prints, per main loop and per iteration, the instruction mix
and the issue-time / MMA-time ratios of a simple H100 model (``tileattn._sass``): predictions, not timings.
"""
from __future__ import annotations

import os
import sys

# AOT compilation needs real JITFunctions: the interpreter must be off before tileattn is imported.
_INTERP = os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--filter", action="append", default=None,
                   help="keep configs whose 'module.config' contains this substring; repeatable (any matches)")
    p.add_argument("--module", action="append", default=None,
                   help="only this kernels module (short name, e.g. 'utils'); repeatable")
    p.add_argument("--quick", action="store_true", help="first config of each module only")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows as JSON to PATH ('-' = stdout instead of the table)")
    p.add_argument("--jobs", "-j", type=int, default=None, help="compile processes (default: CPUs, max 8)")
    p.add_argument("--sass", action="store_true",
                   help="static SASS study of every main loop (per-iteration mix, replication, model ratios)")
    p.add_argument("--arch", type=int, action="append", default=None,
                   help="only this arch (e.g. 90); repeatable. Default with --sass: 90")
    args = p.parse_args(argv)
    if args.sass and not args.arch:
        args.arch = [90]

    from tileattn import _aot

    if _INTERP not in (None, "", "0"):
        print("note: TRITON_INTERPRET was set; ignored here (AOT compilation needs the real compiler).",
              file=sys.stderr)
    modules = None
    if args.module:
        found, errors = _aot.discover_modules()
        modules = [m for m in found if m.rsplit(".", 1)[-1] in args.module]
        unknown = set(args.module) - {m.rsplit(".", 1)[-1] for m in modules}
        if unknown:
            print(f"error: no kernels module with aot_specs() named {sorted(unknown)} "
                  f"(found {[m.rsplit('.', 1)[-1] for m in found]}; import errors: {errors})", file=sys.stderr)
            return 2
    to_stdout = args.json == "-"
    live = sys.stderr.isatty() and not to_stdout

    def progress(done, total, row):
        if live:
            print(f"\r[{done}/{total}] {row.get('module')}.{row.get('name')} {row.get('arch')}".ljust(79),
                  end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rows = _aot.run_report(args.filter, jobs=args.jobs, first_per_module=args.quick, modules=modules,
                           progress=progress, sass=args.sass, archs=args.arch)
    if live:
        print("\r" + " " * 79 + "\r", end="", file=sys.stderr)
    fails = _aot.failures(rows)
    if args.json:
        doc = {"rows": rows, "failures": fails, "seconds": round(time.perf_counter() - t0, 1)}
        try:
            import triton

            doc["triton"] = triton.__version__
        except Exception:
            pass
        if to_stdout:
            json.dump(doc, sys.stdout, indent=1, default=str)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1, default=str)
    if not to_stdout:
        if not rows:
            print("no kernel configs found (no tileattn.kernels module defines aot_specs(), or the filter "
                  "matched nothing)")
        else:
            print(_aot.format_table(rows))
            if args.sass:
                from tileattn._sass import H100_MODEL, format_loops

                print("\nMain loops, per iteration (instruction counts per warp; PREDICTIONS from static SASS):")
                print(format_loops(rows))
                print("repl = issued MMA FLOPs / the tile's nominal FLOPs; wait0 = every wgmma waited at depth 0; "
                      "issue/MMA = (instructions x warps / issue rate) / (MMA FLOPs / tensor rate); "
                      f"model per SM per clock: {H100_MODEL}")
            print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.1f} s. regs = registers per thread, "
                  "spill/stack = cuobjdump STACK (+LOCAL) bytes, smem = Triton dynamic shared memory, "
                  "TC = tensor-core instructions in the PTX.")
        for f in fails:
            print("FAIL " + f)
        if not fails and rows:
            print("all configs compile with zero spills and within shared memory.")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
