"""Argument checks and small helpers shared by the public ops."""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Sequence, Tuple

import torch

from tileattn.kernels.utils import interpreter_enabled

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a UserWarning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def use_triton(x: torch.Tensor, op: str) -> bool:
    """Whether the Triton kernels can run on ``x``'s device. CPU tensors run the kernels under the
    interpreter when it is on; otherwise the op takes its PyTorch path and says so once."""
    if x.is_cuda or interpreter_enabled():
        return True
    warn_once(
        f"cpu-fallback-{op}",
        f"tileattn.{op}: CPU tensors without TRITON_INTERPRET=1 run a slow PyTorch reference path "
        "(set TRITON_INTERPRET=1 before importing tileattn to run the Triton kernels on CPU).",
    )
    return False


def check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a unit stride in its last dimension (got strides {tuple(x.stride())}); "
            "call .contiguous() on it"
        )


def check_same(tensors: Sequence[Tuple[str, torch.Tensor]]) -> None:
    n0, t0 = tensors[0]
    for n, t in tensors[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has {t0.dtype}; they must match")
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; they must be on one device")


def check_bool(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def dispatching_subclass(t) -> bool:
    """Whether ``t`` is a tensor subclass with its own ``__torch_function__`` (e.g. torch's ``CausalBias``,
    whose storage is not the mask it stands for): its values must not be read as a dense tensor.
    ``nn.Parameter`` and subclasses that disable torch-function dispatch are plain tensors."""
    if not isinstance(t, torch.Tensor) or type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter):
        return False
    fn = type(t).__torch_function__
    return getattr(fn, "__func__", fn) not in (torch.Tensor.__torch_function__.__func__,
                                               torch._C._disabled_torch_function_impl)


def check_scale(scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise TypeError("scale must be a Python float (or a one-element tensor)")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _int_or_0d(x):
    """A 0-d integer tensor (FlashAttention's tests pass window sizes so) as a Python int; else ``x``."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        return int(x.item())
    return x


def check_window(window, causal: bool) -> Tuple[int, int]:
    """Normalise ``window`` to ``(left, right)`` ints (-1 = unbounded); causal forces right = 0."""
    check_bool("causal", causal)
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise TypeError(f"window must be a (left, right) tuple of ints or None, got {window!r}")
        left, right = (_int_or_0d(x) for x in window)
        if isinstance(left, bool) or isinstance(right, bool) or not all(isinstance(x, int) for x in (left, right)):
            raise TypeError(f"window must hold ints (or 0-d integer tensors), got {window!r}")
        if left < -1 or right < -1:
            raise ValueError(f"window sizes must be >= 0 or -1 (unbounded), got {window!r}")
    if causal:
        right = 0
    return int(left), int(right)


def check_attention_inputs(q, k, v) -> None:
    """Validate (B, Hq, Nq, D) / (B, Hkv, Nk, D) / (B, Hkv, Nk, Dv) inputs; raise with what was expected."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    check_same([("q", q), ("k", k), ("v", v)])
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims must match, got {D} and {k.shape[3]}")
    if D > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={v.shape[3]}")


class TensorCache:
    """A small cache keyed by a tensor's *identity* and version counter (plus ``extra``), never by its
    address alone: a freed tensor's memory can be reused by a new tensor with other contents. Entries die
    with their tensor (weak reference); in-place writes bump the version and miss. Writes that bypass the
    version counter (``t.data[...] = ...``, memory shared with numpy or DLPack) are NOT seen: every user of
    this cache documents what a stale hit means (SDPA: a stale BlockMask; lightning: see ``_check_decay``)."""

    def __init__(self, size: int = 8):
        self._size = size
        self._d: dict = {}

    @staticmethod
    def _root(t: torch.Tensor) -> torch.Tensor:
        return t._base if t._base is not None else t

    @staticmethod
    def _view(t: torch.Tensor, extra):
        return (tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, extra)

    def get(self, t: torch.Tensor, extra=()):
        """The cached value for this tensor (same root tensor, version and view geometry), else None."""
        root = self._root(t)
        e = self._d.get(id(root))
        if e is not None and e[0]() is root and e[1] == root._version and e[2] == self._view(t, extra):
            return e[3]
        return None

    def put(self, t: torch.Tensor, value, extra=()) -> None:
        root = self._root(t)
        if len(self._d) >= self._size:
            self._d.pop(next(iter(self._d)))
        self._d[id(root)] = (weakref.ref(root), root._version, self._view(t, extra), value)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity whose backward raises: marks first-order gradients built with ``create_graph=True``."""

    @staticmethod
    def forward(ctx, name, *xs):
        ctx.name = name
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"tileattn.{ctx.name}: double backward (differentiating its gradients, e.g. create_graph=True then "
            "backward again) is not supported; the backward kernels have no derivative")


def no_double_backward(name: str, *grads):
    """``grads`` unchanged; when the backward itself is being recorded (``create_graph=True``), wrapped so
    that differentiating them raises a clear NotImplementedError (first-order use still works)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    out = list(grads)
    for i, g in zip(live, _NoDoubleBackward.apply(name, *(grads[i] for i in live))):
        out[i] = g
    return tuple(out)


def check_cu_seqlens(name: str, cu, total: int, device: torch.device, *, validate: bool = True,
                     nseq: Optional[int] = None) -> Optional[int]:
    """Validate cumulative sequence lengths (FlashAttention varlen convention): an int32 1-d tensor of
    ``nseq + 1`` entries on ``device``, starting at 0, non-decreasing, last entry ``total``; sequence ``b``
    is rows ``cu[b]:cu[b+1]``. Shape / dtype / device checks are free. With ``validate`` the values are
    checked too, which costs one device-to-host copy (a sync on CUDA); the longest length is returned then
    (else None)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's varlen convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-d with nseq + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if nseq is not None and cu.numel() != nseq + 1:
        raise ValueError(f"{name} has {cu.numel() - 1} sequences, expected {nseq} (nseq + 1 = {nseq + 1} entries)")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    if cu.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (the kernels read it with unit stride), got stride "
                         f"{cu.stride(0)}; call .contiguous() on it")
    if not validate:
        return None
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if min(lens) < 0:
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, got {vals[i]} then {vals[i + 1]} at entry {i}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of packed rows ({total})")
    return max(lens)
