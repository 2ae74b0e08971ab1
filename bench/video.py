"""A video through /v1/video against the same frames sent one by one to /v1/infer.

    python -m bench.video [--workload face|standin] [--frames 200] [--videos 1 4] [--out bench/out/video.json]
    python -m bench.video --device cuda --backend torch --fp16 --workload standin --videos 1 8   # on the GPU

Deploys the workload (the face demo, or MTCNN with resnet stand-in classifiers) on a local Ray, builds a test
video from the committed photos (a face moving across the frame, a second one entering midway), and
measures, in one run:
- the detector alone, in process, on the same frames (frames per second): the rate one video cannot beat;
- POST /v1/video: frames per second, classifier calls, server CPU per frame;
- the same frames, JPEG-encoded, through POST /v1/infer one at a time (c1) and 4 at a time (c4);
- N videos at once (--videos): aggregate frames per second, against one video.
Targets (issue "Video and live streams"): video fps >= 0.9x the detector-alone rate on CPU, >= 2x the
per-frame /v1/infer path; on the GPU, 8 at once >= 4x the aggregate fps of one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

from bench.run import add_engine_arguments, busy_cpu_seconds, closed_loop, environment, own_cpu_seconds


def read_frames(path: Path) -> list[Any]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def detector_alone_fps(frames: list[Any], args: dict[str, Any], device: str) -> float:
    from deployments.models import build_detector
    from serve_app.config import PipelineConfig

    detector = build_detector(PipelineConfig.model_validate(args).detector, device)
    for frame in frames[:5]:
        detector.detect(frame)
    start = time.perf_counter()
    for frame in frames:
        detector.detect(frame)
    return len(frames) / (time.perf_counter() - start)


async def video_run(url: str, data: bytes) -> dict[str, Any]:
    import httpx

    cpu0, own0 = busy_cpu_seconds(), own_cpu_seconds()
    start = time.perf_counter()
    lines = []
    async with httpx.AsyncClient(timeout=600) as client:
        async with client.stream("POST", f"{url}/v1/video", content=data, headers={"Content-Type": "video/mp4"}) as r:
            async for line in r.aiter_lines():
                if line:
                    lines.append(json.loads(line))
    wall = time.perf_counter() - start
    frames = sum(1 for line in lines if "objects" in line)
    cpu = (busy_cpu_seconds() - cpu0) - (own_cpu_seconds() - own0)
    summary = lines[-1]["summary"]
    return {"frames": frames, "wall_s": round(wall, 2), "fps": round(frames / wall, 2),
            "server_cpu_ms_per_frame": round(cpu * 1e3 / frames, 1), "classifier_calls": summary["classifier_calls"],
            "objects_seen": summary["objects_seen"], "tracks": summary["tracks"]}


async def videos_at_once(url: str, data: bytes, n: int, busy: Any = None) -> dict[str, Any]:
    """`n` uploads of the video at once: aggregate frames/s; where the host's CPU went (each kind of process, ms a
    frame, this process and the GPU sampler left out) and, with `busy` (bench.gpus.UtilisationSampler), the GPU's busy %."""
    from bench import proc_cpu
    from bench.streams import _mean

    samples, procs0 = len(busy.card()) if busy else 0, proc_cpu.snapshot()
    start = time.perf_counter()
    runs = await asyncio.gather(*(video_run(url, data) for _ in range(n)))
    wall = time.perf_counter() - start
    roles = proc_cpu.by_role(procs0, proc_cpu.snapshot(), leave_out=(os.getpid(), busy.pid if busy else None))
    frames = sum(r["frames"] for r in runs)
    recent = busy.card()[samples:] if busy else []
    return {"videos": n, "wall_s": round(wall, 2), "aggregate_fps": round(frames / wall, 2),
            "host_cpu_ms_per_frame_by_process": {role: round(sec * 1e3 / max(frames, 1), 2)
                                                 for role, sec in list(roles.items())[:8]},
            "gpu_busy": _mean(recent)}


