#!/usr/bin/env bash
# One device call that does a session's GPU work in order of importance, each step under its own
# time cap (a step that runs out is cut; what it wrote under $OUT stays): card facts, the kernel
# tests compiled for the GPU (bits == oracle), host time per attention call (hot path vs checked
# vs SDPA), the quantizer's variants, the whole-model benchmark,
# the fidelity run on the DINOv2 photos (when .fidelity/ was carried), the kernel benchmark.
#   bash tools/device_session.sh            (writes under $OUT, default ./out)
# Caps (seconds) from the environment: TESTS_S, HOST_S, QUANT_S, MODELS_S, BENCH_S, FIDELITY_S (they sum to
# under 600 s, the device machine's limit for one command).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
step() {  # step NAME CAP CMD...: run CMD under a time cap, log to $OUT/NAME.log, print its tail
  local name=$1 cap=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s (cap $cap s)"; tail -n "${TAIL:-12}" "$OUT/$name.log"
}
step tests "${TESTS_S:-120}" python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
  tests/test_oracle_equality.py tests/test_attention_api.py tests/test_quant_kernels.py tests/test_static_inputs.py \
  tests/test_heads_per_program.py tests/test_ivit_baseline.py tests/test_get_kernel.py tests/test_models.py \
  tests/test_properties.py tests/test_hotpath.py tests/test_fastlaunch.py
step host "${HOST_S:-35}" bash -c 'for s in 1,12,197,64 1,6,197,64; do python3 tools/profile_call.py --packed --shape $s | head -17; done'
step quant "${QUANT_S:-80}" python3 tools/bench_quant.py --out "$OUT" --workloads A3,vit_b_384,A4,dinov2_b_518,A2 --batches 64,8
step models "${MODELS_S:-150}" python3 tools/bench_models.py --out "$OUT" --models vit_t,vit_s,vit_b,deit_s,swin_t,vit_b_384 \
  --batches 1,64 --repeats 3 --iters 10
if [ -d .fidelity ]; then
  step fidelity "${FIDELITY_S:-60}" python3 tools/fidelity.py run --device cuda --configs default --scales dynamic,static --dtype float16
fi
step bench "${BENCH_S:-140}" python3 tools/bench.py --out "$OUT" --time-budget $(( ${BENCH_S:-140} - 40 )) \
  --workloads A1,A2,A3,A4,A5,A6,A7,vit_b_384,dinov2_b --batches 1,8,64
