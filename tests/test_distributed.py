"""Context parallelism (tileattn.distributed): ring attention and LASP-2 lightning attention over gloo.

Each multi-rank test spawns ``world`` processes running tests/dist_worker.py (gloo on CPU, kernels under the
Triton interpreter); every rank checks its shard of out / lse / states / gradients against the float64
reference and the single-process op on the full sequence. The ring schedule itself is checked here, without
processes, against the dense visibility matrix for many windows.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tileattn.distributed import _schedule, _segments
from tileattn.reference import visible_mask

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, cases, interpret: bool = True, device: str = "cpu") -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               DIST_WORKER_INTERPRET="1" if interpret else "0", DIST_WORKER_DEVICE=device, OMP_NUM_THREADS="1")
    if sys.platform == "linux":  # gloo on the loopback device: containers' host names may not resolve
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, WORKER, json.dumps(cases)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = p.communicate()
            out = f"TIMEOUT after {TIMEOUT} s\n{out}"
        logs.append((r, p.returncode, out))
    bad = [f"--- rank {r} (exit {rc}) ---\n{out[-4000:]}" for r, rc, out in logs if rc != 0]
    assert not bad, "\n".join(bad)


def _ring(**kw):
    return dict(op="ring", **kw)


RING_W2 = [
    _ring(layout="contiguous", causal=False),
    _ring(layout="contiguous", causal=True, Hq=4, Hkv=2, bnhd=True),
    _ring(layout="zigzag", causal=False, Hq=2, Hkv=2, D=24, Dv=8),
    _ring(layout="zigzag", causal=True, Hq=4, Hkv=1, repeat=True),
    _ring(layout="zigzag", causal=True, dtype="bf16", Hq=2, Hkv=1, B=2),
    _ring(layout="contiguous", window=[3, 2], n=9),
    _ring(layout="zigzag", causal=True, window=[4, -1]),
]
RING_W4 = [
    _ring(layout="contiguous", causal=True, n=6, Hq=2, Hkv=1),
    _ring(layout="zigzag", causal=True, n=6, Hq=4, Hkv=2),
    _ring(layout="zigzag", causal=False, n=4, bnhd=True, dtype="fp16"),
    _ring(layout="contiguous", causal=True, window=[5, -1], n=5),
    _ring(layout="zigzag", causal=True, window=[2, -1], n=2),  # chunks of one token
    _ring(layout="zigzag", causal=True, n=6, Hq=2, Hkv=1, groups=[[0, 2], [1, 3]]),  # two rings of 2 ranks
]
LIGHTNING = [
    dict(op="lightning"),
    dict(op="lightning", decay=False, init=False, n=17, D=8, Dv=16),
    dict(op="lightning", dtype="bf16", B=2),
]


@pytest.mark.parametrize("world, cases", [
    pytest.param(2, RING_W2, id="ring-w2"),
    pytest.param(4, RING_W4, id="ring-w4"),
    pytest.param(2, LIGHTNING + [dict(op="errors"), dict(op="frozen")], id="lightning-errors-w2"),
    pytest.param(4, LIGHTNING[:1] + [dict(op="lightning", groups=[[3, 1], [0, 2]]), dict(op="errors")],
                 id="lightning-errors-w4"),
])
def test_context_parallel(world, cases):
    _launch(world, cases)


def test_context_parallel_pytorch_path():
    """CPU tensors without the interpreter: the per-block float64 PyTorch path (forward and backward)."""
    _launch(2, [_ring(layout="zigzag", causal=True, Hq=4, Hkv=2), _ring(layout="contiguous", window=[3, 2], n=9),
                dict(op="lightning")], interpret=False)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_schedule_covers_exactly_the_visible_pairs(layout, world):
    """Summed over ring steps, each rank's kernel calls (query rows x key rows x aligned window) cover every
    visible (query, key) pair of the full sequence exactly once and no invisible one."""
    for n in (2, 6):
        N = n * world
        for left in (-1, 0, 1, 3, 9):
            for right in (-1, 0, 2, 7):
                full = visible_mask(N, N, window=(left, right))
                for r in range(world):
                    sched = _schedule(layout, world, r, n, left, right)
                    qpos = torch.cat([torch.arange(g, g + ln) for g, _, ln in _segments(layout, world, r, n)])
                    cover = torch.zeros(n, N, dtype=torch.int64)
                    for s, calls in enumerate(sched):
                        kpos = torch.cat([torch.arange(g, g + ln)
                                          for g, _, ln in _segments(layout, world, (r - s) % world, n)])
                        for qa, qb, ka, kb, wl, wr in calls:
                            win = None if (wl, wr) == (-1, -1) else (wl, wr)
                            m = visible_mask(qb - qa, kb - ka, window=win).long()
                            cover[torch.arange(qa, qb)[:, None], kpos[ka:kb][None, :]] += m
                    assert torch.equal(cover, full[qpos].long()), (layout, world, n, left, right, r)


def test_zigzag_causal_steps_do_equal_work():
    """Zigzag causal: one kernel call per step, each over half of a (local x local) block."""
    world, n = 4, 8
    for r in range(world):
        sched = _schedule("zigzag", world, r, n, -1, 0)
        assert len(sched) == world and all(len(c) == 1 for c in sched)
        (qa, qb, ka, kb, wl, wr), = sched[0]
        assert (qa, qb, ka, kb, wl, wr) == (0, n, 0, n, -1, 0)  # local causal
        for calls in sched[1:]:
            (qa, qb, ka, kb, wl, wr), = calls
            assert (qb - qa) * (kb - ka) == n * n // 2 and (wl, wr) == (-1, -1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one GPU per rank)")
def test_context_parallel_nccl():
    """The same checks with NCCL, one GPU per rank, real kernels (bf16 / fp32-TF32), larger shards."""
    cases = [_ring(layout="zigzag", causal=True, Hq=8, Hkv=2, n=512, D=128, Dv=128, dtype="bf16", repeat=True),
             _ring(layout="contiguous", causal=True, window=[300, -1], n=384, D=64, Dv=64, dtype="bf16"),
             _ring(layout="zigzag", causal=False, n=256, D=80, Dv=80),
             dict(op="lightning", n=300, D=64, Dv=64, dtype="bf16"), dict(op="errors")]
    _launch(2, cases, device="cuda")
