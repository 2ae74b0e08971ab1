#!/usr/bin/env bash
# One device call, bounded: the CUDA tests of the GPU detector, the stand-in workload, video, then the face
# workload again, each step under its own time limit so the call ends inside the device's 10 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_SERVE_ENABLE_HA_PROXY=1
O=${OUT:-bench/out/gpu}; mkdir -p "$O"
B="python3 -m bench.run --device cuda --backend torch --fp16 --standin-size 224 --requests 20 --time-limit 8 --images one many --variants ingress+haproxy separate+haproxy"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_mtcnn_torch.py 2>&1 | tail -n 2
timeout 250 $B --workloads standin --tag h200-standin --out "$O" 2> "$O/standin.err" > "$O/standin.md"; echo "standin rc $?"
timeout 110 python3 -m bench.video --device cuda --backend torch --fp16 --workload face --frames 200 --videos 1 8 \
  --out "$O/video-h200-face.json" 2> "$O/video.err" > "$O/video.md"; echo "video rc $?"; tail -n 12 "$O/video.md"
timeout 150 $B --workloads face --tag h200-face2 --out "$O" 2> "$O/face.err" > "$O/face.md"; echo "face rc $?"
tail -n 3 "$O/standin.err" "$O/face.err" "$O/video.err"
