#!/usr/bin/env bash
# One-shot GPU validation + timing for a short GPU lease (e.g. the device tool's 10-minute commands).
# Run from the repo root on a machine with an NVIDIA GPU and torch + triton installed:
#   bash scripts/gpu_session.sh [OUT_DIR] [tests|bench|all]
# Writes test logs and benchmark results under OUT_DIR (default bench/out/gpu_session).
set -uo pipefail
OUT=${1:-bench/out/gpu_session}
WHAT=${2:-all}
mkdir -p "$OUT"
python -m pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
if [ "$WHAT" = tests ] || [ "$WHAT" = all ]; then
  # every test on CUDA (conftest picks cuda when present), GPU-only tests included
  timeout 420 python -m pytest -q -x tests/test_attention.py tests/test_block_sparse.py tests/test_lightning.py \
      tests/test_sdpa.py tests/test_weights.py 2>&1 | tail -30 | tee "$OUT/tests.txt"
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  timeout 500 python -m bench --ops softmax --dtypes bf16 --head-dims 64,128 --lengths 1k,4k,16k \
      --modes fwd,bwd --out "$OUT/bench" 2>&1 | tail -40 | tee "$OUT/bench.txt"
fi
