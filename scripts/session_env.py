#!/usr/bin/env python
"""What ``scripts/gpu_session.sh`` runs in Python: print the environment, and (``--check``) one tiny kernel call.

    python scripts/session_env.py [--check] [--out FILE]

Prints device, NVIDIA driver, torch, Triton, CUDA and Python versions (also to ``--out``). ``--check``
instead imports tileattn and runs the fused attention forward + backward once at a tiny size (B=1, H=2,
N=129, D=32, fp16, causal) through the benchmark's correctness gate (float64 reference, the tests'
tolerance rule), plus one lightning-attention call; it fails unless both pass and launched Triton kernels.
Without CUDA it switches the Triton interpreter on first (TRITON_INTERPRET=1, before Triton is imported),
so the check runs on a CPU machine too.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none (no nvidia-smi)"
    res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"nvidia-smi failed: {(res.stderr or res.stdout).strip()[:200]}"
    return "; ".join(line.strip() for line in res.stdout.splitlines() if line.strip())


def env_lines() -> list:
    import torch
    import triton

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu (no CUDA device: Triton interpreter)"
    if cuda:
        cap = torch.cuda.get_device_capability()
        device += f" (sm_{cap[0]}{cap[1]})"
    return [
        f"device: {device}",
        f"driver: {_driver()}",
        f"torch: {torch.__version__}",
        f"triton: {triton.__version__}",
        f"cuda: {torch.version.cuda or 'none (CPU build)'}",
        f"python: {platform.python_version()} ({sys.executable})",
    ]


def check() -> list:
    """The tiny kernel calls; returns report lines, the last one "check: passed" or "check: FAILED"."""
    import torch

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import tileattn
    from bench import measure as M
    from bench.providers import TileattnLightning, TileattnSoftmax

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"tileattn {tileattn.__version__} from {os.path.dirname(tileattn.__file__)}"]
    failed = False
    for provider, case in ((TileattnSoftmax(), M.Case("softmax", 1, 2, 129, 32, "fp16", True, "fwdbwd")),
                           (TileattnLightning(), M.Case("lightning", 1, 2, 129, 32, "fp16", True, "fwdbwd"))):
        g = M.gate(provider, case, device, small=case)
        ok = g.ok and bool(g.kernels)
        failed |= not ok
        why = "" if g.kernels else " NO TRITON KERNEL LAUNCHED"
        lines.append(f"check {case.op} fwd+bwd N={case.N} D={case.D} {case.dtype} on {device}: "
                     f"{'ok' if ok else 'FAIL'}{why} ({g.detail}; kernels: {', '.join(g.kernels) or '-'})")
    lines.append("check: " + ("FAILED" if failed else "passed"))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="instead of the versions: import tileattn and run one tiny kernel call")
    p.add_argument("--out", default=None, help="also append the lines to this file")
    args = p.parse_args(argv)
    import torch

    if args.check and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton / tileattn are imported
    lines = check() if args.check else env_lines()
    for line in lines:
        print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if args.check and lines[-1] != "check: passed" else 0


if __name__ == "__main__":
    sys.exit(main())
