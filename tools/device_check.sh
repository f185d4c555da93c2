#!/usr/bin/env bash
# On the GPU machine: card facts, the kernel tests compiled for the GPU, then the benchmark.
#   bash tools/device_check.sh [bench args...]      (writes under $OUT, default ./out)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider tests/test_oracle_equality.py tests/test_attention_api.py \
  tests/test_properties.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 tools/bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
