"""Triton kernels and thin launchers (``tileattn.kernels``).

Only ``@triton.jit`` code and launchers live here; argument checking, autograd and public APIs live in
``tileattn`` (the ``ops/`` folder).
"""
from .utils import interpreter_enabled, row_dot

__all__ = ["interpreter_enabled", "row_dot"]
