#!/usr/bin/env bash
# The fixed-shape MTCNN (engines/mtcnn_static.py) on the GPU, in two device calls made one right after the other (the
# machine stays warm 30 s; Ray's pack and the tracker's do not fit in one call):
# Call 1, carry [".devsite/site.tar.xz", ".gpuclips"]:  bash bench/gpu_fixed.sh ab
#   the CUDA tests of the cascade, then the detector's host cost per frame with and without fixed shapes, batches of
#   1, 4 and 16, the two images and a 720p stream's frames (bench/fixed_shapes_ab.py).
# Call 2, carry [".devsite/video.tar.xz", ".gpuclips"]: bash bench/gpu_fixed.sh streams
#   one stream worker's process alone (bench/host_profile.py) at 16 and 24 streams, detection ahead 0 and 1, then the
#   service (bench.streams, one and two stream workers, 720p, 12-24 streams, detection ahead $AHEAD, default 1).
# Or call 2, carry [".devsite/video.tar.xz", ".gpuclips/720p.mp4"]: bash bench/gpu_fixed.sh mps
#   one worker's process at 16 and 24 streams with detection ahead (its captures must all hold), the service (through
#   HAProxy) on two stream workers without MPS, then two and three with the CUDA MPS daemon up: one shared context
#   instead of time-sliced ones (two workers without it split their streams into a fast and a slow half). The
#   baseline's counts run twice: every stream's events on one listener (GET /v1/events), and a listener
#   per stream.
# One call, carry [".devsite/site.tar.xz", ".gpuclips/720p.mp4"]: bash bench/gpu_fixed.sh stress
#   the CUDA tests of the engines' captures, then bench/capture_stress.py: which work in other threads (NVDEC
#   readers, default-stream syncs, side streams, empty_cache, device syncs) makes a capture fail.
# Or call 2, carry [".devsite/video.tar.xz", ".gpuclips/720p.mp4"]: bash bench/gpu_fixed.sh feed
#   one worker's process at 16 and 24 streams with detection ahead, then the service (HAProxy, every stream's
#   events on one listener): two workers at 16-24 streams, detector interval 0 and 2; detection two frames ahead;
#   one worker; HD="8 12" adds 1080p streams (carry .gpuclips whole), VIDEO=1 /v1/video with 1 and 8 at once.
# Or call 2, same carry: bash bench/gpu_fixed.sh inflight
#   the streams muxer with one detector batch in flight against two: one process at 16 streams (kernel traced),
#   then the service at 16 and 20 streams (COUNTS), at each of the push timeouts in PUSH (ms, default 33);
#   VIDEO=1 adds /v1/video. FLIGHTS="1 2" (default): which in-flight counts; AHEAD=2: each stream's next two frames
#   detected ahead (a stream whose frame takes longer than two frame times to publish runs out of slots).
# One call, carry [".devsite/site.tar.xz"]: bash bench/gpu_fixed.sh images
#   issue 24's served figures with the ceiling of the same run (bench.run --saturate --ceiling); MPS="variants" again
#   with the CUDA MPS daemon up (VARIANTS= MPS="..." MPS_CEILING=1 MPS_ANCHOR=1: only those, ceiling and anchor in). Then, same warm machine, carry [".devsite/video.tar.xz", ".gpuclips"]:
#   bash bench/gpu_fixed.sh scale: streams per GPU under MPS, three workers, 720p and 1080p, ceilings included.
# One call, carry [".devsite/site.tar.xz"]: bash bench/gpu_fixed.sh pass
#   the device pass alone in one process, two halves on two threads against one (bench/device_pass.py), and the ceiling.
# One call, carry [".devsite/site.tar.xz"]: bash bench/gpu_fixed.sh probe
#   in one process each, no Ray: which limits the eight-face photo needs of the fixed-shape cascade under each
#   largest k1 (bench/fixed_limits.py), the host time of cutting crops on the GPU (bench/crop_host.py), and the
#   device pass at shorter GIL switch intervals (bench/device_pass.py --switch-interval-ms).
# One call, carry [".devsite/site.tar.xz", ".devsite/py-spy.xz"]: bash bench/gpu_fixed.sh spy
#   the ingress replica's CPU per request by thread and function (bench/replica_spy.py), one face and eight.
set -uo pipefail
site=.devsite/site
O=${OUT:-bench/out/gpu}; mkdir -p "$O"
E=${ERR:-/tmp/gpu-logs}; mkdir -p "$E"  # logs stay on the machine: a call brings back only so many files
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/$site:$PWD" PATH="$PWD/$site/bin:$PATH"
nvidia-smi -L
run() {  # the service through HAProxy, as the README runs it; $1: name, $2: time limit, the rest: bench.streams options
  local name=$1 limit=$2; shift 2
  timeout $limit python3 -m bench.streams --device cuda --backend torch --fp16 --clips .gpuclips --sizes 720p \
    --all-counts --seconds 6 --haproxy --out "$O/streams-720p-$name.json" "$@" 2> "$E/streams-$name.err" \
    | grep -E "^\| [1-9]|by process"
}
profile() {  # one stream worker's process alone (no Ray), detection ahead; $1: streams, $2: name, the rest: options
  local streams=$1 name=$2; shift 2
  timeout 100 python3 -m bench.host_profile --clip .gpuclips/720p.mp4 --streams $streams --device cuda \
    --backend torch --fp16 --detect-ahead 1 --top 12 --out "$O/host-profile-$name.json" "$@" 2> "$E/hp-$name.err" \
    | grep -E "^[0-9]+ streams|^-- the GPU|^\{\"events| ms/frame "
  grep -E "will not capture|grown|largest" "$E/hp-$name.err" | cut -c1-220 | sort | uniq -c | head
}
video() {  # /v1/video on two stream workers: one video, then 8 at once (bench/video.py)
  timeout 200 python3 -m bench.video --device cuda --backend torch --fp16 --layout ingress \
    --clip .gpuclips/720p.mp4 --videos 1 8 --workers 2 --out "$O/video-workers2.json" 2> "$E/video.err" > /dev/null
  python3 -c "import json; r=json.load(open('$O/video-workers2.json')); print(json.dumps({k: r.get(k) for k in
    ('detector_alone_fps', 'at_once', 'ratios')}), json.dumps({k: r['video'].get(k) for k in ('frames', 'fps',
    'server_cpu_ms_per_frame')}))" || tail -n 5 "$E/video.err"
}
case "${1:-}" in
  ab)
    mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site" || exit 1
    [ -n "${NOTEST:-}" ] || timeout 200 python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/test_mtcnn_torch.py \
      tests/test_device_crops.py tests/test_torch_backend.py} 2>&1 | grep -E "^E |^FAILED|passed|failed" | head -n 30
    [ -n "${BATCHES-x}" ] || exit 0  # BATCHES= (empty): the tests only
    timeout 360 python3 -m bench.fixed_shapes_ab --clips .gpuclips/720p.mp4 --batches ${BATCHES:-1 4 16} \
      --out "$O/fixed-shapes-ab.json" 2> "$E/fixed-ab.err"
    tail -n 3 "$E/fixed-ab.err"
    ;;
  streams)
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    for a in 0 1; do  # one worker's process alone: detection ahead off and on, fixed shapes (the default on CUDA)
      timeout 100 python3 -m bench.host_profile --clip .gpuclips/720p.mp4 --streams ${HP:-16 24} --device cuda --backend torch \
        --fp16 --detect-ahead $a --top 12 --out "$O/host-profile-ahead$a.json" 2> "$E/hp-$a.err" \
        | grep -E "^[0-9]+ streams|thread CPU"
    done
    timeout 300 python3 -m bench.streams --device cuda --backend torch --fp16 --clips .gpuclips --sizes 720p \
      --counts ${COUNTS:-12 16 20 24} --all-counts --intervals 0 --workers 1 2 --detect-ahead ${AHEAD:-1} --seconds 6 \
      --out "$O/streams-720p-fixed-ahead.json" 2> "$E/streams-fixed.err" | grep -E "^\| [12]|by process"
    ;;
  mps)  # MIF=2: every run with two detector batches in flight (ingress.streams.muxer.batches_in_flight)
    [ -d "$site/ray" ] || { echo "no Ray here: first a call that carries .devsite/site.tar.xz (stress, ab)"; exit 1; }
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    [ -z "${HP-16 24}" ] || profile "${HP:-16 24}" ahead1 ${MIF:+--muxer-in-flight $MIF}
    # BASE= (empty): no baseline without MPS; it runs each count with one listener for all streams and one each
    [ -z "${BASE-16 20}" ] || run no-mps 150 --workers 2 --counts ${BASE-16 20} --intervals 0 \
      --detect-ahead ${AHEAD:-1} --listen ${LISTEN:-feed each} ${MIF:+--muxer-in-flight $MIF}
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d || exit 1
    run mps 260 --workers ${MPS_WORKERS:-2 3} --counts ${COUNTS:-16 20 24} --intervals 0 --detect-ahead ${AHEAD:-1} \
      ${MIF:+--muxer-in-flight $MIF}
    echo quit | nvidia-cuda-mps-control; grep -ci "new client" $CUDA_MPS_LOG_DIRECTORY/control.log
    ;;
  feed)  # carry [".devsite/video.tar.xz", ".gpuclips/720p.mp4"]: the service with one listener for all streams
    [ -d "$site/ray" ] || { echo "no Ray here: first a call that carries .devsite/site.tar.xz (stress, ab)"; exit 1; }
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    # KT=2: the profiled process's GPU traced for 2 s after its sampled window (bench/kernel_trace.py)
    [ -z "${HP-16 24}" ] || profile "${HP:-16 24}" ahead1 ${KT:+--kernel-trace $KT}
    # HPI2="16": one process at detector interval 2 too (where its frames' time goes when detection is light)
    [ -z "${HPI2-}" ] || profile "$HPI2" interval2 --interval 2
    if [ -n "${I0-}${I2-}" ]; then  # I0="12 16", I2="24 32": each interval at its own counts
      [ -z "${I0-}" ] || run interval0 150 --workers 2 --detect-ahead 1 --counts $I0 --intervals 0
      [ -z "${I2-}" ] || run interval2 150 --workers 2 --detect-ahead 1 --counts $I2 --intervals 2
    elif [ -n "${COUNTS-16 20 24}" ]; then  # COUNTS= (empty): no service run
      run two-workers 200 --workers 2 --detect-ahead 1 --counts ${COUNTS:-16 20 24} --intervals 0 2
    fi
    [ -z "${AHEAD2-16 20}" ] || run ahead2 100 --workers 2 --detect-ahead 2 --counts ${AHEAD2-16 20} --intervals 0
    [ -z "${ONE-12 16}" ] || run one-worker 100 --workers 1 --detect-ahead 1 --counts ${ONE-12 16} --intervals 0
    # HD="8 12": 1080p streams on two workers (carry .gpuclips/1080p.mp4 too); VIDEO=1: /v1/video, 1 and 8 at once
    [ -z "${HD-}" ] || run 1080p 150 --workers 2 --detect-ahead 1 --counts $HD --intervals 0 --sizes 1080p
    [ -z "${VIDEO-}" ] || video
    # the workers' own logs (their captures at run time) stay in Ray's session folders
    grep -rhoE "(P-Net stage|fixed-shape cascade) for [0-9]+ frames of [0-9x]+ will not capture \([^)]{0,80}" \
      /tmp/ray/session_*/logs 2>/dev/null | sort | uniq -c | head -n 8
    ;;
  inflight)  # carry [".devsite/video.tar.xz", ".gpuclips/720p.mp4"], after a call that unpacked site.tar.xz:
    # the streams muxer with one batch in flight against two (ingress.streams.muxer.batches_in_flight), one process
    # (kernel traced) then the service; VIDEO=1: /v1/video too
    [ -d "$site/ray" ] || { echo "no Ray here: first a call that carries .devsite/site.tar.xz (stress, ab)"; exit 1; }
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    # HPF= (empty): no one-process profile
    [ -z "${HPF-16}" ] || for f in ${FLIGHTS:-1 2}; do profile ${HPF:-16} inflight$f --muxer-in-flight $f --kernel-trace ${KT:-2}; done
    [ -z "${VIDEO-}" ] || video
    for f in ${FLIGHTS:-1 2}; do  # PUSH="0 10 33": the muxer's push timeouts (ms) tried at each
      for p in ${PUSH:-33}; do
        run inflight$f-push$p 150 --workers 2 --detect-ahead ${AHEAD:-1} --counts ${COUNTS:-16 20} --intervals 0 \
          --muxer-in-flight $f --push-timeout-ms $p
      done
    done
    ;;
  images)  # carry [".devsite/site.tar.xz"]: issue 24's served figures, the ceiling measured in the same run
    # (bench.run --ceiling): by default layout ingress with two replicas sharing the card and with one,
    # both images, c1 to c128, the FastAPI anchor beside them; VARIANTS overrides which. MPS="...": those variants
    # again with the CUDA MPS daemon up (one shared context for the replicas instead of time-sliced ones)
    [ -d "$site/ray" ] || { mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site"; } || exit 1
    images_run() {  # $1: tag, the rest: bench.run options
      local tag=$1; shift
      RAY_SERVE_ENABLE_HA_PROXY=1 timeout ${LIMIT:-480} python3 -m bench.run --device cuda --backend torch --fp16 \
        --workloads face --images ${IMAGES:-one many} --saturate --requests ${REQUESTS:-20} --time-limit ${TIME_LIMIT:-5} \
        --tag $tag --out "$O" "$@" 2> "$E/images-$tag.err" | grep -A8 "^Against the GPU-bound ceiling"
      python3 - "$O/bench-cuda-$tag.json" <<'PY' || tail -n 4 "$E/images-$tag.err"
import json, sys
result = json.load(open(sys.argv[1]))
for cascade, ceiling in (result.get("ceilings") or {}).items():  # both cascades' kernel ms an image
    print("ceiling of", cascade, {i: c.get("kernel_ms_per_image") for i, c in ((ceiling or {}).get("images") or {}).items()})
for image, c in ((result.get("ceiling") or {}).get("images") or {}).items():  # where decode + detect's kernels go
    print("ceiling", image, c.get("cascade"), c.get("kernel_ms_per_image"), c.get("decode_detect_kernel_ms_per_image"),
          c.get("detector_frames"))
    for k in c.get("decode_detect_busiest_kernels", [])[:8]:
        print("  ", k["ms_per_image"], k["per_batch"], k["kernel"][:100])
for w, v in result["workloads"].items():
    print(w, "anchor", {k: (a["p50_ms"], a["rps"]) for k, a in v.get("anchor", {}).items() if "rps" in a})
    for name, levels in v["variants"].items():
        for k, m in levels.items():
            if k.startswith("c") and "rps" in m:
                busy = (m.get("gpu_utilisation") or {}).get("0", {}).get("mean_pct")
                print(w, name, k, m["p50_ms"], m["p95_ms"], m["rps"], m["server_cpu_ms_per_request"], busy,
                      {p: v for p, v in (m.get("server_cpu_ms_per_request_by_process") or {}).items() if v >= 0.5},
                      "unattributed", m.get("server_cpu_ms_per_request_unattributed"),
                      m.get("host_cpu_ms_per_request_by_kind"), m.get("detector"))
PY
    }
    # NOCEIL=1: no ceiling (a call after one that measured it on the same machine); NOANCHOR=1: no FastAPI anchor
    [ -z "${VARIANTS-x}" ] || images_run ${TAG:-h100-images} $([ -n "${NOCEIL-}" ] || echo --ceiling) \
      ${NOANCHOR:+--no-anchor} --variants ${VARIANTS:-ingress+haproxy+x2 ingress+haproxy}
    grep -rhoE "(P-Net stage|fixed-shape cascade) for [0-9]+ frames of [0-9x]+ will not capture \([^)]{0,80}" \
      /tmp/ray/session_*/logs 2>/dev/null | sort | uniq -c | head -n 8
    if [ -n "${MPS-}" ]; then
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
      mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d || exit 1
      # MPS_CEILING=1, MPS_ANCHOR=1: the ceiling and the FastAPI anchor in this run too (a call with MPS alone)
      images_run ${TAG:-h100-images}-mps $([ -n "${MPS_ANCHOR-}" ] || echo --no-anchor) ${MPS_CEILING:+--ceiling} \
        --variants $MPS
      # run 9 counted no client here: whether the daemon saw any, and whether the replicas had its pipe directory
      echo quit | nvidia-cuda-mps-control; grep -ci "new client" $CUDA_MPS_LOG_DIRECTORY/control.log
      tail -n 4 $CUDA_MPS_LOG_DIRECTORY/control.log; ls $CUDA_MPS_PIPE_DIRECTORY
      grep -rlsh "CUDA_MPS_PIPE_DIRECTORY" /tmp/ray/session_latest/logs 2>/dev/null | head -n 2
    fi
    ;;
  scale)  # carry [".devsite/video.tar.xz", ".gpuclips"], after a call that unpacked site.tar.xz: streams per GPU
    # with the CUDA MPS daemon up, three stream workers, 720p then 1080p, each with the ceiling of the same card in
    # the same run (bench.streams --ceiling); first NOMPS="16 20": three workers without MPS (time-sliced contexts)
    [ -d "$site/ray" ] || { echo "no Ray here: first a call that carries .devsite/site.tar.xz (images, ab)"; exit 1; }
    tar -xJf .devsite/video.tar.xz -C "$site" || exit 1
    [ -z "${NOMPS-16 20}" ] || run no-mps-w${WORKERS:-3} 130 --workers ${WORKERS:-3} --counts ${NOMPS-16 20} --intervals 0 \
      --detect-ahead 1
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d || exit 1
    run mps-w${WORKERS:-3} 200 --workers ${WORKERS:-3} --counts ${COUNTS:-20 22 24} --intervals 0 --detect-ahead 1 --ceiling
    [ -z "${HD-8 10 12}" ] || run mps-w${WORKERS:-3}-1080p 200 --workers ${WORKERS:-3} --counts ${HD-8 10 12} \
      --intervals 0 --detect-ahead 1 --ceiling --sizes 1080p
    echo quit | nvidia-cuda-mps-control; grep -ci "new client" $CUDA_MPS_LOG_DIRECTORY/control.log
    grep -rhoE "(P-Net stage|fixed-shape cascade) for [0-9]+ frames of [0-9x]+ will not capture \([^)]{0,80}" \
      /tmp/ray/session_*/logs 2>/dev/null | sort | uniq -c | head -n 8
    ;;
  pass)  # carry [".devsite/site.tar.xz"]: layout ingress's device pass alone in one process (no HTTP, no Ray), its
    # two halves on two threads and on one (bench/device_pass.py), then bench.ceiling's kernel time beside it
    mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site" || exit 1
    timeout 200 python3 -m bench.device_pass --device cuda --fp16 --concurrency ${CONC:-64} --seconds 6 \
      --out "$O/device-pass.json" 2> "$E/device-pass.err" || tail -n 5 "$E/device-pass.err"
    [ -n "${NOCEIL-}" ] || timeout 150 python3 -m bench.ceiling --device cuda --fp16 --batch 16 --out "$O/ceiling.json" \
      2> "$E/ceiling.err" | tail -n 4
    ;;
  probe)  # carry [".devsite/site.tar.xz"]: three in-process measurements, about three minutes
    [ -d "$site/ray" ] || { mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site"; } || exit 1
    # K1= (empty): no limits; CROPS= (empty): no crops' host time
    [ -z "${K1-x}" ] || { timeout 90 python3 -m bench.fixed_limits --device cuda --fp16 --most-k1 ${K1:-1024 2048 4096} \
      2> "$E/limits.err" | tee "$O/fixed-limits.txt" || tail -n 3 "$E/limits.err"; }
    grep -sE "will not capture|largest" "$E/limits.err" | cut -c1-220 | sort | uniq -c | head -n 5
    [ -z "${CROPS-x}" ] || { timeout 60 python3 -m bench.crop_host --device cuda --frames 1 4 16 2> "$E/crops.err" \
      | tee "$O/crop-host.txt" || tail -n 3 "$E/crops.err"; }
    timeout 200 python3 -m bench.device_pass --device cuda --fp16 --concurrency 64 --seconds ${SECONDS_EACH:-3} \
      --switch-interval-ms ${SWITCH:-1 0.25} --out "$O/device-pass-switch.json" 2> "$E/device-pass.err" | cut -c1-900 \
      || tail -n 5 "$E/device-pass.err"
    ;;
  spy)  # carry [".devsite/site.tar.xz", ".devsite/py-spy.xz"] (made with `xz -9 -c .venv/bin/py-spy > .devsite/py-spy.xz`:
    # the device pack leaves py-spy's binary out): where the ingress replica's CPU goes per request, by thread and
    # function (bench/replica_spy.py), the shipped GPU layout's replica at c16 (CONC), one face then eight
    mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site" || exit 1
    mkdir -p /tmp/spybin && xz -dc .devsite/py-spy.xz > /tmp/spybin/py-spy && chmod +x /tmp/spybin/py-spy || exit 1
    export PATH=/tmp/spybin:$PATH
    # VARIANT: bench.run's (its environment too), several in turn; GIL=1: only the GIL's holder
    for variant in ${VARIANT:-ingress+haproxy}; do for image in ${IMAGES:-one many}; do
      timeout 150 python3 -m bench.replica_spy --device cuda --backend torch --fp16 \
        --variant $variant --image $image --concurrency ${CONC:-16} --seconds 15 ${GIL:+--gil} \
        --out "$O/replica-spy-$image-${variant//+/_}${GIL:+-gil}.json" 2> "$E/spy-$image.err" | head -n ${LINES_SHOWN:-70} \
        || tail -n 5 "$E/spy-$image.err"
    done; done
    ;;
  stress)  # carry [".devsite/site.tar.xz", ".gpuclips/720p.mp4"]: the capture tests, then what breaks captures
    mkdir -p "$site" && tar -xJf .devsite/site.tar.xz -C "$site" || exit 1
    [ -n "${NOTEST:-}" ] || timeout 200 python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/test_torch_backend.py \
      tests/test_mtcnn_torch.py} 2>&1 | grep -E "^E |^FAILED|^SKIPPED|passed|failed" | head -n 30
    # LOADS="nvdec churn" (names with spaces: one at a time) picks the loads; all by default
    timeout 300 python3 -m bench.capture_stress --clip .gpuclips/720p.mp4 --out "$O/capture-stress.json" \
      ${LOADS:+--loads "$LOADS"}
    ;;
  *) echo "usage: $0 ab|streams|mps|feed|inflight|images|scale|pass|probe|spy|stress"; exit 2 ;;
esac
