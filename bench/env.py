"""What produced a measurement: device, versions, and a filesystem-safe device slug."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from functools import lru_cache
from typing import Dict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    if on_cuda():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(name: str = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    name = device_name() if name is None else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except Exception:
        return ""


@lru_cache(maxsize=None)
def env_info() -> Dict[str, str]:
    """Fields stamped on every result row."""
    import triton

    try:
        import tileattn

        ta = tileattn.__version__
    except Exception:
        ta = "?"
    info = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "tileattn": ta,
        "commit": _git_commit(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }
    if on_cuda():
        cap = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{cap[0]}{cap[1]}"
    return info


def timestamp() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
