"""What the GPU does while a process runs: every kernel, copy and memset for a while (torch.profiler, CUPTI, all
threads of the process), summed per CUDA stream and per kernel, and the device's idle gaps.

    with KernelTrace() as trace:
        ...  # the work, for a few seconds
    summary = trace.summary(frames)

Per stream is per engine here: the detector and each classifier engine launch on a stream of their own, frames
are decoded, scaled and cropped on the callers' streams. Busy is the union of the device's intervals over the
traced span; above it, the sum of the intervals (work that overlapped counts twice)."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from typing import Any

_DEVICE_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}


class KernelTrace:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> KernelTrace:
        import torch

        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(None, None, None)
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self._profile.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        finally:
            os.unlink(path)
        self._events = [e for e in events if e.get("cat") in _DEVICE_WORK and "dur" in e]

    def summary(self, frames: int, top: int = 12) -> dict[str, Any]:
        """The trace per processed frame (`frames`: how many the process finished while it ran)."""
        return summarize(self._events, frames, top)


def summarize(events: list[dict[str, Any]], frames: int, top: int = 12) -> dict[str, Any]:
    """Chrome-trace device events (`ts`, `dur` in microseconds; `args.stream`) -> busy, per stream, per kernel,
    gaps."""
    if not events:
        return {"events": 0}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    start, end = spans[0][0], max(b for _, b in spans)
    union, gaps = 0.0, []
    cur_a, cur_b = spans[0]
    for a, b in spans[1:]:
        if a > cur_b:
            union += cur_b - cur_a
            gaps.append(a - cur_b)
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    union += cur_b - cur_a
    total = sum(float(e["dur"]) for e in events)
    per_frame = max(frames, 1)
    streams: dict[Any, dict[str, Any]] = defaultdict(lambda: {"us": 0.0, "events": 0, "names": Counter()})
    kernels: Counter[str] = Counter()
    for e in events:
        stream = streams[e.get("args", {}).get("stream", "?")]
        stream["us"] += float(e["dur"])
        stream["events"] += 1
        name = str(e.get("name", "?"))[:90]
        stream["names"][name] += float(e["dur"])
        kernels[name] += float(e["dur"])
    span_ms = (end - start) / 1e3
    long_gaps = [g for g in gaps if g >= 500]
    return {
        "events": len(events), "frames": frames, "span_ms": round(span_ms, 1),
        "busy": round(union / (end - start), 3), "work_over_span": round(total / (end - start), 3),
        "device_ms_per_frame": round(total / 1e3 / per_frame, 3),
        "busy_ms_per_frame": round(union / 1e3 / per_frame, 3),
        "launches_per_frame": round(len(events) / per_frame, 1),
        "idle_gaps_over_0_5ms": {"count": len(long_gaps), "ms": round(sum(long_gaps) / 1e3, 1),
                                 "largest_ms": [round(g / 1e3, 2) for g in sorted(long_gaps)[-5:]]},
        "streams": {str(k): {"ms_per_frame": round(v["us"] / 1e3 / per_frame, 3), "events": v["events"],
                             "share_of_span": round(v["us"] / (end - start), 3),
                             "top": [n for n, _ in v["names"].most_common(3)]}
                    for k, v in sorted(streams.items(), key=lambda kv: -kv[1]["us"])},
        "kernels_ms_per_frame": [(n, round(us / 1e3 / per_frame, 4)) for n, us in kernels.most_common(top)],
    }
