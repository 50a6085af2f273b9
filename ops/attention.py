"""Fused softmax attention: public function, argument checks and the autograd Function."""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from tileattn._utils import (check_attention_inputs, check_bool, check_cu_seqlens, check_same, check_scale,
                             check_tensor, check_window, no_double_backward, use_triton)
from tileattn.kernels.attention import MAX_MOD_TENSORS, attention_backward, attention_forward, dropout_keep_mask
from tileattn.reference import attention_ref, attention_varlen_ref

__all__ = ["attention", "attention_varlen", "ScoreMod", "dropout_mask"]


def _is_triton_fn(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(fn, (JITFunction, InterpretedFunction))


class ScoreMod:
    """A user score modification evaluated inside the fused kernels (FlexAttention's ``score_mod``
    contract, on tiles; no ``torch.compile`` needed).

    ``fn(s, b, h, q_idx, kv_idx, *tensors) -> s'`` and ``grad_fn(s, b, h, q_idx, kv_idx, *tensors) ->
    ds'/ds`` are ``@triton.jit`` functions. ``s`` is an fp32 tile of scaled scores (``scale * q.k``, natural
    log domain) before any mask; ``b`` / ``h`` are the batch and query-head indices (scalars); ``q_idx``
    / ``kv_idx`` are int32 index tiles that broadcast against ``s`` (``[BM, 1]`` / ``[1, BN]``, or the
    transposed ``[1, BM]`` / ``[BN, 1]`` in the dK/dV kernel: write elementwise code). Boundary tiles carry
    indices past the sequence ends (those scores are masked afterwards): clamp any index you load with.
    ``tensors`` (at most 2) are read-only tensors on the inputs' device, passed to the functions as
    pointers to their first element of a contiguous copy (row-major indexing). The kernels are
    specialised per (fn, grad_fn) pair as a constexpr. ``grad_fn`` may be None for inference only (the
    backward then raises). Returning -inf from ``fn`` masks a score (its gradient is 0)."""

    def __init__(self, fn, grad_fn=None, *tensors: torch.Tensor):
        if not _is_triton_fn(fn):
            raise TypeError(f"ScoreMod fn must be a @triton.jit function, got {type(fn).__name__}")
        if grad_fn is not None and not _is_triton_fn(grad_fn):
            raise TypeError(f"ScoreMod grad_fn must be a @triton.jit function or None, got {type(grad_fn).__name__}")
        if len(tensors) > MAX_MOD_TENSORS:
            raise ValueError(f"ScoreMod takes at most {MAX_MOD_TENSORS} extra tensors, got {len(tensors)}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"ScoreMod tensor {i} must be a torch.Tensor, got {type(t).__name__}")
            if t.numel() == 0:
                raise ValueError(f"ScoreMod tensor {i} must not be empty")
        for name, f in (("fn", fn), ("grad_fn", grad_fn)):
            if f is None:
                continue
            n = len(inspect.signature(f.fn).parameters)
            if n != 5 + len(tensors):
                raise ValueError(f"ScoreMod {name} takes {n} arguments; expected 5 + {len(tensors)} "
                                 "(s, b, h, q_idx, kv_idx, *tensors)")
        self.fn, self.grad_fn, self.tensors = fn, grad_fn, tuple(t.detach() for t in tensors)
        self._id = _register_mod(fn, grad_fn)  # at construction: torch.compile never sees the registry change

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", None) or self.fn.fn.__name__
        return f"ScoreMod({name}, {len(self.tensors)} tensors)"


# The custom ops take a ScoreMod as an int id (functions cannot pass through a torch.library schema): each
# distinct (fn, grad_fn) pair gets one id for the life of the process (a few entries; never freed).
_MOD_IDS: Dict[tuple, int] = {}
_MODS: List[tuple] = []


def _register_mod(fn, grad_fn) -> int:
    key = (fn, grad_fn)
    if key not in _MOD_IDS:
        _MOD_IDS[key] = len(_MODS)
        _MODS.append(key)
    return _MOD_IDS[key]


def _mod_id(score_mod: Optional[ScoreMod]) -> int:
    return -1 if score_mod is None else score_mod._id


def _mod_from_id(mod_id: int, tensors: List[torch.Tensor]):
    if mod_id < 0:
        return None
    fn, grad = _MODS[mod_id]
    return fn, grad, tuple(tensors)


def _check_mods(q, k, softcap, alibi_slopes, score_mod, dropout_p, generator):
    """Validate the score-mod / dropout arguments; returns (softcap, slopes, mod tensors, dropout_p)."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float > 0 or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite float > 0, got {softcap}")
        softcap = float(softcap)
    B, Hq = q.shape[:2]
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes must have shape (Hq,) = {(Hq,)} or (B, Hq) = {(B, Hq)}, "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        alibi_slopes = alibi_slopes.detach()
    tensors: List[torch.Tensor] = []
    if score_mod is not None:
        if not isinstance(score_mod, ScoreMod):
            raise TypeError(f"score_mod must be a tileattn.ScoreMod, got {type(score_mod).__name__}")
        for i, t in enumerate(score_mod.tensors):
            if t.device != q.device:
                raise ValueError(f"ScoreMod tensor {i} is on {t.device} but q is on {q.device}")
        tensors = [t.contiguous() for t in score_mod.tensors]
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1], got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return softcap, alibi_slopes, tensors, float(dropout_p)


def _philox_seed_offset(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """The (seed, offset) int64 pair of one dropout call, drawn from ``generator`` (default: torch's default
    generator of ``device``) so it advances like torch's RNG and ``torch.manual_seed`` reproduces it:
    ``torch.randint(0, 2**62, (2,), generator=generator)`` (the offset uses its low 32 bits). Stays on the
    device (no host sync)."""
    gen_device = generator.device if generator is not None else device
    rng = torch.randint(0, 2 ** 62, (2,), generator=generator, device=gen_device, dtype=torch.int64)
    return rng.to(device)


def dropout_mask(q: torch.Tensor, k: torch.Tensor, *, dropout_p: float, seed: int, offset: int,
                 causal: bool = False, window: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The exact dropout keep-mask the kernels use, for tests and debugging.

    Args:
        q: (B, Hq, Nq, D) and k: (B, Hkv, Nk, D): only shapes and device are read.
        dropout_p: drop probability in [0, 1].
        seed, offset: the Philox key and counter offset. An attention call with dropout draws them as
            ``seed, offset = torch.randint(0, 2**62, (2,), generator=generator).tolist()`` (on the
            generator's device; default generator: q's device), so replaying that draw from the same
            generator state gives the mask of the call. Only the low 32 bits of ``offset`` are used.
        causal, window: as :func:`attention`; positions they hide are False.

    Returns:
        bool (B, Hq, Nq, Nk): True where the probability was kept (and scaled by 1 / (1 - dropout_p)).
    """
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(f"{name} must be a 4-d torch.Tensor (B, H, N, D)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
    _check_mods(q, k, None, None, None, dropout_p, None)
    for name, x in (("seed", seed), ("offset", offset)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        if not 0 <= x < 2 ** 63:
            raise ValueError(f"{name} must be in [0, 2**63), got {x}")
    left, right = check_window(window, causal)
    B, Hq, Nq, _ = q.shape
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=q.device)
    if not use_triton(q, "dropout_mask"):
        raise ValueError("dropout_mask runs a Triton kernel: pass CUDA tensors or set TRITON_INTERPRET=1")
    return dropout_keep_mask(rng, B, Hq, Nq, k.shape[2], dropout_p=float(dropout_p), left=left, right=right)


def _check_bias(bias: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """``bias``: bool (True = attend) or float (added to the scaled scores), broadcastable to
    (B, Hq, Nq, Nk). Returned as a 4-d view (no copy)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"attention mask must be a torch.Tensor, got {type(bias).__name__}")
    if bias.device != q.device:
        raise ValueError(f"attention mask is on {bias.device} but q is on {q.device}")
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    if bias.dim() > 4:
        raise ValueError(f"attention mask must have at most 4 dims, got shape {tuple(bias.shape)}")
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    try:
        torch.broadcast_shapes(bias.shape, (B, Hq, Nq, Nk))
        bias = bias.expand(B, Hq, Nq, Nk)
    except RuntimeError:
        raise ValueError(
            f"attention mask of shape {tuple(bias.shape)} does not broadcast to (B, Hq, Nq, Nk) = {(B, Hq, Nq, Nk)}"
        ) from None
    if bias.dtype != torch.bool and not bias.is_floating_point():
        raise TypeError(f"attention mask must be bool or floating point, got {bias.dtype}")
    return bias


def _reference_path(q, k, v, window, block_mask, bias, scale, softcap=None, alibi=None, dropout_p=0.0,
                    generator=None):
    """Differentiable float64 PyTorch path (CPU tensors without the Triton interpreter). Dropout draws its
    keep mask with ``torch.rand`` from ``generator`` (not the kernels' Philox stream)."""
    mask = None if block_mask is None else block_mask.to_dense().to(q.device)
    if bias is not None and bias.dtype == torch.bool:
        mask, bias = (bias if mask is None else mask & bias), None
    keep = None
    if dropout_p > 0.0:
        B, Hq, Nq, _ = q.shape
        keep = torch.rand(B, Hq, Nq, k.shape[2], generator=generator, device=q.device) >= dropout_p
    out, lse = attention_ref(q, k, v, window=window, mask=mask, bias=bias, scale=scale, upcast=True,
                             softcap=softcap, alibi_slopes=alibi, dropout_mask=keep, dropout_p=dropout_p)
    return out.to(q.dtype), lse.float()


def _prepare_block_mask(block_mask, q, k, left: int, right: int):
    """Validate a BlockMask against q / k and fold causal / window into it (AND), so that blocks outside
    the window are skipped, not masked."""
    from tileattn.block_mask import BlockMask, create_block_mask
    from tileattn import masks

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a tileattn.BlockMask, got {type(block_mask).__name__}")
    block_mask.check_compatible(q, k)  # lengths, batch / head broadcast, device
    if (left, right) != (-1, -1):
        # Folded once per (mask, window) and kept on the mask in a small LRU (_FOLD_CACHE_SIZE windows): later
        # calls with a recent window reuse it (no host work per call). Keyed by the BlockMask object, whose
        # lists are immutable by contract (they are value-checked once, at construction).
        cache = block_mask.__dict__.setdefault("_tileattn_folded", OrderedDict())
        folded = cache.pop((left, right), None)
        if folded is None:
            win = create_block_mask(masks.sliding_window(left, right, q_len=q.shape[2], kv_len=k.shape[2]),
                                    None, None, q.shape[2], k.shape[2],
                                    block_size=(block_mask.bs_q, block_mask.bs_k), device=q.device)
            folded = block_mask & win
            while len(cache) >= _FOLD_CACHE_SIZE:
                cache.popitem(last=False)
        cache[(left, right)] = folded
        block_mask = folded
    return block_mask


_FOLD_CACHE_SIZE = 8


_SPARSE_FIELDS = ("kv_num_full", "kv_idx_full", "kv_num_part", "kv_idx_part", "kv_mask_id_part",
                  "q_num_full", "q_idx_full", "q_num_part", "q_idx_part", "q_mask_id_part", "masks")


def _sparse_tensors(block_mask) -> List[torch.Tensor]:
    return [getattr(block_mask, f) for f in _SPARSE_FIELDS]


@torch.library.custom_op("tileattn::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
    sparse: List[torch.Tensor], scale: float, left: int, right: int,
    softcap: Optional[float], alibi: Optional[torch.Tensor], mod_id: int, mod_tensors: List[torch.Tensor],
    dropout_p: float, rng: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale=scale, left=left, right=right, bias=bias, sparse=sparse or None,
                             softcap=softcap, alibi=alibi, score_mod=_mod_from_id(mod_id, mod_tensors),
                             dropout_p=dropout_p, rng=rng)


@_attention_fwd_op.register_fake
def _(q, k, v, bias, sparse, scale, left, right, softcap, alibi, mod_id, mod_tensors, dropout_p, rng):
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)


@torch.library.custom_op("tileattn::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], bias: Optional[torch.Tensor], sparse: List[torch.Tensor],
    scale: float, left: int, right: int,
    softcap: Optional[float], alibi: Optional[torch.Tensor], mod_id: int, mod_tensors: List[torch.Tensor],
    dropout_p: float, rng: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    score_mod = _mod_from_id(mod_id, mod_tensors)
    if score_mod is not None and score_mod[1] is None:
        raise NotImplementedError("tileattn.attention: this ScoreMod has no grad_fn, so it has no backward; "
                                  "pass grad_fn (the derivative ds'/ds) to ScoreMod to train through it")
    return attention_backward(do, q, k, v, out, lse, scale=scale, left=left, right=right, bias=bias,
                              sparse=sparse or None, dlse=dlse, softcap=softcap, alibi=alibi,
                              score_mod=score_mod, dropout_p=dropout_p, rng=rng)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, bias, sparse, scale, left, right, softcap, alibi, mod_id, mod_tensors,
      dropout_p, rng):
    # the kernels allocate contiguous gradients (strided views of a packed qkv must not leak into the fake)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, sparse, scale, left, right, softcap, alibi, mod_id, mod_tensors, dropout_p, rng = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi, rng, *sparse, *mod_tensors)
    ctx.n_sparse = len(sparse)
    ctx.params = (scale, left, right, softcap, mod_id, dropout_p)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, alibi, rng, *rest = ctx.saved_tensors
    sparse, mod_tensors = rest[:ctx.n_sparse], rest[ctx.n_sparse:]
    scale, left, right, softcap, mod_id, dropout_p = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = no_double_backward("attention", *_attention_bwd_op(
        dout, q, k, v, out, lse, dlse, bias, list(sparse), scale, left, right, softcap, alibi, mod_id,
        list(mod_tensors), dropout_p, rng))
    return (dq, dk, dv, None, [None] * ctx.n_sparse, None, None, None, None, None, None,
            [None] * len(mod_tensors), None, None)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    block_mask=None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    score_mod: Optional[ScoreMod] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
):
    """Internal entry point shared by :func:`attention` and the drop-ins. ``bias`` is an optional bool
    (True = attend) or float (added to scaled scores) tensor broadcastable to (B, Hq, Nq, Nk); it gets
    no gradient."""
    check_attention_inputs(q, k, v)
    check_bool("return_lse", return_lse)
    left, right = check_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    bias = _check_bias(bias, q, k)
    softcap, alibi_slopes, mod_tensors, dropout_p = _check_mods(q, k, softcap, alibi_slopes, score_mod, dropout_p,
                                                                generator)
    if block_mask is not None:
        block_mask = _prepare_block_mask(block_mask, q, k, left, right)
        left, right = -1, -1  # folded into the block mask
    if not use_triton(q, "attention"):
        if score_mod is not None:
            raise ValueError("score_mod runs Triton kernels only: pass CUDA tensors or set TRITON_INTERPRET=1 "
                             "(the CPU reference path cannot evaluate a @triton.jit function)")
        win = None if (left, right) == (-1, -1) else (left, right)
        out, lse = _reference_path(q, k, v, win, block_mask, bias, scale, softcap, alibi_slopes, dropout_p, generator)
    else:
        sparse = _sparse_tensors(block_mask) if block_mask is not None else []
        rng = _philox_seed_offset(generator, q.device) if dropout_p > 0.0 else None
        out, lse = _attention_fwd_op(q, k, v, bias, sparse, scale, left, right, softcap, alibi_slopes,
                                     _mod_id(score_mod), mod_tensors, dropout_p, rng)
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    block_mask=None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    score_mod: Optional[ScoreMod] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused softmax attention (FlashAttention-style tiling, online softmax), differentiable.

    Args:
        q: (B, Hq, Nq, D) query, float16 / bfloat16 / float32, unit stride in the last dim.
        k: (B, Hkv, Nk, D) keys; Hq % Hkv == 0 (GQA / MQA: query head h uses kv head h // (Hq // Hkv)).
        v: (B, Hkv, Nk, Dv) values; Dv may differ from D. D, Dv <= 256.
        causal: bottom-right aligned causal mask: query i sees key j iff j <= i + Nk - Nq (equal to
            SDPA ``is_causal`` when Nq == Nk).
        window: ``(left, right)`` sliding window in the same aligned coordinates (FlashAttention
            convention): query i sees key j iff i + Nk - Nq - left <= j <= i + Nk - Nq + right; -1 means
            unbounded. With ``causal=True`` right is 0.
        block_mask: a :class:`tileattn.BlockMask` (block-sparse attention); combined (AND) with
            ``causal`` / ``window``.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores (after the score mods, before dropout).
        softcap: soft-capping ``softcap * tanh(s / softcap)`` (Gemma-2, Grok), a float > 0.
        alibi_slopes: ALiBi, float32 (Hq,) or (B, Hq): ``s - slope * |i + Nk - Nq - j|`` (FlashAttention's
            bottom-right aligned convention); no gradient.
        score_mod: a :class:`tileattn.ScoreMod` (user Triton score function and its derivative).
            Order per score: ``s = scale * q.k`` -> score_mod -> ALiBi -> soft-cap (Gemma-2 order) ->
            masks -> softmax -> dropout.
        dropout_p: attention dropout on the probabilities (kept ones scaled by 1 / (1 - dropout_p)),
            applied whenever > 0 (like SDPA). Philox keyed by (seed, offset, b, h, i, j), regenerated in
            the backward (no mask stored); see :func:`dropout_mask`.
        generator: the torch.Generator the dropout seed / offset are drawn from (default: torch's default
            generator of q's device), so consecutive calls differ and ``torch.manual_seed`` reproduces
            them; the same draw gives bitwise-identical output and gradients.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, and with ``return_lse`` also lse (B, Hq, Nq) float32 (natural
        log; differentiable too). A query row that sees no key gets out = 0 and lse = -inf, and zero
        gradients.
    """
    return _attention(q, k, v, causal=causal, window=window, block_mask=block_mask, scale=scale,
                      return_lse=return_lse, softcap=softcap, alibi_slopes=alibi_slopes, score_mod=score_mod,
                      dropout_p=dropout_p, generator=generator)


# ----------------------------------------------------------------------------------------------------
# Packed variable-length sequences (FlashAttention's varlen interface)
# ----------------------------------------------------------------------------------------------------
def _as4(x: torch.Tensor) -> torch.Tensor:
    """(total, H, D) -> the (1, H, total, D) view the tile engine takes (no copy)."""
    return x.transpose(0, 1).unsqueeze(0)


def _from4(x: torch.Tensor) -> torch.Tensor:
    return x.squeeze(0).transpose(0, 1)


@torch.library.custom_op("tileattn::attention_varlen_fwd", mutates_args=())
def _varlen_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    max_q: int, max_k: int, scale: float, left: int, right: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention_forward(_as4(q), _as4(k), _as4(v), scale=scale, left=left, right=right,
                                 varlen=(cu_q, cu_k, max_q, max_k))
    return _from4(out), lse.squeeze(0)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("tileattn::attention_varlen_bwd", mutates_args=())
def _varlen_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
    scale: float, left: int, right: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = attention_backward(_as4(do), _as4(q), _as4(k), _as4(v), _as4(out), lse.unsqueeze(0), scale=scale,
                                    left=left, right=right, dlse=None if dlse is None else dlse.unsqueeze(0),
                                    varlen=(cu_q, cu_k, max_q, max_k))
    return _from4(dq), _from4(dk), _from4(dv)


@_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, left, right)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = no_double_backward("attention_varlen",
                                    *_varlen_bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.params))
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _varlen_checks_enabled() -> bool:
    """Value checks of cu_seqlens cost a device-to-host copy: skipped under torch.compile, CUDA-graph
    capture, or with TILEATTN_VARLEN_CHECKS=0 (the kernels clamp every row range, so unchecked bad values
    give wrong results, never out-of-bounds reads)."""
    import os

    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("TILEATTN_VARLEN_CHECKS", "1") != "0"


def _check_varlen_inputs(q, k, v, cu_q, cu_k, max_q, max_k, checked: bool = False) -> Tuple[int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 3)
    check_same([("q", q), ("k", k), ("v", v)])
    # the 4-d checks (heads, head dims, lengths) on the (1, H, total, D) views
    check_attention_inputs(_as4(q), _as4(k), _as4(v))
    nseq = cu_q.shape[0] - 1 if isinstance(cu_q, torch.Tensor) and cu_q.dim() == 1 else None
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise TypeError(f"{name} must be a non-negative Python int or None, got {m!r}")
    validate = (_varlen_checks_enabled() and not checked) or max_q is None or max_k is None
    longest_q = check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0], q.device, validate=validate)
    longest_k = check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0], q.device, validate=validate, nseq=nseq)
    if validate:
        for name, m, longest in (("max_seqlen_q", max_q, longest_q), ("max_seqlen_k", max_k, longest_k)):
            if m is not None and longest > m:
                raise ValueError(f"a sequence has {longest} rows, more than {name} = {m}")
    return (longest_q if max_q is None else max_q), (longest_k if max_k is None else max_k)


def _varlen_reference_path(q, k, v, cu_q, cu_k, window, scale):
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, window=window, scale=scale, upcast=True)
    return out.to(q.dtype), lse.float()


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused softmax attention over packed variable-length sequences (``flash_attn_varlen_func``'s
    interface), differentiable in q, k, v; deterministic backward.

    Args:
        q: (total_q, Hq, D) queries of every sequence, packed along dim 0; any strides with a unit last dim
            (e.g. ``qkv[:, 0]`` of a packed (total, 3, H, D) tensor).
        k: (total_k, Hkv, D), v: (total_k, Hkv, Dv) keys / values, packed the same way; Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (nseq + 1,) cumulative lengths: sequence b is query rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. They
            start at 0, never decrease and end at total_q / total_k. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest query / key length (Python ints: they pick the autotuned
            config, no sync). ``None`` computes them from cu_seqlens (one device-to-host copy).
        causal, window, scale: per sequence exactly as :func:`tileattn.attention` (bottom-right aligned
            causal mask and FlashAttention windows within each sequence).
        return_lse: also return the log-sum-exp.

    Returns:
        out (total_q, Hq, Dv) in q's dtype, and with ``return_lse`` lse (Hq, total_q) float32 (FlashAttention's
        varlen LSE layout). A sequence with queries but no keys gives out = 0, lse = -inf.

    The values of cu_seqlens (start 0, non-decreasing, last entry = total, lengths <= max_seqlen) are
    checked on the host, which costs one device-to-host copy on CUDA; it is skipped under torch.compile,
    during CUDA-graph capture and with the environment variable ``TILEATTN_VARLEN_CHECKS=0`` when both
    max_seqlen arguments are given (the kernels clamp every sequence's rows into the packed tensors, so
    bad values then give wrong results but never out-of-bounds reads). Work is proportional to the visible
    tile pairs of each sequence; no program touches another sequence's rows.
    """
    return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                             window=window, scale=scale, return_lse=return_lse)


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, window, scale,
                      return_lse, checked: bool = False):
    """:func:`attention_varlen`; ``checked``: the caller already validated the cu_seqlens values (the HF
    integration, once per forward), so no device-to-host copy here."""
    check_bool("return_lse", return_lse)
    left, right = check_window(window, causal)
    max_q, max_k = _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, checked)
    scale = check_scale(scale, q.shape[-1])
    if not use_triton(q, "attention_varlen"):
        win = None if (left, right) == (-1, -1) else (left, right)
        out, lse = _varlen_reference_path(q, k, v, cu_seqlens_q, cu_seqlens_k, win, scale)
    else:
        out, lse = _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_q), int(max_k), scale, left, right)
    return (out, lse) if return_lse else out
