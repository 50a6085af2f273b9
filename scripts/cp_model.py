"""Communication vs compute per step of context parallelism (tileattn.distributed): a MODEL, not a measurement.

    python scripts/cp_model.py [--tflops 400] [--link-gbs 200] [--ib-gbs 50] [--hq 32] [--hkv 8]

Ring attention (zigzag causal; every step is half of an (N/W x N/W) block): bytes a rank sends per step and
the FLOPs it computes in that step, with the FLOP convention 4*B*H*Nq*Nk*D forward, x2.5 backward. The
transfer of the next block overlaps the current block's compute, so communication is hidden while
t_comm < t_compute. Times use the assumed rates below (sustained attention TFLOP/s, point-to-point GB/s of
one direction), which are assumptions, not measurements. LASP-2 lightning attention: one all-gather of the
end states per call, independent of N. Prints Markdown tables (the README's).
"""
from __future__ import annotations

import argparse


def ring_step(N: int, W: int, D: int, *, B: int = 1, Hq: int = 32, Hkv: int = 8, elem: int = 2,
              causal: bool = True) -> dict:
    """Per-step bytes sent by one rank (forward, backward) and FLOPs (forward, backward) of ring attention."""
    n = N // W
    kv = B * Hkv * n * 2 * D  # K and V elements of one shard (Dv = D)
    pairs = n * n // 2 if causal else n * n  # zigzag causal: half a block per step
    fwd_flops = 4 * B * Hq * pairs * D
    return dict(n=n, fwd_bytes=kv * elem, bwd_bytes=kv * elem + kv * 4,  # + fp32 dK/dV accumulators
                fwd_flops=fwd_flops, bwd_flops=2.5 * fwd_flops)


def lightning_call(N: int, W: int, D: int, *, B: int = 1, H: int = 32, chunk: int = 64) -> dict:
    """Bytes one rank contributes to the state all-gather, and its local FLOPs (chunked form, forward)."""
    n = N // W
    state = B * H * D * D * 4
    flops = 2 * B * H * n * (chunk * 2 * D + 2 * D * D) + 2 * B * H * n * D * D  # intra + inter + prefix term
    return dict(n=n, state_bytes=state, gather_bytes=(W - 1) * state, flops=flops)


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflops", type=float, default=400.0, help="assumed sustained attention TFLOP/s (bf16)")
    ap.add_argument("--link-gbs", type=float, default=200.0, help="assumed intra-node P2P GB/s (NVLink)")
    ap.add_argument("--ib-gbs", type=float, default=50.0, help="assumed inter-node GB/s per GPU (400 Gb/s IB)")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    a = ap.parse_args()
    us = lambda flops: flops / (a.tflops * 1e12) * 1e6  # noqa: E731
    link = lambda b, gbs: b / (gbs * 1e9) * 1e6  # noqa: E731
    print(f"Ring attention, zigzag causal, B=1, Hq={a.hq}, Hkv={a.hkv}, bf16, Dv=D. MODEL: {a.tflops:.0f} TFLOP/s, "
          f"P2P {a.link_gbs:.0f} GB/s (NVLink) / {a.ib_gbs:.0f} GB/s (IB). Times per ring step in microseconds.\n")
    print("| N | world | D | N/world | sent/step fwd | sent/step bwd | compute fwd (us) | comm fwd NVLink / IB (us) "
          "| compute bwd (us) | comm bwd NVLink / IB (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for N, W in ((32768, 8), (131072, 8), (131072, 32), (1 << 20, 32), (1 << 20, 64)):
        for D in (64, 128):
            m = ring_step(N, W, D, Hq=a.hq, Hkv=a.hkv)
            print(f"| {_k(N)} | {W} | {D} | {_k(m['n'])} | {_fmt_bytes(m['fwd_bytes'])} | {_fmt_bytes(m['bwd_bytes'])} "
                  f"| {us(m['fwd_flops']):.0f} | {link(m['fwd_bytes'], a.link_gbs):.0f} / {link(m['fwd_bytes'], a.ib_gbs):.0f} "
                  f"| {us(m['bwd_flops']):.0f} | {link(m['bwd_bytes'], a.link_gbs):.0f} / "
                  f"{link(m['bwd_bytes'], a.ib_gbs):.0f} |")
    print(f"\nLightning attention (LASP-2), B=1, H={a.hq}, D=Dv, fp32 states. MODEL as above; one all-gather per "
          "call (forward; the backward all-reduces world x state on gloo, reduce-scatters on NCCL).\n")
    print("| N | world | D | N/world | state per rank | all-gather received | compute fwd (us) | all-gather IB (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for N, W in ((131072, 8), (1 << 20, 32), (1 << 20, 64)):
        for D in (64, 128):
            m = lightning_call(N, W, D, H=a.hq)
            print(f"| {_k(N)} | {W} | {D} | {_k(m['n'])} | {_fmt_bytes(m['state_bytes'])} | "
                  f"{_fmt_bytes(m['gather_bytes'])} | {us(m['flops']):.0f} | {link(m['gather_bytes'], a.ib_gbs):.0f} |")


if __name__ == "__main__":
    main()
