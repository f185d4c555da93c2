# Sourced by the device scripts (tools/device_session.sh, tools/device_check.sh): $OUT, card facts
# into $OUT/gpu.txt, the carried wheels (.whl/) on PYTHONPATH, a kernel cache, no interpreter.
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
