#!/usr/bin/env bash
# The GPU-bound ceiling before and after, in one device call on one card: the engines, deployments and serve_app of
# a baseline commit (exported into .baseline/ by `git archive <commit> engines deployments serve_app | tar -x -C
# .baseline`, carried) against the working tree's, both measured by this tree's bench/ceiling.py; then the CUDA
# tests of the GPU detector and the device crops. Each step has its own time limit, so the call ends in time.
set -uo pipefail
export PYTHONUNBUFFERED=1
O=${OUT:-bench/out/gpu}; mkdir -p "$O"; ROOT=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/gpu.txt"
C="python3 -m bench.ceiling --device cuda --fp16 --batch 16 --repeats 10"
ln -sfn ../models .baseline/models  # the config's model paths are relative to the working directory
(cd .baseline && PYTHONPATH="$ROOT/.baseline:$ROOT:${PYTHONPATH:-}" timeout 75 $C --crops per-frame \
  --out "$O/ceiling-before.json" 2> "$O/before.err"); echo "before rc $?"
timeout 75 $C --crops per-frame --out "$O/ceiling-after-per-frame-crops.json" 2> "$O/after-per-frame.err"
echo "after (crops per frame) rc $?"
timeout 75 $C --host-profile 25 --out "$O/ceiling-after.json" 2> "$O/after.err"; echo "after rc $?"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_mtcnn_torch.py tests/test_device_crops.py 2>&1 | tail -n 6
tail -n 2 "$O"/*.err
