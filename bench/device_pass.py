"""What layout ingress's device pass sustains in one process, without HTTP or Ray: the served path's own ceiling.

    python -m bench.device_pass --device cuda --fp16 --concurrency 64 --seconds 6
    python -m bench.device_pass --device cpu --concurrency 8 --seconds 10        # checks it runs

The face demo's stages (the torch MTCNN, the three classifiers through the torch backend) and the pass over them
(serve_app/device_pass.py), as the ingress replica builds them; `--concurrency` callers each send the image (the
one-face portrait, or the eight-face photo) again as soon as it is answered, on one event loop, for `--seconds`
after a warm-up. For each image it prints the images per second, the process's CPU per image (all threads, and
the busiest threads), the detector's mean batch and each phase's wall time; first as the ingress runs it (decode
and detect on the detector's thread, classify on a second), then with the decode on a third thread of its own
(`decode_apart`), then all on one thread (a batch is detected only after the one before it was classified).
bench.ceiling's kernel time per image is the card's ceiling; this is what one process's pass reaches toward it, and
bench.run's served figures what HTTP and Serve leave of that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import proc_cpu
from bench.ceiling import cascade_frames, grown_limits
from bench.run import images, workload_args


def _build(device: str, fp16: bool, overlap: bool, decode_apart: bool) -> tuple[Any, list[Any]]:
    from deployments.stages import ClassifierStage, DetectorStage
    from engines.device_image import DeviceDecoder
    from serve_app.config import PipelineConfig
    from serve_app.device_pass import DevicePass
    from serve_app.graph import ClassifierRoute

    args = workload_args("face", device, "torch", fp16, 224)
    args["detector"]["mtcnn"]["implementation"] = "torch"
    config = PipelineConfig.model_validate(args)
    detector = DetectorStage(config.detector, device, shared=True)
    classifiers = {c.name: ClassifierStage(c, device, shared=True) for c in config.classifiers}
    routes = [ClassifierRoute.from_config(c, None) for c in config.classifiers]
    whole = DevicePass(DeviceDecoder(device), detector, classifiers, routes, config.ingress.device_batch_size,
                       config.detector.max_detect_side, 60.0, overlap=overlap, decode_apart=decode_apart)
    return whole, [detector, *classifiers.values()]


_PHASES = ("decode", "detect", "crops", "classify")


async def _load(whole: Any, body: bytes, concurrency: int, seconds: float) -> tuple[int, dict[str, float]]:
    """Images answered, and the sums of each phase's wall ms over them (a batch's phase counted once per image)."""
    done = 0
    sums = dict.fromkeys(_PHASES, 0.0)
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            result = await whole.run(body)
            if result.errors:
                raise RuntimeError(f"the pass answered errors: {result.errors}")
            done += 1
            timing = result.calls["detector"].timing
            for phase, ms in zip(_PHASES, (result.decode_ms, timing.compute_ms if timing else 0.0, result.crop_ms,
                                           result.classify_ms)):
                sums[phase] += ms

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done, sums


def _warm_up(whole: Any, body: bytes, concurrency: int, seconds: float, detector: Any, most: int = 12) -> None:
    """Load for `seconds`, then for a second at a time until one second grew no fixed-shape limit and left no frame
    to the data-following cascade (every batch size captured at the limits the image needs; the eight-face photo
    grows k1 three times, each growth answered by the data-following cascade first), or `most` seconds more."""
    asyncio.run(_load(whole, body, concurrency, seconds))
    for _ in range(most if getattr(detector.model, "static", False) else 0):
        before, limits = cascade_frames(detector.model), grown_limits(detector.model)
        asyncio.run(_load(whole, body, concurrency, 1.0))
        if grown_limits(detector.model) == limits and \
                cascade_frames(detector.model)["data_following"] == before["data_following"]:
            break


def measure(device: str, fp16: bool, concurrency: int, seconds: float, overlap: bool, decode_apart: bool,
            chosen: list[str]) -> dict[str, Any]:
    whole, stages = _build(device, fp16, overlap, decode_apart)
    detector = stages[0]
    out: dict[str, Any] = {}
    try:
        for image, body in images().items():
            if image not in chosen:
                continue
            _warm_up(whole, body, concurrency, min(seconds, 3.0), detector)
            batches, frames, before = detector.batches, detector.frames, cascade_frames(detector.model)
            start, cpu, threads = time.perf_counter(), time.process_time(), proc_cpu.threads()
            done, sums = asyncio.run(_load(whole, body, concurrency, seconds))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            per_thread = {name: round(s * 1e3 / done, 3)
                          for name, s in list(proc_cpu.threads_spent(threads, proc_cpu.threads()).items())[:8] if s > 0}
            after = cascade_frames(detector.model)
            out[image] = {"images_per_s": round(done / wall, 1), "host_cpu_ms_per_image": round(cpu * 1e3 / done, 3),
                          "mean_detector_batch": round((detector.frames - frames) / max(detector.batches - batches, 1), 2),
                          # frames each cascade answered in the measured window: the data-following one's are
                          # batches whose fixed-shape graph was not there (first sight, or a capture that failed)
                          "cascades": {f"frames_{k}": after[k] - before[k] for k in after},
                          # each phase's wall time over a request's batch (ms; the batch's, not an image's share),
                          # and each thread's CPU per image (ms): which half's host work the other waits on
                          "mean_phase_ms": {k: round(v / max(done, 1), 3) for k, v in sums.items()},
                          "thread_cpu_ms_per_image": per_thread}
    finally:
        whole.close()
        for stage in stages:
            stage.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--images", nargs="+", default=["one", "many"], choices=["one", "many"])
    parser.add_argument("--switch-interval-ms", type=float, nargs="*", default=[],
                        help="two threads again at each of these GIL switch intervals (Python's default: 5 ms)")
    parser.add_argument("--ways", nargs="+", default=["two", "three", "one"], choices=["two", "three", "one"],
                        help="which threadings to run: two (the ingress's), three (decode apart), one")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    import torch

    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if opts.device == "cuda" else "cpu",
                               "command": "python -m bench.device_pass " + " ".join(sys.argv[1:]),
                               "concurrency": opts.concurrency, "seconds": opts.seconds}
    # (name, classifiers on their own thread, decode on its own thread, GIL switch interval in ms or None)
    runs = [("two threads (decode with detect)", True, False, None),
            *((f"two threads, GIL switch interval {ms:g} ms", True, False, ms) for ms in opts.switch_interval_ms),
            ("three threads (decode apart)", True, True, None), ("one thread", False, False, None)]
    ways = {"two threads": "two", "three threads": "three", "one thread": "one"}
    runs = [run for run in runs if next(w for prefix, w in ways.items() if run[0].startswith(prefix)) in opts.ways]
    for key, overlap, decode_apart, interval_ms in runs:
        default = sys.getswitchinterval()  # how long a thread that wants the GIL waits for its holder to drop it
        sys.setswitchinterval(interval_ms / 1e3 if interval_ms is not None else default)
        try:
            results[key] = measure(opts.device, opts.fp16, opts.concurrency, opts.seconds, overlap, decode_apart,
                                   opts.images)
        finally:
            sys.setswitchinterval(default)
        print(key, json.dumps(results[key]), flush=True)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
