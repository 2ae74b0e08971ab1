#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md, as run through the device tool (see ../shared/device/README.md and
# docs/benchmarks.md): the CUDA tests of the torch backend and the GPU-resident MTCNN (PARITY=1), the engines
# alone in one process (ENGINES=1: bench/engines_gpu.py), then `bench.run` on the GPU (BENCH=1) with the
# variants named in VARIANTS (default: the three layouts behind HAProxy) on both images, then `bench.video` (VIDEO=1:
# the face demo, 1 and 8 videos at once, the shipped replica counts).
# GPUS="1 2" runs every variant on one card and on two side by side (issue 19; needs a two-GPU machine).
# Writes its files under $OUT (default bench/out/gpu); TAG names the JSON.
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import torch, ray, onnxruntime; print('torch', torch.__version__, 'ray', ray.__version__, 'ort', onnxruntime.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [ "${PARITY:-1}" = 1 ]; then
  python3 -m pytest -q -s -p no:cacheprovider tests/test_torch_backend.py tests/test_mtcnn_torch.py \
    tests/test_torch_boxes.py tests/test_preprocess.py tests/test_execution.py > "$OUT/tests.txt" 2>&1
  grep -E "deviation|passed|failed|Error" "$OUT/tests.txt" | tail -n 30
fi
if [ "${ENGINES:-1}" = 1 ]; then
  timeout "${ENGINES_TIMEOUT:-360}" python3 -m bench.engines_gpu --out "$OUT" --parts ${ENGINES_PARTS:-fan_out detectors emotion_tails} \
    2> "$OUT/engines.err" | tee "$OUT/engines.md"
  tail -n 5 "$OUT/engines.err"
fi
if [ "${BENCH:-1}" = 1 ]; then
  python3 -m bench.run --device cuda --backend torch --fp16 --standin-size 224 --requests "${REQUESTS:-30}" \
    --time-limit "${TIME_LIMIT:-20}" --workloads ${WORKLOADS:-face standin} --images ${IMAGES:-one many} \
    --variants ${VARIANTS:-separate+haproxy colocated+haproxy ingress+haproxy} --gpus ${GPUS:-1} \
    --tag "${TAG:-h200}" --out "$OUT" 2> "$OUT/bench.err" | tee "$OUT/bench.md"
  tail -n 20 "$OUT/bench.err"
fi
if [ "${VIDEO:-0}" = 1 ]; then
  RAY_SERVE_ENABLE_HA_PROXY=1 python3 -m bench.video --device cuda --backend torch --fp16 --workload face --frames 200 \
    --videos 1 8 --out "$OUT/video-${TAG:-h200}-face.json" 2> "$OUT/video.err" | tee "$OUT/video.md"
  tail -n 5 "$OUT/video.err"
fi
