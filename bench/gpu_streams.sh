#!/usr/bin/env bash
# Issue 25's GPU figures in three device calls made one right after the other (the machine stays warm 30 s), because
# Ray's pack (../shared/device/pack-ray.sh, with pynvvideocodec==2.2.4) and the tracker's (bench/pack_video_site.sh)
# do not fit in one call's 64 MiB. The GPU machine has no PyAV: make the clips here first, 20 s each:
#   python -c "from bench.streams import make_clip, SIZES; from pathlib import Path; [make_clip(Path('.gpuclips') /
#              f'{n}.mp4', *SIZES[n], 20.0) for n in ('720p', '1080p')]"
# Call 1, carry [".devsite/site.tar.xz", ".gpuclips"]:  bash bench/gpu_streams.sh ray
#   unpacks Ray into .devsite/site (kept on the warm machine), then the real NVDEC library's test and the ceiling
#   of the clips' frames (bench/nvdec.py's probe is left out: docs/results/nvdec-h100-probe.txt has it).
# Call 2, carry [".devsite/video.tar.xz", ".gpuclips"]: bash bench/gpu_streams.sh streams
#   adds the tracker's pack and runs bench.streams on NVDEC (file sources, played at their own rate), with the
#   ceiling of the same clips in the same run: two stream workers, frames kept on the device against through the
#   host (docs/benchmarks.md, "Live streams per GPU", has the earlier runs: workers 0, 2, 3, 4; intervals 0, 2).
# Call 3, carry [".gpuclips"]: bash bench/gpu_streams.sh video   (the packs stay unpacked on the warm machine)
set -uo pipefail
site=.devsite/site
O=${OUT:-bench/out/gpu}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/$site:$PWD" PATH="$PWD/$site/bin:$PATH"
nvidia-smi -L
case "${1:-}" in
  ray)
    mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site" || exit 1
    timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_nvdec_reader.py -k "real or chosen or cannot_run or only_where" 2>&1 | tail -n 25
    timeout 150 python3 -m bench.ceiling --device cuda --fp16 --batch 16 --clips .gpuclips/720p.mp4 \
      .gpuclips/1080p.mp4 --out "$O/ceiling-clips.json" | tail -n 6
    ;;
  streams)
    [ -d "$site/ray" ] || { echo "run 'ray' first, on this warm machine"; exit 1; }
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    timeout 540 python3 -m bench.streams --device cuda --backend torch --fp16 --clips .gpuclips --sizes 720p 1080p \
      --counts 8 12 16 --all-counts --intervals 0 --workers 2 --frames-on-device auto false --seconds 6 --ceiling \
      --out "$O/streams-gpu.json" \
      2> "$O/streams.err" | tail -n 50
    tail -n 5 "$O/streams.err"
    ;;
  video)
    [ -d "$site/supervision" ] || { echo "run 'ray' and 'streams' first, on this warm machine"; exit 1; }
    for w in 2 0; do  # /v1/video on two stream workers, then in the ingress alone
      timeout 280 python3 -m bench.video --device cuda --backend torch --fp16 --layout ingress --clip .gpuclips/720p.mp4 \
        --videos 1 8 --workers $w --out "$O/video-gpu-nvdec-workers$w.json" 2> "$O/video$w.err" | tail -n 8
    done
    ;;
  *) echo "usage: $0 ray|streams|video"; exit 2 ;;
esac
