"""One rank of the context-parallel tests (tests/test_distributed.py runs it as a script, one process per rank,
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set): gloo on CPU, kernels under the Triton interpreter.

    python tests/dist_worker.py '<json list of cases>'

Every rank builds the same full-sequence inputs (seeded), runs the distributed op on its shard and checks
out / lse / states / every gradient against the float64 reference of the full sequence (flash-attention rule:
2x the same-dtype PyTorch error plus a floor) and against the single-process tileattn op.
"""
import os

# DIST_WORKER_DEVICE=cuda: NCCL, one GPU per rank (the gpu-marked test). Otherwise gloo on CPU, where the
# kernels run under the interpreter (set before triton / tileattn are imported), or, with
# DIST_WORKER_INTERPRET=0, tileattn's PyTorch (float64) path.
DEV = os.environ.get("DIST_WORKER_DEVICE", "cpu")
os.environ["TRITON_INTERPRET"] = "0" if DEV == "cuda" else os.environ.get("DIST_WORKER_INTERPRET", "1")

import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import FLOOR, TF32_FLOOR, assert_close, rel_err  # noqa: E402

import tileattn  # noqa: E402
from tileattn import distributed as tdist  # noqa: E402
from tileattn.kernels.utils import set_poison  # noqa: E402
from tileattn.reference import attention_ref, linear_attention_quadratic_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _randn(gen, *shape, dtype, bnhd=False):
    if bnhd:  # a non-contiguous (B, H, N, D) view of a (B, N, H, D) buffer
        b, h, n, d = shape
        return torch.randn(b, n, h, d, generator=gen).to(DEV, dtype).transpose(1, 2)
    return torch.randn(*shape, generator=gen).to(DEV, dtype)


def _floor(dtype):
    """The dtype's floor; fp32 on a GPU runs TF32 dots (documented), so its floor is TF32's."""
    return TF32_FLOOR if DEV == "cuda" and dtype == torch.float32 else FLOOR[dtype]


def _close_to_single(name, ours, single, ref64, ref_lp, dtype):
    """Also equal (same tolerance) to the single-process tileattn op on the full sequence."""
    tol = 2 * rel_err(ref_lp, ref64) + _floor(dtype)
    err = rel_err(ours, single)
    assert err <= tol, f"{name}: rel err vs single-process tileattn {err:.3g} > {tol:.3g}"


def ring_case(world, rank, group=None, *, B=1, Hq=2, Hkv=1, n=10, D=16, Dv=16, dtype="fp32", causal=False, window=None,
              layout="zigzag", bnhd=False, repeat=False, seed=0):
    dt = DTYPES[dtype]
    N = n * world
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, B, Hq, N, D, dtype=dt, bnhd=bnhd)
    k = _randn(gen, B, Hkv, N, D, dtype=dt, bnhd=bnhd)
    v = _randn(gen, B, Hkv, N, Dv, dtype=dt, bnhd=bnhd)
    do = torch.randn(B, Hq, N, Dv, generator=gen).to(DEV, dt)
    dlse = torch.randn(B, Hq, N, generator=gen).to(DEV)
    window = None if window is None else tuple(window)

    # full-sequence references: float64, same-dtype PyTorch, single-process tileattn
    refs = {}
    for name in ("64", "lp", "single"):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if name == "single":
            o, l = tileattn.attention(qq, kk, vv, causal=causal, window=window, return_lse=True)
        else:
            o, l = attention_ref(qq, kk, vv, causal=causal, window=window, upcast=name == "64")
        loss = (o.double() * do.double()).sum() + (l.double() * dlse.double()).sum()
        loss.backward()
        refs[name] = (o.detach(), l.detach(), qq.grad, kk.grad, vv.grad)

    shard = lambda x: tdist.shard_sequence(x, group=group, layout=layout)  # noqa: E731
    grads = []
    for _ in range(2 if repeat else 1):
        ql, kl, vl = (shard(x).detach().requires_grad_() for x in (q, k, v))
        if bnhd and layout == "contiguous":
            assert not ql.is_contiguous()
        out_l, lse_l = tdist.ring_attention(ql, kl, vl, group=group, causal=causal, window=window, layout=layout,
                                            return_lse=True)
        assert out_l.dtype == dt and out_l.shape == (B, Hq, n, Dv) and lse_l.dtype == torch.float32
        ((out_l.double() * shard(do).double()).sum() + (lse_l.double() * shard(dlse).double()).sum()).backward()
        grads.append((ql.grad, kl.grad, vl.grad))
    if repeat:  # deterministic backward: bitwise equal over repeats
        for a, b in zip(*grads):
            assert torch.equal(a, b), "ring_attention backward is not deterministic"
    out = tdist.unshard_sequence(out_l.detach(), group=group, layout=layout)
    lse = tdist.unshard_sequence(lse_l.detach(), group=group, layout=layout)
    ours = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        r64, rlp, single = (refs[x][i] for x in ("64", "lp", "single"))
        if i >= 2:
            r64, rlp, single = shard(r64), shard(rlp), shard(single)
        assert_close(f"ring {name} [rank {rank}]", ours[name], r64, rlp, dtype=dt, floor=_floor(dt))
        _close_to_single(f"ring {name} [rank {rank}]", ours[name], single, r64, rlp, dt)


