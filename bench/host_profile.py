"""Where one stream worker's host time goes: the streams of one process, no Ray, sampled.

    python -m bench.host_profile --device cuda --backend torch --fp16 --clip .gpuclips/720p.mp4 --streams 4

Runs what a stream worker runs (serve_app/stream_host.py `StreamHost` over the models held in this process,
serve_app/wiring.py `in_process`) on N file streams of one clip played at their own rate, each followed by a
listener that JSON-encodes its records (as a worker's relay does; `--listen feed`, the default: one listener of
every stream, its batches encoded at once), and for `--seconds` after a warm-up reports:
frames processed, the process's CPU time per processed frame, each thread's CPU time (/proc/self/task), and a
sampling profile of every thread (`sys._current_frames` every `--interval-ms`): the lines where samples end
(self) and the functions they pass through (inclusive), waits left out. The issue's target is <= 3 ms of host CPU
per frame; this says which code holds the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import linecache
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

# A thread whose newest Python frame is one of these, or whose line calls one of _WAIT_CALLS, is waiting, not
# working: its samples are left out of the profile.
_WAITS = {"wait", "select", "poll", "_worker", "get", "sleep", "acquire", "_wait_for_tstate_lock", "run_forever",
          "_run_once", "join", "recv"}
_WAIT_CALLS = ("sleep(", ".wait(", ".get(", "select(", ".join(", ".acquire(", ".poll(")


def thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process (by native id), from /proc/self/task/*/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class Sampler:
    """Every thread's Python stack, sampled: self counts per line, inclusive counts per function."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples = 0
        self.self_lines: Counter[str] = Counter()
        self.inclusive: Counter[str] = Counter()
        self.by_thread: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        names = {}
        while not self._stop.wait(self.interval_s):
            names.update({t.ident: t.name for t in threading.enumerate()})
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                self._count(names.get(ident, str(ident)), frame)

    def _count(self, thread: str, frame: FrameType) -> None:
        leaf = frame.f_code.co_name
        if leaf in _WAITS or any(call in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
                                 for call in _WAIT_CALLS):
            return
        self.by_thread[thread] += 1
        self.self_lines[f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} {leaf}"] += 1
        seen = set()
        f: FrameType | None = frame
        while f is not None:
            key = f"{_short(f.f_code.co_filename)}:{f.f_code.co_firstlineno} {f.f_code.co_name}"
            if key not in seen:
                seen.add(key)
                self.inclusive[key] += 1
            f = f.f_back


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", str(Path.cwd()) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    from bench.run import workload_args
    from serve_app.config import PipelineConfig
    from serve_app.placement import place_stream_workers
    from serve_app.stream_host import StreamHost
    from serve_app.wiring import in_process

    media = Path(tempfile.mkdtemp(prefix="host-profile-"))
    shutil.copy(opts.clip, media / "clip.mp4")
    args = workload_args("face", opts.device, opts.backend, opts.fp16, 112)
    args["layout"] = "ingress"
    args["detector"]["interval"] = opts.interval
    for stage in (args["detector"], *args["classifiers"]):
        stage["engine"]["cuda_sync"] = opts.cuda_sync
    if opts.fixed_shapes != "auto":
        args["detector"]["mtcnn"]["fixed_shapes"] = opts.fixed_shapes == "true"
    args["ingress"]["frames_on_device"] = "auto" if opts.frames_on_device else False
    args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": opts.streams, "decoder": opts.decoder,
                                  "detect_ahead": opts.detect_ahead,
                                  "muxer": {"batch_size": opts.muxer_batch, **(
                                      {"batches_in_flight": opts.muxer_in_flight} if opts.muxer_in_flight else {})},
                                  "workers": {"count": 1, "num_cpus": 1,
                                              "num_gpus": 0.5 if opts.device != "cpu" else 0}}
    config = PipelineConfig.model_validate(args)
    _, devices = place_stream_workers(config, 1.0 if opts.device != "cpu" else 0.0)
    host = StreamHost(config, lambda: in_process(config, devices), 0.5 if opts.device != "cpu" else 0.0)
    host.prepare()
    records = Counter()

    async def listen(stream_id: str) -> None:
        async for record in host.events(stream_id):
            json.dumps(record, default=str)
            records[stream_id] += 1

    async def follow_all() -> None:  # GET /v1/events: every stream's records in batches, encoded a batch at once
        async for item in host.feed():
            if isinstance(item, list):
                json.dumps(item, default=str)
                records.update(r.get("stream", "") for r in item)

    listeners = [asyncio.create_task(follow_all())] if opts.listen == "feed" else []
    ids = []
    for _ in range(opts.streams):
        info = await host.start("clip.mp4")
        assert isinstance(info, dict), info
        ids.append(info["id"])
        if opts.listen == "each":
            listeners.append(asyncio.create_task(listen(info["id"])))
    await asyncio.sleep(opts.warmup)
    before = {i: (await host.get(i))["frames_processed"] for i in ids}
    cpu0, wall0, threads0 = time.process_time(), time.perf_counter(), thread_cpu()
    with Sampler(opts.interval_ms / 1000) as sampler:
        await asyncio.sleep(opts.seconds)
    cpu1, wall1, threads1 = time.process_time(), time.perf_counter(), thread_cpu()
    after = {i: (await host.get(i)) for i in ids}
    kernels = await _traced(host, ids, opts.kernel_trace) if opts.kernel_trace and opts.device == "cuda" else None
    described = host.describe()
    names = {t.native_id: t.name for t in threading.enumerate()}
    for task in listeners:
        task.cancel()
    await host.close()
    shutil.rmtree(media, ignore_errors=True)

    frames = sum(after[i]["frames_processed"] - before[i] for i in ids)
    per_thread: Counter[str] = Counter()  # summed per name: the 16 readers are all "stream-reader"
    for tid in threads1:
        per_thread[names.get(tid, f"tid {tid}")] += threads1[tid] - threads0.get(tid, 0.0)
    wall = wall1 - wall0
    return {
        "streams": opts.streams, "listen": opts.listen, "detect_ahead": opts.detect_ahead, "cuda_sync": opts.cuda_sync,
        "muxer_in_flight": config.ingress.streams.muxer.batches_in_flight,
        "fixed_shapes": opts.fixed_shapes,
        "seconds": wall, "frames": frames, "fps": frames / wall,
        "cpu_ms_per_frame": 1000 * (cpu1 - cpu0) / max(frames, 1), "cpu_cores": (cpu1 - cpu0) / wall,
        "threads_cpu_s": dict(per_thread.most_common(15)),
        "states": [after[i]["state"] for i in ids], "muxer": described.get("muxer"),
        "decoder": described.get("decoder"), "frames_at": described.get("frames"),
        "samples": sampler.samples,
        "busy_by_thread": dict(sampler.by_thread.most_common(15)),
        "self": sampler.self_lines.most_common(opts.top),
        "inclusive": sampler.inclusive.most_common(opts.top),
        **({"kernels": kernels} if kernels else {}),
    }


