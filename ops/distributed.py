"""Context parallelism over ``torch.distributed``: ring attention (load-balanced causal) and lightning
attention with state passing (LASP-2), forward and backward.

Each rank of a process group holds its shard ``(B, H, N_local, D)`` of one sequence of length
``N = world * N_local``. Two shard layouts:

- ``"contiguous"``: rank r holds positions ``[r * N_local, (r + 1) * N_local)``.
- ``"zigzag"``: the sequence is cut into ``2 * world`` chunks of ``N_local / 2`` and rank r holds chunks r and
  ``2 * world - 1 - r`` (in that order), so that causal work is balanced across ranks and ring steps.

:func:`ring_attention` circulates K/V around the ring with ``batch_isend_irecv`` (the next block's transfer
runs while the current block is computed), merges the per-block partial outputs by their LSE in fp32, and in
the backward circulates K/V together with fp32 dK/dV accumulators that travel with their block back to its
owner. Per-block work runs the tile engine's launchers (``attention_forward`` / ``attention_backward`` with
the global out / LSE), so every block pair is either skipped, dense, or one bottom-right aligned window.

:func:`lightning_attention_cp` is LASP-2: each rank runs :func:`tileattn.lightning_attention` on its shard
(zero initial state; rank 0 uses ``initial_state``), one all-gather of the per-rank end states
(B * H * D * Dv fp32 per rank, independent of N), a prefix combine with ``lambda^N_local`` and a local
correction ``scale * lambda^(t+1) q_t P_r`` with the prefix state ``P_r``.

Cost of the argument checks: every call all-gathers a few int64 shape fields and an error flag per rank so
that a rank with a different shard length, or whose arguments were rejected, makes every rank raise instead of
hanging in a collective; on CUDA this is one
tiny collective and a device-to-host copy. Set ``tileattn.distributed.CHECK_SHAPES = False`` (on every rank)
to skip it once the shapes are known to agree.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from tileattn._utils import (check_attention_inputs, check_bool, check_scale, check_tensor, check_window,
                             use_triton)
from tileattn.reference import attention_ref, visible_mask

__all__ = ["shard_sequence", "unshard_sequence", "ring_attention", "lightning_attention_cp", "LAYOUTS",
           "CHECK_SHAPES"]

LAYOUTS = ("contiguous", "zigzag")
CHECK_SHAPES = True
_INF = 1 << 62  # an unbounded side of a window, in integer position arithmetic


# ----------------------------------------------------------------------------------------------------
# Groups, layouts, checks
# ----------------------------------------------------------------------------------------------------
def _group_info(group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tileattn.distributed needs an initialised default process group: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown shard layout {layout!r}: expected one of {LAYOUTS}")
    return layout


def _segments(layout: str, world: int, rank: int, n_local: int) -> List[Tuple[int, int, int]]:
    """The rank's pieces of the sequence as (global start, local start, length), in local order."""
    if layout == "contiguous":
        return [(rank * n_local, 0, n_local)]
    c = n_local // 2
    return [(rank * c, 0, c), ((2 * world - 1 - rank) * c, c, c)]


def _check_local_length(layout: str, n_local: int, what: str) -> None:
    if layout == "zigzag" and n_local % 2:
        raise ValueError(f"{what}: the zigzag layout needs an even local length (two equal chunks), got {n_local}")


