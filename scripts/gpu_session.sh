#!/usr/bin/env bash
# One stage of GPU validation / timing, sized for a short offline lease (commands of at most 10 minutes).
#
#   bash scripts/gpu_session.sh OUT STAGE
#
# STAGE: check | tests | bench-softmax | bench-sparse | bench-lightning | bench-varlen | bench-decode | all
# Every stage first installs this checkout with no package index (python -m pip install --no-index
# --no-build-isolation --no-deps -e .: torch, Triton and setuptools must already be installed) and writes
# device, driver, torch, Triton and CUDA versions to OUT/env.txt. Each stage's main command runs under
# `timeout` (TILEATTN_STAGE_SECONDS, default 480 s) so a stage ends inside one 9-minute command; a timed-out
# bench stage keeps what it measured and continues where it stopped when run again with the same OUT.
#   check            import + one tiny kernel call (fwd+bwd, float64-checked); on CPU under the interpreter
#   tests            the test suite on CUDA: gpu-marked tests first, then the rest; per-test timeout
#                    TILEATTN_TEST_TIMEOUT (default 240 s); OUT/tests-gpu.log, tests-rest.log, summary.txt
#   bench-softmax    softmax fwd/bwd, bf16, D 64/128, causal and not, N 512..16k  -> OUT/bench-softmax/
#   bench-sparse     block-sparse densities + windows at N 8k/16k, dense baselines -> OUT/bench-sparse/
#   bench-lightning  lightning fwd/bwd/fwd+bwd, B·H 1x16 (N 1k..64k) and 8x32 (N 1k..32k) vs fla, softmax -> OUT/bench-lightning/
#   bench-varlen     packed mixed-length documents (16k tokens) vs padded and Flex -> OUT/bench-varlen/
#   bench-decode     one query over a KV cache, B 1/8/64, cache 1k..128k: K/V GB/s as a fraction of a
#                    device copy, paged + contiguous vs SDPA and Flex            -> OUT/bench-decode/
#   all              every stage above, in that order
set -uo pipefail

STAGES="check tests bench-softmax bench-sparse bench-lightning bench-varlen bench-decode"
usage() {
  echo "usage: bash scripts/gpu_session.sh OUT STAGE   (STAGE: ${STAGES// / | } | all)" >&2
  exit 2
}
[ $# -eq 2 ] || usage
OUT=$1
STAGE=$2
case " $STAGES all " in *" $STAGE "*) ;; *) echo "unknown stage '$STAGE'" >&2; usage ;; esac
LIMIT=${TILEATTN_STAGE_SECONDS:-480}
TEST_TIMEOUT=${TILEATTN_TEST_TIMEOUT:-240}
for v in "$LIMIT" "$TEST_TIMEOUT"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "TILEATTN_STAGE_SECONDS / TILEATTN_TEST_TIMEOUT must be positive integers" >&2; exit 2; }
done

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}

echo "== install (no index, no build isolation) -> $OUT/install.log"
if ! "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
  tail -20 "$OUT/install.log" >&2
  echo "install failed (needs setuptools and wheel in this environment: the GPU image has them)" >&2
  exit 1
fi
: > "$OUT/env.txt"
"$PY" scripts/session_env.py --out "$OUT/env.txt" || exit 1
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || exit 1

need_cuda() {
  if [ "$HAS_CUDA" != 1 ]; then
    echo "stage $1 needs a CUDA device (none here); on CPU run: python -m pytest -q -n 2 tests / python -m bench" >&2
    return 1
  fi
}

# timeout sends SIGINT first: pytest and python -m bench stop cleanly and write what they have
run_limited() { timeout --signal=INT --kill-after=30 "$LIMIT" "$@"; }

stage_check() {
  echo "== check"
  run_limited "$PY" scripts/session_env.py --check 2>&1 | tee "$OUT/check.log"
  return "${PIPESTATUS[0]}"
}

stage_tests() {
  need_cuda tests || return 1
  local xdist=() rc1 rc2 t0 left
  if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 4); fi
  echo "== tests (TILEATTN_TEST_TIMEOUT=$TEST_TIMEOUT s per test; ${xdist[*]:-no pytest-xdist: one process})"
  t0=$SECONDS
  TILEATTN_TEST_TIMEOUT=$TEST_TIMEOUT run_limited "$PY" -m pytest -q -rfE -p no:cacheprovider "${xdist[@]}" \
      -m gpu tests 2>&1 | tee "$OUT/tests-gpu.log"
  rc1=${PIPESTATUS[0]}
  left=$((LIMIT - (SECONDS - t0)))
  if [ "$left" -lt 60 ]; then
    echo "no time left for the non-gpu tests" | tee "$OUT/tests-rest.log"
    rc2=124
  else
    TILEATTN_TEST_TIMEOUT=$TEST_TIMEOUT timeout --signal=INT --kill-after=30 "$left" "$PY" -m pytest -q -rfE \
        -p no:cacheprovider "${xdist[@]}" -m "not gpu" tests 2>&1 | tee "$OUT/tests-rest.log"
    rc2=${PIPESTATUS[0]}
  fi
  {
    echo "tests -m gpu: exit $rc1: $(tail -n 1 "$OUT/tests-gpu.log")"
    echo "tests -m 'not gpu': exit $rc2: $(tail -n 1 "$OUT/tests-rest.log")"
  } | tee "$OUT/summary.txt"
  [ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
}

# python -m bench with --resume: a rerun with the same OUT measures only what is missing
bench() {
  local name=$1; shift
  need_cuda "$name" || return 1
  mkdir -p "$OUT/$name"
  echo "== $name -> $OUT/$name"
  run_limited "$PY" -m bench --dtypes bf16 --modes fwd,bwd --resume --out "$OUT/$name" "$@" 2>&1 \
      | tee "$OUT/$name/bench.log"
  return "${PIPESTATUS[0]}"
}

stage_bench-softmax() {
  bench bench-softmax --ops softmax --head-dims 64,128 --causal both --lengths 512,1k,2k,4k,8k,16k \
      --providers tileattn,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math,flex
}

stage_bench-sparse() {
  bench bench-sparse --ops sparse --lengths 8k,16k --providers tileattn,flex,sdpa-efficient,sdpa-flash
}

stage_bench-lightning() {
  bench bench-lightning --ops lightning --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,bwd,fwdbwd \
      --providers tileattn-lightning,fla-simple-gla,lightning-attn,tileattn,sdpa-flash
}

stage_bench-varlen() {
  bench bench-varlen --ops varlen --lengths 16k
}

# forward only (--modes is ignored by the decode sweep); microsecond calls: shorter do_bench windows
stage_bench-decode() {
  bench bench-decode --ops decode --lengths 1k,2k,4k,8k,16k,32k,64k,128k --warmup 10 --rep 50 \
      --providers copy,tileattn-kvcache,tileattn-kvcache-contig,sdpa-flash,sdpa-efficient,sdpa-cudnn,flex
}

rc=0
for s in $STAGES; do
  if [ "$STAGE" = all ] || [ "$STAGE" = "$s" ]; then
    "stage_$s" || { echo "stage $s FAILED" | tee -a "$OUT/stages.txt"; rc=1; continue; }
    echo "stage $s ok" | tee -a "$OUT/stages.txt"
  fi
done
exit $rc