async def _traced(host: Any, ids: list[str], seconds: float) -> dict[str, Any]:
    """The GPU's work for `seconds` after the sampled window (bench/kernel_trace.py), per frame processed then."""
    from bench.kernel_trace import KernelTrace

    async def processed() -> int:
        return sum([(await host.get(i))["frames_processed"] for i in ids])

    before = await processed()
    with KernelTrace() as trace:
        await asyncio.sleep(seconds)
        frames = await processed() - before
    return trace.summary(frames)


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['streams']} streams (detect_ahead {result['detect_ahead']}, cuda_sync {result['cuda_sync']}, "
             f"muxer in flight {result.get('muxer_in_flight', 1)}, "
             f"fixed shapes {result.get('fixed_shapes', 'auto')}), {result['frames']} frames in {result['seconds']:.1f} s "
             f"({result['fps']:.0f} fps), host CPU {result['cpu_ms_per_frame']:.2f} ms/frame "
             f"({result['cpu_cores']:.2f} cores); decoder {result['decoder']}, frames on {result['frames_at']}; "
             f"muxer {result['muxer']}", "thread CPU s: " + ", ".join(
                 f"{k} {v:.2f}" for k, v in result["threads_cpu_s"].items()),
             f"busy samples of {result['samples']}: " + ", ".join(f"{k} {v}" for k, v in result["busy_by_thread"].items()),
             "-- self (line) --"]
    lines += [f"{n:6d} {k}" for k, n in result["self"]]
    lines += ["-- inclusive (function) --"]
    lines += [f"{n:6d} {k}" for k, n in result["inclusive"]]
    if kernels := result.get("kernels"):
        lines += [f"-- the GPU, {kernels.get('frames')} frames in {kernels.get('span_ms')} ms traced --",
                  json.dumps({k: v for k, v in kernels.items() if k != "kernels_ms_per_frame"}),
                  *(f"{ms:8.4f} ms/frame {name}" for name, ms in kernels.get("kernels_ms_per_frame", []))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument("--streams", type=int, nargs="+", default=[4])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--interval", type=int, default=0, help="detector.interval")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--decoder", default="auto", choices=["auto", "ffmpeg", "nvdec"])
    parser.add_argument("--frames-on-device", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--muxer-batch", type=int, default=16)
    parser.add_argument("--muxer-in-flight", type=int, default=None,
                        help="ingress.streams.muxer.batches_in_flight (default: the config's)")
    parser.add_argument("--detect-ahead", type=int, default=1, help="ingress.streams.detect_ahead")
    parser.add_argument("--cuda-sync", default="block", choices=["auto", "spin", "yield", "block"],
                        help="every engine's cuda_sync")
    parser.add_argument("--fixed-shapes", default="auto", choices=["auto", "true", "false"],
                        help="detector.mtcnn.fixed_shapes")
    parser.add_argument("--listen", default="feed", choices=["feed", "each"],
                        help="feed: one listener of every stream (GET /v1/events); each: a listener per stream")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="the sampler's period")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--kernel-trace", type=float, default=0.0,
                        help="then trace the GPU's kernels for this many seconds (CUDA; bench/kernel_trace.py)")
    parser.add_argument("--out", default="bench/out/host_profile.json")
    opts = parser.parse_args(argv)
    results = []
    for count in opts.streams:
        one = argparse.Namespace(**{**vars(opts), "streams": count})
        result = asyncio.run(run(one))
        results.append(result)
        print(report(result), flush=True)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
