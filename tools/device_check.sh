#!/usr/bin/env bash
# On the GPU machine: card facts, the kernel tests compiled for the GPU, then the benchmark.
#   bash tools/device_check.sh [bench args...]      (writes under $OUT, default ./out)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export QFLASH_GEN_CACHE=${QFLASH_GEN_CACHE:-/tmp/qflash-cache} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider tests/test_oracle_equality.py tests/test_attention_api.py \
  tests/test_properties.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 tools/bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
