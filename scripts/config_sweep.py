"""Sweep candidate tile configs of the softmax-attention kernels through AOT compilation (no GPU) and
print, per family (16-bit sm90 / sm80, bias-tensor mask90 / mask, fp32_90 / fp32) and head-dim bucket,
the ones that compile with zero spills and within shared memory in every mask variant. Used to build the config tables in
``kernels/attention.py``; timing-based choice among the survivors needs a GPU (autotune does it).

    python scripts/config_sweep.py [--kernels fwd,bwd_dq,bwd_dkdv] [--families sm90,mask90] [--jobs 2]
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3),
            (128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    "bwd": [(64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2),
            (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
}
SMALL_CANDIDATES = [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)]
# dK/dV tiles in the swapped orientation (BLOCK_M, BLOCK_N, warps, stages, BLOCK_B, SWAP): the query step is
# the M of S / dP (64 rows per warpgroup), the head dim the M of the transposed accumulators
SWAPPED_CANDIDATES = [(128, 64, 8, 2, 128, True), (128, 64, 8, 1, 128, True), (128, 32, 8, 1, 128, True),
                      (64, 32, 4, 1, 64, True), (64, 16, 4, 1, 64, True)]


def _job(args):
    tag, family, bucket, config, variant, arch = args
    from tileattn._aot import compile_spec
    from tileattn.kernels.attention import make_spec

    spec = make_spec(tag, family, bucket, config, variant)
    if spec is None:
        return args, None
    return args, compile_spec(spec, arch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default="fwd,bwd_dq,bwd_dkdv")
    ap.add_argument("--families", default="sm90,sm80,mask,mask90,fp32,fp32_90")
    ap.add_argument("--buckets", default="64,128,256")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    from tileattn.kernels.attention import _FAMILY_ARCHS, _FAMILY_VARIANTS

    jobs = []
    for tag in a.kernels.split(","):
        for family in a.families.split(","):
            for bucket in map(int, a.buckets.split(",")):
                cands = (SMALL_CANDIDATES if family in ("fp32", "mask")
                         else CANDIDATES["fwd" if tag == "fwd" else "bwd"])
                if tag == "bwd_dkdv" and family.endswith("90"):
                    cands = cands + SWAPPED_CANDIDATES
                for config in cands:
                    for variant in _FAMILY_VARIANTS[family]:
                        for arch in _FAMILY_ARCHS[family]:
                            jobs.append((tag, family, bucket, config, variant, arch))
    bad = set()
    seen = set()
    with ProcessPoolExecutor(a.jobs) as ex:
        for (tag, family, bucket, config, variant, arch), row in ex.map(_job, jobs):
            key = (tag, family, bucket, config)
            seen.add(key)
            if row is None:
                continue
            ok = not row["error"] and not row["spills"] and not row["smem_over"]
            print(f"{'ok  ' if ok else 'BAD '} {row['name']:70s} sm_{arch} regs={row['regs']} "
                  f"stack={row['stack']} smem={row['shared']} {row['error'] or ''}", flush=True)
            if not ok:
                bad.add(key)
    print("\nspill-free in every variant and arch:")
    for key in sorted(seen):
        if key not in bad:
            print("  ", key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
