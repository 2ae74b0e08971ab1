#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md, as run through the device tool (see ../shared/device/README.md and
# docs/benchmarks.md): torch-backend parity on CUDA, then `bench.run` on the GPU with the variants named in
# VARIANTS (default: the three layouts behind HAProxy and the default layout behind Serve's proxy).
# Writes its files under $OUT (default bench/out/gpu); TAG names the JSON.
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import torch, ray, onnxruntime; print('torch', torch.__version__, 'ray', ray.__version__, 'ort', onnxruntime.__version__)"
  [ "${PARITY:-1}" = 1 ] && python3 -m pytest -q -p no:cacheprovider tests/test_torch_backend.py 2>&1 | tail -n 3
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
python3 -m bench.run --device cuda --backend torch --fp16 --standin-size 224 --requests "${REQUESTS:-30}" \
  --time-limit "${TIME_LIMIT:-20}" --workloads ${WORKLOADS:-face standin} \
  --variants ${VARIANTS:-separate+haproxy colocated+haproxy ingress+haproxy separate} \
  --tag "${TAG:-h200}" --out "$OUT" 2> "$OUT/bench.err" | tee "$OUT/bench.md"
tail -n 20 "$OUT/bench.err"