def _check_same_shapes(group, world: int, what: str, fields: Sequence[int], device: torch.device,
                       error: Optional[Exception] = None) -> None:
    """Raise on every rank when ``fields`` (shape / option integers) differ across ranks, or when some rank's
    local checks failed (``error``: that rank re-raises its own error, the others a ValueError naming it), so
    no rank is left waiting in a later collective. One all-gather of len(fields) + 1 int64 per rank (see the
    module docstring); without it (CHECK_SHAPES off, or a single rank) a local error is raised directly."""
    if not CHECK_SHAPES or world == 1:
        if error is not None:
            raise error
        return
    vals = [] if error is not None else [int(f) for f in fields]
    vals += [0] * (_CHECK_FIELDS - len(vals))  # a fixed size: a failed rank may not know its fields
    t = torch.tensor([int(error is not None)] + vals, dtype=torch.int64, device=device)
    got = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(got, t, group=group)
    rows = [g.tolist() for g in got]
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"{what}: the inputs of rank(s) {failed} were rejected (see the error raised there)")
    rows = [row[1:] for row in rows]
    if any(r != rows[0] for r in rows):
        raise ValueError(f"{what}: shard shapes / options differ across ranks (every rank must hold an equally "
                         f"long shard of the same batch, heads, head dims and dtype): per rank {rows}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHECK_FIELDS = 16  # int64 fields each rank contributes to the argument check


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(world, *x.shape): every rank's ``x``."""
    x = x.contiguous()
    out = x.new_empty((world,) + tuple(x.shape))
    dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


def _sum_own_slot(g: torch.Tensor, group, rank: int) -> torch.Tensor:
    """The backward of :func:`_all_gather`: the sum over ranks of slot ``rank`` of ``g`` (world, ...)
    (reduce-scatter on NCCL, an all-reduce elsewhere: gloo has no reduce-scatter)."""
    g = g.contiguous()
    if dist.get_backend(group) == "nccl":
        mine = g.new_empty(g.shape[1:])
        dist.reduce_scatter_tensor(mine, g, group=group)
        return mine
    dist.all_reduce(g, group=group)
    return g[rank].clone()


class _AllGather(torch.autograd.Function):
    """Differentiable :func:`_all_gather`."""

    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.group, ctx.rank = group, rank
        return _all_gather(x, group, world)

    @staticmethod
    def backward(ctx, g):
        return _sum_own_slot(g, ctx.group, ctx.rank), None, None, None


def shard_sequence(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (every rank passes the same ``x``).

    Args:
        x: any tensor whose ``dim`` is the sequence (e.g. (B, H, N, D) with ``dim=2``, or (B, N, C) with
            ``dim=1``). N must be a multiple of ``world`` (contiguous) or ``2 * world`` (zigzag).
        group: process group (default: the world group).
        layout: ``"contiguous"`` (rank r holds block r) or ``"zigzag"`` (rank r holds chunks r and
            ``2 * world - 1 - r`` of ``2 * world``).
        dim: the sequence dimension.

    Returns:
        (..., N / world, ...) shard: a view for ``contiguous``, a new tensor for ``zigzag``. Differentiable.
    """
    _check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = _norm_dim(x, dim)
    world, rank = _group_info(group)
    n, parts = x.shape[dim], (world if layout == "contiguous" else 2 * world)
    if n % parts:
        raise ValueError(f"sequence length {n} (dim {dim}) must be a multiple of {parts} for the {layout} layout "
                         f"over {world} ranks")
    pieces = [x.narrow(dim, g, ln) for g, _, ln in _segments(layout, world, rank, n // world)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def unshard_sequence(x_local: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full sequence from every rank's shard (the inverse of :func:`shard_sequence`), on every rank.

    One all-gather of the shard (shapes are checked across ranks first). Differentiable: the gradient of the
    full tensor, summed over ranks, flows back to each rank's shard.
    """
    _check_layout(layout)
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    dim = _norm_dim(x_local, dim)
    world, rank = _group_info(group)
    n_local = x_local.shape[dim]
    _check_local_length(layout, n_local, "unshard_sequence")
    _check_same_shapes(group, world, "unshard_sequence", (x_local.dim(), dim) + tuple(x_local.shape),
                       x_local.device)
    if world == 1:
        return x_local
    full = _AllGather.apply(x_local, group, world, rank)
    pieces = []
    for r in range(world):
        for g, lo, ln in _segments(layout, world, r, n_local):
            pieces.append((g, full[r].narrow(dim, lo, ln)))
    return torch.cat([p for _, p in sorted(pieces, key=lambda t: t[0])], dim)


# ----------------------------------------------------------------------------------------------------
# Ring schedule: which (query rows, key rows, window) calls each step runs
# ----------------------------------------------------------------------------------------------------
def _pair_box(qseg, kseg, lo_d: int, hi_d: int):
    """Visible bounding box of one (query piece, key piece) pair under the band lo_d <= j - i <= hi_d
    (global positions), as local (qa, qb, ka, kb), or None when no query sees any key."""
    gq, lq, nq = qseg
    gk, lk, nk = kseg
    if gk + nk - 1 - gq < lo_d or gk - (gq + nq - 1) > hi_d:
        return None
    ia, ib = max(gq, gk - hi_d), min(gq + nq - 1, gk + nk - 1 - lo_d)
    ja, jb = max(gk, gq + lo_d), min(gk + nk - 1, gq + nq - 1 + hi_d)
    return (lq + ia - gq, lq + ib - gq + 1, lk + ja - gk, lk + jb - gk + 1)


def _fits(box, window, qsegs, ksegs, lo_d, hi_d) -> bool:
    """Whether one kernel call over ``box`` with the bottom-right aligned ``window`` sees exactly the true
    visibility in every piece pair it covers (compared on the clipped diagonal ranges, which is exact: every
    diagonal between the extremes of an integer rectangle is hit)."""
    qa, qb, ka, kb = box
    off = (kb - ka) - (qb - qa)
    kl = -_INF if window[0] < 0 else off - window[0]
    ku = _INF if window[1] < 0 else off + window[1]
    for gq, lq, nq in qsegs:
        x0, x1 = max(qa, lq), min(qb, lq + nq)
        for gk, lk, nk in ksegs:
            y0, y1 = max(ka, lk), min(kb, lk + nk)
            if x0 >= x1 or y0 >= y1:
                continue
            shift = (gk - lk) - (gq - lq) + ka - qa  # j - i = (j' - i') + shift in box coordinates
            dmin, dmax = (y0 - ka) - (x1 - 1 - qa), (y1 - 1 - ka) - (x0 - qa)
            a = (max(kl, dmin), min(ku, dmax))
            b = (max(lo_d - shift, dmin), min(hi_d - shift, dmax))
            if (a[0] <= a[1] or b[0] <= b[1]) and a != b:
                return False
    return True


def _windows(box, qsegs, ksegs, lo_d, hi_d, pairs):
    """Candidate windows for one call over ``box``: dense first, then each covered pair's band."""
    qa, qb, ka, kb = box
    off = (kb - ka) - (qb - qa)
    yield (-1, -1)
    for qseg, kseg in pairs:
        shift = (kseg[0] - kseg[1]) - (qseg[0] - qseg[1]) + ka - qa
        left = -1 if lo_d <= -_INF else off - lo_d + shift
        right = -1 if hi_d >= _INF else hi_d - shift - off
        if (lo_d <= -_INF or left >= 0) and (hi_d >= _INF or right >= 0):
            yield (left, right)


def _one_call(box, qsegs, ksegs, lo_d, hi_d, pairs):
    for w in _windows(box, qsegs, ksegs, lo_d, hi_d, pairs):
        if _fits(box, w, qsegs, ksegs, lo_d, hi_d):
            return box + w
    return None


def _step_calls(qsegs, ksegs, lo_d: int, hi_d: int) -> Tuple[Tuple[int, ...], ...]:
    """Kernel calls (qa, qb, ka, kb, left, right) of one step: one call over the bounding box of every
    visible pair when one window expresses it (always for no mask and plain causal in both layouts), else
    one call per visible pair (its trimmed box always fits one bottom-right aligned window)."""
    pairs = [(qs, ks, b) for qs in qsegs for ks in ksegs if (b := _pair_box(qs, ks, lo_d, hi_d)) is not None]
    if not pairs:
        return ()
    box = (min(p[2][0] for p in pairs), max(p[2][1] for p in pairs),
           min(p[2][2] for p in pairs), max(p[2][3] for p in pairs))
    call = _one_call(box, qsegs, ksegs, lo_d, hi_d, [(qs, ks) for qs, ks, _ in pairs])
    if call is not None:
        return (call,)
    calls = []
    for qs, ks, b in pairs:
        call = _one_call(b, [qs], [ks], lo_d, hi_d, [(qs, ks)])
        if call is None:  # cannot happen: a trimmed box's bottom-right corner lies inside the band
            raise RuntimeError(f"ring_attention: no window expresses the block pair {qs} x {ks}")
        calls.append(call)
    return tuple(calls)


def _bounds(left: int, right: int) -> Tuple[int, int]:
    return (-_INF if left < 0 else -left), (_INF if right < 0 else right)


@functools.lru_cache(maxsize=64)
def _schedule(layout: str, world: int, rank: int, n_local: int, left: int, right: int):
    """Per-step kernel calls of ``rank`` (step s computes with the K/V of rank ``(rank - s) % world``),
    truncated after the last step in which any rank has work (windows can end the ring early)."""
    lo_d, hi_d = _bounds(left, right)
    segs = [_segments(layout, world, r, n_local) for r in range(world)]
    last = 0
    for s in range(1, world):
        if any(_pair_box(qs, ks, lo_d, hi_d) is not None
               for r in range(world) for qs in segs[r] for ks in segs[(r - s) % world]):
            last = s
    return tuple(_step_calls(segs[rank], segs[(rank - s) % world], lo_d, hi_d) for s in range(last + 1))


# ----------------------------------------------------------------------------------------------------
# Block compute (kernel launchers, or the float64 PyTorch path on CPU without the interpreter)
# ----------------------------------------------------------------------------------------------------
def _block_fwd(q, k, v, scale: float, left: int, right: int):
    if use_triton(q, "ring_attention"):
        from tileattn.kernels.attention import attention_forward

        return attention_forward(q, k, v, scale=scale, left=left, right=right)
    win = None if (left, right) == (-1, -1) else (left, right)
    out, lse = attention_ref(q, k, v, window=win, scale=scale, upcast=True)
    return out, lse.float()


def _block_bwd(do, q, k, v, out, lse, dlse, scale: float, left: int, right: int):
    """dq, dk, dv of one block given the *global* out / lse rows (softmax over all keys of all ranks)."""
    if use_triton(q, "ring_attention"):
        from tileattn.kernels.attention import attention_backward

        # the launcher indexes lse / dlse as contiguous (B, H, Nq) rows: a row slice must be copied
        return attention_backward(do, q, k, v, out, lse.contiguous(), scale=scale, left=left, right=right,
                                  dlse=dlse)
    f = torch.float64
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    q64, do64, o64 = q.to(f), do.to(f), out.to(f)
    k64, v64 = (x.to(f).repeat_interleave(g, dim=1) for x in (k, v))
    lse64 = lse.to(f).unsqueeze(-1)
    ok = visible_mask(Nq, Nk, window=None if (left, right) == (-1, -1) else (left, right), device=q.device)
    ok = ok & torch.isfinite(lse64)
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    p = torch.where(ok, torch.exp(s - torch.where(torch.isfinite(lse64), lse64, torch.zeros_like(lse64))), 0.0)
    delta = (do64 * o64).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(f).unsqueeze(-1)
    ds = p * (torch.matmul(do64, v64.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k64) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), q64) * scale).view(B, Hkv, g, Nk, D).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), do64).view(B, Hkv, g, Nk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _merge(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: (out_acc, lse_acc) <- LSE-weighted merge with a partial (out, lse), in fp32. Rows empty in
    both stay out 0 / lse -inf (never NaN)."""
    new = torch.logaddexp(lse_acc, lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_acc = torch.exp(lse_acc - safe).unsqueeze(-1)
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(w_new * out.float())
    lse_acc.copy_(new)


# ----------------------------------------------------------------------------------------------------
# Ring communication
# ----------------------------------------------------------------------------------------------------
def _pack(*xs: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.cat([x.reshape(-1).to(dtype or x.dtype) for x in xs])


def _unpack(buf: torch.Tensor, shapes) -> List[torch.Tensor]:
    out, o = [], 0
    for shp in shapes:
        n = 1
        for s in shp:
            n *= s
        out.append(buf[o:o + n].view(shp))
        o += n
    return out


def _exchange(send: torch.Tensor, recv: torch.Tensor, dst: int, src: int, group):
    """Start sending ``send`` to group rank ``dst`` and receiving ``recv`` from group rank ``src``; returns the
    requests (wait on them before reading ``recv`` or writing ``send``)."""
    to = dst if group is None else dist.get_global_rank(group, dst)
    frm = src if group is None else dist.get_global_rank(group, src)
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to, group), dist.P2POp(dist.irecv, recv, frm, group)])


def _wait(reqs) -> None:
    for r in reqs or ():
        r.wait()


def _ring_forward(q, k, v, scale, sched, group, world, rank):
    B, Hq, n, _ = q.shape
    out = torch.zeros(B, Hq, n, v.shape[-1], device=q.device, dtype=torch.float32)
    lse = torch.full((B, Hq, n), float("-inf"), device=q.device, dtype=torch.float32)
    kv_shapes = (tuple(k.shape), tuple(v.shape))
    kk, vv, buf = k, v, None
    for s, calls in enumerate(sched):
        reqs = None
        if s + 1 < len(sched):  # next block's transfer overlaps this block's compute
            buf = _pack(k, v) if buf is None else buf
            nxt = torch.empty_like(buf)
            reqs = _exchange(buf, nxt, (rank + 1) % world, (rank - 1) % world, group)
        for qa, qb, ka, kb, left, right in calls:
            o, l = _block_fwd(q[:, :, qa:qb], kk[:, :, ka:kb], vv[:, :, ka:kb], scale, left, right)
            _merge(out[:, :, qa:qb], lse[:, :, qa:qb], o, l)
        if reqs is not None:
            _wait(reqs)
            buf = nxt
            kk, vv = _unpack(buf, kv_shapes)
    return out.to(q.dtype), lse


def _ring_backward(do, dlse, q, k, v, out, lse, scale, sched, group, world, rank):
    kv_shapes = (tuple(k.shape), tuple(v.shape))
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    kk, vv, buf = k, v, None
    dkv, dkv_reqs, dkv_in = None, None, None
    nxt = (rank + 1) % world, (rank - 1) % world
    for s, calls in enumerate(sched):
        last = s + 1 == len(sched)
        reqs = None
        if not last:
            buf = _pack(k, v) if buf is None else buf
            buf_next = torch.empty_like(buf)
            reqs = _exchange(buf, buf_next, *nxt, group)
        dkb = dvb = None
        for qa, qb, ka, kb, left, right in calls:
            dl = None if dlse is None else dlse[:, :, qa:qb]
            gq, gk, gv = _block_bwd(do[:, :, qa:qb], q[:, :, qa:qb], kk[:, :, ka:kb], vv[:, :, ka:kb],
                                    out[:, :, qa:qb], lse[:, :, qa:qb], dl, scale, left, right)
            if dkb is None:
                dkb = torch.zeros(kk.shape, device=q.device, dtype=torch.float32)
                dvb = torch.zeros(vv.shape, device=q.device, dtype=torch.float32)
            dq[:, :, qa:qb] += gq
            dkb[:, :, ka:kb] += gk
            dvb[:, :, ka:kb] += gv
        # the fp32 dK/dV accumulator of the block held now arrives from the previous rank (sent last step)
        if s == 0:
            dkv = torch.zeros(k.numel() + v.numel(), device=q.device, dtype=torch.float32)
        else:
            _wait(dkv_reqs)
            dkv = dkv_in
        if dkb is not None:
            dkv += _pack(dkb, dvb)
        if not last:
            dkv_in = torch.empty_like(dkv)
            dkv_reqs = _exchange(dkv, dkv_in, *nxt, group)
            _wait(reqs)
            buf = buf_next
            kk, vv = _unpack(buf, kv_shapes)
    hops = len(sched) - 1  # the accumulator now belongs to rank - hops: send it home
    if hops:
        home = torch.empty_like(dkv)
        _wait(_exchange(dkv, home, (rank - hops) % world, (rank + hops) % world, group))
        dkv = home
    dk, dv = _unpack(dkv, kv_shapes)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, sched, group, world, rank):
        out, lse = _ring_forward(q, k, v, scale, sched, group, world, rank)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, sched, group, world, rank)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = _ring_backward(dout, dlse, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    layout: str = "zigzag",
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention over a sequence sharded across the ranks of ``group`` (ring attention), differentiable.

    Equal to :func:`tileattn.attention` on the full sequence (``unshard_sequence`` of the inputs), returned
    sharded like the inputs. K/V blocks circulate around the ring with ``torch.distributed.batch_isend_irecv``
    (each transfer overlaps the current block's compute); partial outputs merge by LSE in fp32. The backward
    circulates K/V again with fp32 dK/dV accumulators that return to their owner.

    Args:
        q: (B, Hq, N_local, D) this rank's query shard (``shard_sequence(x, layout=layout)``).
        k: (B, Hkv, N_local, D) key shard; Hq % Hkv == 0 (GQA / MQA).
        v: (B, Hkv, N_local, Dv) value shard.
        group: process group (default: the world group). Every rank must pass equally shaped shards.
        causal: causal mask over global positions (query i sees key j iff j <= i; the full sequence has
            Nq == Nk, so tileattn's bottom-right alignment is the usual top-left one).
        window: ``(left, right)`` sliding window over global positions (query i sees keys
            ``i - left .. i + right``, -1 unbounded; causal forces right = 0). The ring stops after the
            last step in which any rank has a visible block.
        scale: softmax scale, default 1/sqrt(D).
        layout: ``"zigzag"`` (default; balanced causal work, N_local must be even) or ``"contiguous"``.
        return_lse: also return the log-sum-exp (B, Hq, N_local) float32 (differentiable).

    Returns:
        out (B, Hq, N_local, Dv) in q's dtype (and lse). Rows that see no key: out 0, lse -inf.

    Raises:
        ValueError for an unknown layout, shard shapes that differ across ranks (checked with one small
        all-gather per call, see the module docstring), q / k shards of different lengths, or an odd
        zigzag shard.
    """
    world, rank = _group_info(group)
    error, fields = None, ()
    try:  # local checks first; any rank's failure is raised on every rank (no rank left in a collective)
        check_attention_inputs(q, k, v)
        check_bool("return_lse", return_lse)
        left, right = check_window(window, causal)
        scale = check_scale(scale, q.shape[-1])
        _check_layout(layout)
        n = q.shape[2]
        if k.shape[2] != n:
            raise ValueError(f"ring_attention shards q and k/v of one sequence: their local lengths must match, "
                             f"got {n} and {k.shape[2]}")
        _check_local_length(layout, n, "ring_attention")
        fields = (q.shape[0], q.shape[1], k.shape[1], n, q.shape[3], v.shape[3], left, right, LAYOUTS.index(layout),
                  _DTYPES.index(q.dtype))
    except (ValueError, TypeError) as e:
        error = e
    _check_same_shapes(group, world, "ring_attention", fields, _device_of(q), error)
    sched = _schedule(layout, world, rank, n, left, right)
    out, lse = _RingAttention.apply(q, k, v, scale, sched, group, world, rank)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------
# Lightning attention with state passing (LASP-2)
# ----------------------------------------------------------------------------------------------------
class _StatePrefix(torch.autograd.Function):
    """LASP-2 state exchange: all-gather every rank's end state S_j (zero initial state; rank 0's includes the
    user's initial state) and return this rank's prefix ``P_r = sum_{j<r} lam_n^(r-1-j) S_j`` (zeros on rank
    0). Backward: ``dS_j = sum_{r>j} lam_n^(r-1-j) dP_r``, summed over ranks (one all-reduce / reduce-scatter
    of world x B x H x D x Dv fp32). Every rank applies the prefix (rank 0 its zeros) so that every rank's
    backward reaches the collective."""

    @staticmethod
    def forward(ctx, state, lam_n, group, world, rank):
        ctx.group, ctx.world, ctx.rank = group, world, rank
        gathered = _all_gather(state, group, world)
        prefix = torch.zeros_like(state)
        for j in range(rank):
            prefix = lam_n * prefix + gathered[j]
        ctx.save_for_backward(lam_n)
        return prefix

    @staticmethod
    def backward(ctx, dprefix):
        (lam_n,) = ctx.saved_tensors
        dg = dprefix.new_zeros((ctx.world,) + tuple(dprefix.shape))
        for j in range(ctx.rank - 1, -1, -1):
            dg[j] = dprefix
            dprefix = lam_n * dprefix
        return _sum_own_slot(dg, ctx.group, ctx.rank), None, None, None, None


def lightning_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    *,
    group=None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Causal linear attention with per-head decay over a sequence sharded contiguously across ``group``
    (LASP-2 style), differentiable. Equal to :func:`tileattn.lightning_attention` on the full sequence.

    Rank r runs ``lightning_attention`` on its shard (zero initial state; rank 0 starts from
    ``initial_state``), all-gathers the end states (B * H * D * Dv fp32 per rank), forms its prefix state
    ``P_r = sum_{j<r} lambda^((r-1-j) N_local) S_j`` and adds ``scale * lambda^(t+1) q_t P_r``.

    Args:
        q, k: (B, H, N_local, D) this rank's shard, ``layout="contiguous"`` (rank r holds block r). Zigzag
            shards are not supported and cannot be detected: they give wrong results.
        v: (B, H, N_local, Dv).
        decay: (H,) rates as for :func:`tileattn.lightning_attention`, or None (no decay). Same on every rank.
        group: process group (default: the world group).
        scale: output scale, default 1/sqrt(D).
        initial_state: (B, H, D, Dv) float32 state before the first token. Read on group rank 0 only (other
            ranks may pass None or the same tensor; theirs is ignored and gets no gradient).
        output_final_state: also return this rank's end state: the state after its last token. On the last
            rank this is the final state of the full sequence; on rank r it is the initial state of rank r + 1.

    Returns:
        out (B, H, N_local, Dv) in q's dtype; with ``output_final_state`` also the (B, H, D, Dv) float32 state.
        Gradients flow to q, k, v and (on rank 0) ``initial_state``, including through every rank's state.

    Raises:
        ValueError when shard shapes differ across ranks (one small all-gather per call).
    """
    from tileattn.lightning import lightning_attention

    world, rank = _group_info(group)
    error, fields = None, ()
    try:  # local checks and the local op first; any rank's failure is raised on every rank
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, x, 4)
        check_bool("output_final_state", output_final_state)
        B, H, n, D = q.shape
        fields = (B, H, n, D, k.shape[2], v.shape[-1], _DTYPES.index(q.dtype), int(decay is None))
        out, state = lightning_attention(q, k, v, decay, scale=scale,
                                         initial_state=initial_state if rank == 0 else None,
                                         output_final_state=True)  # validates the other arguments
    except (ValueError, TypeError) as e:
        error = e
    _check_same_shapes(group, world, "lightning_attention_cp", fields, _device_of(q), error)
    if world > 1 and torch.is_grad_enabled() and not state.requires_grad:
        # some rank may need gradients (e.g. only rank 0's initial_state is learned): every rank's output then
        # depends on the exchanged states, and every rank's backward must reach the collective
        state = state.detach().requires_grad_()
    if world > 1:
        scale = check_scale(scale, D)
        rates = (torch.zeros(H, device=q.device) if decay is None
                 else decay.detach().reshape(H).to(device=q.device, dtype=torch.float32))
        lam_n = torch.exp(-rates * n).view(1, H, 1, 1)
        prefix = _StatePrefix.apply(state, lam_n, group, world, rank)  # zero on rank 0 (kept in the graph)
        t = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
        w = torch.exp(-rates[:, None] * t[None, :]).view(1, H, n, 1)
        out = (out.float() + scale * torch.matmul(q.float() * w, prefix)).to(q.dtype)
        state = lam_n * prefix + state
    return (out, state) if output_final_state else out