async def per_frame_run(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    from bench.load_client import LoadClient

    index = 0
    calls = 0

    async with LoadClient(concurrency) as client:
        async def one() -> None:
            nonlocal index, calls
            body = bodies[index % len(bodies)]
            index += 1
            answer = (await client.post(f"{url}/v1/infer", body)).json()
            calls += sum(len(o["attributes"]) for o in answer["objects"])

        cpu0, own0 = busy_cpu_seconds(), own_cpu_seconds()
        latencies, wall = await closed_loop(one, concurrency, len(bodies), 600)
        cpu = (busy_cpu_seconds() - cpu0) - (own_cpu_seconds() - own0)
    return {"frames": len(latencies), "wall_s": round(wall, 2), "fps": round(len(latencies) / wall, 2),
            "server_cpu_ms_per_frame": round(cpu * 1e3 / len(latencies), 1), "classifier_calls_total": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--workload", default="face", choices=["face", "standin"])
    parser.add_argument("--standin-size", type=int, default=112)
    add_engine_arguments(parser)
    parser.add_argument("--lookahead", type=int, default=None, help="ingress.video.lookahead (default: the config's)")
    parser.add_argument("--videos", type=int, nargs="*", default=[1, 4], help="videos at once, for aggregate fps")
    parser.add_argument("--detector-replicas", type=int, default=None, help="detector.deployment.num_replicas")
    parser.add_argument("--ingress-replicas", type=int, default=None, help="ingress.deployment.num_replicas")
    parser.add_argument("--gpu-fraction", type=float, default=None, help="num_gpus of every model replica")
    parser.add_argument("--clip", type=Path, help="this video instead of the built one (an H.264 clip: NVDEC decodes it "
                        "where the ingress keeps frames on CUDA, `--layout ingress`)")
    parser.add_argument("--layout", default=None, choices=["separate", "colocated", "ingress"])
    parser.add_argument("--workers", type=int, default=0,
                        help="ingress.streams.workers.count: the videos run on that many stream workers, each with its "
                        "own models (0: in the ingress)")
    parser.add_argument("--out", default="bench/out/video.json")
    opts = parser.parse_args(argv)

    import ray
    from ray import serve

    from bench.run import workload_args
    from serve_app.app import build_app
    from tests.videos import two_faces

    args = workload_args(opts.workload, opts.device, opts.backend, opts.fp16, opts.standin_size)
    if opts.lookahead:
        args["ingress"].setdefault("video", {})["lookahead"] = opts.lookahead
    for c in args["classifiers"]:
        c["timeout_s"] = 30.0  # several videos at once queue at the classifiers
    if opts.gpu_fraction is not None:
        for stage in (args["detector"], *args["classifiers"]):
            stage["deployment"]["num_gpus"] = opts.gpu_fraction
    if opts.detector_replicas:
        args["detector"]["deployment"]["num_replicas"] = opts.detector_replicas
    if opts.ingress_replicas:
        args["ingress"]["deployment"]["num_replicas"] = opts.ingress_replicas
    if opts.layout:
        args["layout"] = opts.layout
    if opts.workers:  # the workers hold the models for the videos; the ingress's copy answers /v1/infer only
        on_gpu = opts.device != "cpu"
        for stage in (args["detector"], *args["classifiers"]):
            stage.setdefault("deployment", {}).update(num_gpus=0.01 if on_gpu else 0, num_cpus=0.1)
        args["ingress"]["streams"] = {"deployment": {"num_cpus": 0.25, "num_gpus": 0}, "workers": {
            "count": opts.workers, "num_cpus": 1 if on_gpu else 0.25,
            "num_gpus": round(0.9 / opts.workers, 4) if on_gpu else 0}}
    video = opts.clip or two_faces(Path(tempfile.mkdtemp()) / "two.mp4", frames=opts.frames, enters_at=opts.frames // 2)
    frames = read_frames(video)
    bodies = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in frames]
    result: dict[str, Any] = {"environment": environment(opts),
                              "command": "python -m bench.video " + " ".join(argv or sys.argv[1:]),
                              "workload": opts.workload,
                              "video": {"frames": len(frames), "width": frames[0].shape[1], "height": frames[0].shape[0],
                                        "clip": str(opts.clip) if opts.clip else "built"}}
    result["environment"]["command"] = result["command"]
    device = "cpu" if opts.device == "cpu" else "cuda"
    result["detector_alone_fps"] = round(detector_alone_fps(frames, args, device), 2)
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8012})
    try:
        serve.run(build_app(args), name="video", route_prefix="/")
        url = "http://127.0.0.1:8012"
        asyncio.run(per_frame_run(url, bodies[:10], 1))  # warm-up: the per-frame path, then a short video
        asyncio.run(video_run(url, two_faces(Path(tempfile.mkdtemp()) / "warm.mp4", frames=20, enters_at=10).read_bytes()))
        result["video"] |= asyncio.run(video_run(url, video.read_bytes()))
        result["infer_c1"] = asyncio.run(per_frame_run(url, bodies, 1))
        result["infer_c4"] = asyncio.run(per_frame_run(url, bodies, 4))
        from bench.gpus import UtilisationSampler

        with UtilisationSampler() if device == "cuda" else contextlib.nullcontext() as busy:
            result["at_once"] = [asyncio.run(videos_at_once(url, video.read_bytes(), n, busy)) for n in opts.videos]
    finally:
        serve.shutdown()
        ray.shutdown()
    v = result["video"]
    result["ratios"] = {
        "video_fps_over_detector_alone": round(v["fps"] / result["detector_alone_fps"], 2),
        "video_fps_over_infer_c1": round(v["fps"] / result["infer_c1"]["fps"], 2),
        "video_fps_over_infer_c4": round(v["fps"] / result["infer_c4"]["fps"], 2),
        "classifier_calls_over_object_frames": round(
            sum(v["classifier_calls"].values()) / (len(v["classifier_calls"]) * v["objects_seen"]), 3),
    }
    if len(result["at_once"]) > 1:
        first, last = result["at_once"][0], result["at_once"][-1]
        result["ratios"][f"aggregate_fps_{last['videos']}_over_{first['videos']}"] = round(
            last["aggregate_fps"] / first["aggregate_fps"], 2)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