def lightning_case(world, rank, group=None, *, B=1, H=2, n=9, D=16, Dv=8, dtype="fp32", decay=True, init=True, seed=0):
    dt = DTYPES[dtype]
    N = n * world
    gen = torch.Generator().manual_seed(seed)
    q, k = (_randn(gen, B, H, N, D, dtype=dt) for _ in range(2))
    v = _randn(gen, B, H, N, Dv, dtype=dt)
    h0 = torch.randn(B, H, D, Dv, generator=gen).to(DEV) if init else None
    rates = tileattn.lightning_decay_rates(H, device=DEV) * 0.25 if decay else None
    do = torch.randn(B, H, N, Dv, generator=gen).to(DEV, dt)
    dS = torch.randn(B, H, D, Dv, generator=gen).to(DEV)
    end = (rank + 1) * n  # this rank's end state is the state after token end - 1

    refs = {}
    for name in ("64", "lp", "single"):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        hh = None if h0 is None else h0.clone().requires_grad_()
        if name == "single":
            o, s = tileattn.lightning_attention(qq, kk, vv, rates, initial_state=hh, output_final_state=True)
        else:
            o, s = linear_attention_quadratic_ref(qq, kk, vv, rates, initial_state=hh, upcast=name == "64")
        loss = (o.double() * do.double()).sum() + (s.double() * dS.double()).sum()
        loss.backward()
        with torch.no_grad():  # the state after this rank's last token
            _, s_end = linear_attention_quadratic_ref(q[:, :, :end], k[:, :, :end], v[:, :, :end], rates,
                                                      initial_state=h0, upcast=name == "64")
        refs[name] = (o.detach(), s_end, qq.grad, kk.grad, vv.grad, None if hh is None else hh.grad)

    shard = lambda x: tdist.shard_sequence(x, group=group, layout="contiguous")  # noqa: E731
    ql, kl, vl = (shard(x).detach().requires_grad_() for x in (q, k, v))
    hl = None if h0 is None else h0.clone().requires_grad_()
    out_l, state = tdist.lightning_attention_cp(ql, kl, vl, rates, group=group, initial_state=hl,
                                                output_final_state=True)
    assert out_l.dtype == dt and out_l.shape == (B, H, n, Dv) and state.dtype == torch.float32
    loss = (out_l.double() * shard(do).double()).sum()
    if rank == world - 1:  # the full sequence's final state lives on the last rank
        loss = loss + (state.double() * dS.double()).sum()
    loss.backward()
    out = tdist.unshard_sequence(out_l.detach(), group=group, layout="contiguous")
    ours = {"out": out, "state": state.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    for i, name in enumerate(("out", "state", "dq", "dk", "dv")):
        r64, rlp, single = (refs[x][i] for x in ("64", "lp", "single"))
        if i >= 2:
            r64, rlp, single = shard(r64), shard(rlp), shard(single)
        assert_close(f"lightning_cp {name} [rank {rank}]", ours[name], r64, rlp, dtype=dt, floor=_floor(dt))
        if name != "state":  # (the single-process op gives only the full sequence's final state)
            _close_to_single(f"lightning_cp {name} [rank {rank}]", ours[name], single, r64, rlp, dt)
    if init:
        if rank == 0:
            assert_close("lightning_cp dh0", hl.grad, refs["64"][5], refs["lp"][5], dtype=torch.float32,
                         floor=_floor(dt))
        else:
            assert hl.grad is None, "initial_state is read on rank 0 only"


def _expect_value_error(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"wrong message: {e}"
        return
    raise AssertionError(f"no ValueError ({match})")


def errors_case(world, rank):
    x = torch.randn(1, 2, 4 * world, 16, device=DEV)
    _expect_value_error(lambda: tdist.shard_sequence(x, layout="striped"), "unknown shard layout")
    _expect_value_error(lambda: tdist.shard_sequence(x[:, :, :2 * world + 1]), "multiple of")
    odd = torch.randn(1, 2, 5, 16, device=DEV)
    _expect_value_error(lambda: tdist.ring_attention(odd, odd, odd, layout="zigzag"), "even local length")
    _expect_value_error(lambda: tdist.ring_attention(odd, odd, odd, layout="rows"), "unknown shard layout")
    # lengths that differ across ranks: the same ValueError on every rank (no hang)
    n = 4 if rank == 0 else 6
    y = torch.randn(1, 2, n, 16, device=DEV)
    _expect_value_error(lambda: tdist.ring_attention(y, y, y, layout="contiguous"), "differ across ranks")
    _expect_value_error(lambda: tdist.lightning_attention_cp(y, y, y), "differ across ranks")
    _expect_value_error(lambda: tdist.unshard_sequence(y, layout="contiguous"), "differ across ranks")
    # a local check that fails on one rank only: that rank raises its own error, the others name it (no hang)
    z = torch.randn(1, 2, 4 if rank == 0 else 5, 16, device=DEV)
    _expect_value_error(lambda: tdist.ring_attention(z, z, z, layout="zigzag"),
                        "rejected" if rank == 0 else "even local length")
    h_bad = torch.zeros(1, 2, 16, 3, device=DEV)  # wrong Dv, read on rank 0 only
    _expect_value_error(lambda: tdist.lightning_attention_cp(x, x, x, initial_state=h_bad),
                        "initial_state" if rank == 0 else "rejected")


def frozen_case(world, rank, n=6):
    """Only rank 0's initial_state is learned (q, k, v frozen): every rank's backward still reaches the state
    exchange and the initial state's gradient includes every rank's outputs."""
    gen = torch.Generator().manual_seed(3)
    N, H, D = n * world, 2, 8
    q, k, v = (torch.randn(1, H, N, D, generator=gen).to(DEV) for _ in range(3))
    h0 = torch.randn(1, H, D, D, generator=gen).to(DEV)
    rates = tileattn.lightning_decay_rates(H, device=DEV) * 0.25
    hr = h0.clone().requires_grad_()
    ref = linear_attention_quadratic_ref(q, k, v, rates, initial_state=hr, upcast=True)[0]
    ref.sum().backward()
    shard = lambda x: tdist.shard_sequence(x, layout="contiguous")  # noqa: E731
    hl = h0.clone().requires_grad_()
    out = tdist.lightning_attention_cp(shard(q), shard(k), shard(v), rates, initial_state=hl)
    assert out.requires_grad, f"rank {rank}: the output depends on rank 0's initial state"
    out.sum().backward()
    if rank == 0:
        assert_close("frozen dh0", hl.grad, hr.grad, None, dtype=torch.float32, floor=1e-5)


def main():
    cases = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore", message=".*slow PyTorch reference path")
    set_poison(True)  # kernel output buffers start as NaN: an unwritten element fails the checks
    if DEV == "cuda":
        torch.cuda.set_device(int(os.environ["RANK"]))
    dist.init_process_group("nccl" if DEV == "cuda" else "gloo", timeout=timedelta(seconds=120))
    world, rank = dist.get_world_size(), dist.get_rank()
    fns = {"ring": ring_case, "lightning": lightning_case, "errors": errors_case, "frozen": frozen_case}
    for case in cases:
        case = dict(case)
        op, groups = case.pop("op"), case.pop("groups", None)
        if groups is None:
            fns[op](world, rank, **case)
            continue
        # sub-groups (e.g. [[0, 2], [1, 3]]: context parallelism inside each, as with data x context parallel);
        # every rank creates every group, in the same order
        made = [dist.new_group(g) for g in groups]
        mine = next(i for i, g in enumerate(groups) if rank in g)
        fns[op](dist.get_world_size(made[mine]), dist.get_rank(made[mine]), made[mine], **case)  # (sorted ranks)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
