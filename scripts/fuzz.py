"""Seeded differential fuzzing of tileattn against float64 references (the cases of tests/fuzzer.py).

    python scripts/fuzz.py --cases 500 [--seed 0] [--stop]   # seeds seed .. seed + cases - 1
    python scripts/fuzz.py --seed 1234 --cases 1             # replay one failing case

Without CUDA the Triton interpreter is switched on (slow: about a second per case). Prints one line per
failure (with its replay command) and a summary; exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fuzzer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100, help="number of cases (seeds seed .. seed + cases - 1)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--stop", action="store_true", help="stop at the first failure")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case and full tracebacks")
    args = ap.parse_args(argv)
    failed, t0 = [], time.time()
    for seed in range(args.seed, args.seed + args.cases):
        try:
            desc = fuzzer.run(seed)
            if args.verbose:
                print(f"ok   seed {seed}: {desc}")
        except AssertionError as e:
            failed.append(seed)
            msg = str(e)
            print(f"FAIL seed {seed}: " + (msg if args.verbose else " | ".join(msg.splitlines()[:3])))
            if args.verbose:
                traceback.print_exc()
            if args.stop:
                break
    n = seed - args.seed + 1
    print(f"{n - len(failed)}/{n} cases passed in {time.time() - t0:.1f} s" + (f"; failing seeds: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
