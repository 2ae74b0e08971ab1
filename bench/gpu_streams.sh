#!/usr/bin/env bash
# Issue 25's GPU figures in three device calls made one right after the other (the machine stays warm 30 s), because
# Ray's pack (../shared/device/pack-ray.sh, with pynvvideocodec==2.2.4) and the tracker's (bench/pack_video_site.sh)
# do not fit in one call's 64 MiB. The GPU machine has no PyAV: make the clips here first, 20 s each:
#   python -c "from bench.streams import make_clip, SIZES; from pathlib import Path; [make_clip(Path('.gpuclips') /
#              f'{n}.mp4', *SIZES[n], 20.0) for n in ('720p', '1080p')]"
# Call 1, carry [".devsite/site.tar.xz", ".gpuclips"]:  bash bench/gpu_streams.sh ray
#   unpacks Ray into .devsite/site (kept on the warm machine), then the real NVDEC library's test and what a Ray
#   streaming hop costs a record there (bench/stream_hops.py).
# Call 2, carry [".devsite/video.tar.xz", ".gpuclips"]: bash bench/gpu_streams.sh streams
#   adds the tracker's pack; one worker's process alone, profiled (bench/host_profile.py: 8 streams with and
#   without detection ahead, 12 and 16), then bench.streams on NVDEC (file sources, played at their own rate),
#   720p on two stream workers, with the ceiling of the same clip in the same run (docs/benchmarks.md, "Live
#   streams per GPU", has the earlier runs: workers 0, 2, 3, 4; intervals 0, 2).
# Call 3, carry [".gpuclips"]: bash bench/gpu_streams.sh video   (the packs stay unpacked on the warm machine):
#   1080p on two workers, then /v1/video on two stream workers against the ingress alone.
set -uo pipefail
site=.devsite/site
O=${OUT:-bench/out/gpu}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/$site:$PWD" PATH="$PWD/$site/bin:$PATH"
nvidia-smi -L
case "${1:-}" in
  ray)
    mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site" || exit 1
    timeout 60 python3 -m bench.gil_probe --clip .gpuclips/720p.mp4 --readers 1 8 2>&1 | tail -n 3
    [ -n "${QUICK:-}" ] && exit 0  # QUICK=1: the packs and the GIL probe only
    timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_sync.py tests/test_nvdec_reader.py \
      -k "cuda_engine or real or chosen or cannot_run or only_where" 2>&1 | tail -n 5
    timeout 60 python3 -m bench.stream_hops --seconds 4 2>&1 | grep -v WARN | tail -n 4  # a Ray streaming hop's CPU
    ;;
  variants)  # after 'ray': the defaults with frames on the device and through the host, then detection ahead; 720p
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    common="--device cuda --backend torch --fp16 --clips .gpuclips --sizes 720p --counts 8 12 --all-counts --intervals 0
            --workers 2 --seconds 6"
    timeout 300 python3 -m bench.streams $common --frames-on-device auto false --out "$O/streams-720p-defaults.json" \
      2> "$O/streams-defaults.err" | grep -E "^\| 2|by process"
    [ "${2:-}" = ahead ] && timeout 150 python3 -m bench.streams $common --detect-ahead 1 \
      --out "$O/streams-720p-ahead1.json" 2> "$O/streams-ahead1.err" | grep -E "^\| 2|by process"
    ;;
  video)
    [ -d "$site/supervision" ] || { echo "run 'ray' and 'streams' first, on this warm machine"; exit 1; }
    timeout 200 python3 -m bench.streams --device cuda --backend torch --fp16 --clips .gpuclips --sizes 1080p \
      --counts 4 8 12 16 --intervals 0 --workers 2 --seconds 6 --out "$O/streams-1080p.json" 2> "$O/streams1080.err" | tail -n 12
    for w in 2 0; do  # /v1/video on two stream workers, then in the ingress alone
      timeout 170 python3 -m bench.video --device cuda --backend torch --fp16 --layout ingress --clip .gpuclips/720p.mp4 \
        --videos 1 8 --workers $w --out "$O/video-gpu-nvdec-workers$w.json" 2> "$O/video$w.err" | tail -n 8
    done
    ;;
  *) echo "usage: $0 ray|streams|variants [ahead]|video"; exit 2 ;;
esac
