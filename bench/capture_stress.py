"""Which work in other threads makes a CUDA graph capture fail: the question the stream workers' run-time
captures left open (docs/benchmarks.md, "Detector interval 2 on the feed": "operation failed due to a previous
error during capture", cuDNN internal errors, under load only).

    python -m bench.capture_stress --clip .gpuclips/720p.mp4 [--captures 24] [--readers 16]

Captures a P-Net-shaped conv stack (fp16, cuDNN, 720p frames, batch sizes 1-8 in turn) with the project's
`capture_graph` (thread-local capture mode, on its own stream, a new pool each), `--captures` times under each
load, while other threads of the process keep doing one kind of CUDA work:

- none: nothing else;
- side stream: torch ops on a stream of their own, that stream synchronized (a classifier engine's launches);
- default stream: torch ops on the thread's default stream, then that stream synchronized (what
  serve_app/nvdec_reader.py `working_bgr` does for every decoded frame);
- nvdec: `--readers` NVDEC readers (serve_app/nvdec_reader.py `NvdecFileReader`, frames kept on the device)
  playing the clip at its own rate, as a worker's streams do;
- nvdec churn: NVDEC readers made, run for a few frames and stopped in a loop (streams starting and ending: a
  decoder created and destroyed each time);
- empty cache: torch.cuda.empty_cache() in a loop (the caching allocator giving memory back, a device-wide sync);
- device sync: torch.cuda.synchronize() in a loop (a device-wide wait: what llama.cpp's developers traced such
  failures to, ggml-org/llama.cpp#13990).

Prints a row per load: captures tried, failed, and the first error of each kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _net(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True), nn.Conv2d(10, 16, 3),
                         nn.PReLU(16), nn.Conv2d(16, 32, 3), nn.PReLU(32), nn.Conv2d(32, 6, 1)).cuda().half().eval()


def _loads(torch: Any, clip: Path, readers: int) -> dict[str, Callable[[threading.Event], list[Any]]]:
    """Each load: start(stop) -> the things to join or stop once `stop` is set."""

    def looping(body: Callable[[], None]) -> Callable[[threading.Event], list[Any]]:
        def start(stop: threading.Event) -> list[Any]:
            def run() -> None:
                while not stop.is_set():
                    try:
                        body()
                    except Exception:  # noqa: BLE001 - refused while a capture runs: the load goes on
                        time.sleep(0.001)
            threads = [threading.Thread(target=run, daemon=True) for _ in range(2)]
            for thread in threads:
                thread.start()
            return threads
        return start

    def side_stream() -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            x = torch.rand(64, 3, 64, 64, device="cuda", dtype=torch.half)
            (x * 2 + 1).sum()
        stream.synchronize()

    def default_stream() -> None:
        x = torch.randint(0, 255, (720, 1280, 3), device="cuda", dtype=torch.uint8)
        x.flip(2).contiguous()
        torch.cuda.current_stream().synchronize()

    def nvdec(stop: threading.Event) -> list[Any]:
        from serve_app.nvdec_reader import NvdecFileReader

        opened: list[Any] = []
        started = [NvdecFileReader(str(clip), {}, clip.name, open_timeout_s=10, read_timeout_s=10,
                                   max_frame_pixels=1 << 26, max_side=1280, pace=True, on_opened=opened.append,
                                   device="cuda") for _ in range(readers)]
        while len(opened) < readers:
            time.sleep(0.01)
        refused = [o for o in opened if not hasattr(o, "fps")]
        if refused:
            print(f"nvdec: {len(refused)} readers did not open: {refused[0]}", file=sys.stderr)
        return started

    def nvdec_churn() -> None:  # a stream starting and ending: NVDEC's decoder made, used, destroyed
        from serve_app.nvdec_reader import NvdecFileReader

        reader = NvdecFileReader(str(clip), {}, clip.name, open_timeout_s=10, read_timeout_s=10,
                                 max_frame_pixels=1 << 26, max_side=1280, pace=False, on_opened=lambda o: None,
                                 device="cuda")
        while reader.frames < 5 and not reader.ended.is_set():
            time.sleep(0.001)
        reader.stop()
        reader.join(10)

    return {"none": lambda stop: [], "side stream": looping(side_stream), "default stream": looping(default_stream),
            "nvdec": nvdec, "nvdec churn": looping(nvdec_churn),
            "empty cache": looping(lambda: (torch.cuda.empty_cache(), time.sleep(0.001))),
            "device sync": looping(torch.cuda.synchronize)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, required=True, help="an H.264 clip for the NVDEC readers")
    parser.add_argument("--captures", type=int, default=24, help="captures under each load")
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--loads", nargs="+", default=None, help="which loads (default: all)")
    parser.add_argument("--out", default="bench/out/capture_stress.json")
    opts = parser.parse_args(argv)

    import torch

    from engines.torch_engine import capture_graph

    if not torch.cuda.is_available():
        print("no CUDA GPU here: run on the GPU machine", file=sys.stderr)
        return 2
    net = _net(torch)
    frames = {b: torch.rand(b, 3, 720, 1280, device="cuda", dtype=torch.half) for b in (1, 2, 4, 8)}
    loads = _loads(torch, opts.clip, opts.readers)
    rows = []
    for name in opts.loads or list(loads):
        stop = threading.Event()
        running = loads[name](stop)
        errors: Counter[str] = Counter()
        first: dict[str, str] = {}
        with torch.no_grad():
            for i in range(opts.captures):
                batch = (1, 2, 4, 8)[i % 4]
                try:  # a stream of its own each time: a capture that failed leaves nothing for the next
                    capture_graph(lambda x: [net(x[0])], [frames[batch]], torch.cuda.Stream(), warmups=1)
                except Exception as exc:  # noqa: BLE001 - counted: what this measures
                    kind = str(exc).splitlines()[0][:120]
                    errors[kind] += 1
                    first.setdefault(kind, f"capture {i}, batch {batch}")
        stop.set()
        for item in running:
            (item.stop if hasattr(item, "stop") else lambda: None)()
            item.join(10)
        torch.cuda.synchronize()
        rows.append({"load": name, "captures": opts.captures, "failed": sum(errors.values()),
                     "errors": dict(errors), "first": first})
        print(f"| {name} | {opts.captures} | {sum(errors.values())} | "
              + "; ".join(f"{k} (x{n}, first at {first[k]})" for k, n in errors.items()) + " |", flush=True)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
