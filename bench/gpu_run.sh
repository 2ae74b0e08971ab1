#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md, as run through the device tool (see ../shared/device/README.md):
# torch-backend parity on CUDA, the benchmark without and with the CUDA MPS daemon, and the GPU example
# config served with num_gpus fractions. VARIANTS picks the Serve variants; SERVE=0 skips the serve run.
# Writes at most 8 files under $OUT (default bench/out/gpu).
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import torch, ray, onnxruntime; print('torch', torch.__version__, 'ray', ray.__version__, 'ort', onnxruntime.__version__)"
  python3 -m pytest -q -p no:cacheprovider tests/test_torch_backend.py 2>&1 | tail -n 4
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

BENCH="python3 -m bench.run --device cuda --backend torch --fp16 --standin-size 224 --requests ${REQUESTS:-40} --time-limit 30 --no-unbatched --out $OUT"
$BENCH --variants ${VARIANTS:-serve-defaults by-value} --tag h100 2> "$OUT/bench.err" | tee "$OUT/bench-gpu.md"

export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d; then
  $BENCH --variants by-value --tag h100-mps 2>> "$OUT/bench.err" | tee "$OUT/bench-gpu-mps.md"
  echo quit | nvidia-cuda-mps-control
fi
unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY

if [ "${SERVE:-1}" = 1 ]; then
  serve run examples/faces_gpu.yaml > /tmp/serve.log 2>&1 &
  for _ in $(seq 1 90); do curl -sf 127.0.0.1:8000/healthz > /dev/null && break; sleep 1; done
  { curl -s 127.0.0.1:8000/v1/pipeline; echo
    curl -s -H 'Content-Type: image/png' --data-binary @tests/data/astronaut.png 127.0.0.1:8000/v1/infer; echo; } > "$OUT/gpu-serve.json"
  cat "$OUT/gpu-serve.json"
  ray stop --force > /dev/null 2>&1
fi
