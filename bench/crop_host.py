"""The host time of cutting a batch's classifier crops on the device: what the device pass's classify half spends
before it launches (on an H100 under load, 0.6 of that thread's 1.1 ms a one-face request, docs/benchmarks.md).

    python -m bench.crop_host --frames 1 4 16              # CPU: tiny frames, so the figure is the host's work
    python -m bench.crop_host --device cuda --frames 16    # GPU: the launches are asynchronous; host time again

`--frames` frames of 40x40 (CPU, so that the pixels cost nothing beside the planning, the index arrays and the
launches) or of the 512x512 portrait (`--device cuda`), one face-sized box each, cut for the face demo's
classifiers (age and emotion share a 64x64 crop, gender takes 32x32; on the tiny frames 8x8 and 4x4) with
serve_app/graph.py's `cut_each_spec_once_many`, as the pass does; prints the host milliseconds a batch (process
CPU time, and wall time after a device sync).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def measure(device: str, frames: int, repeats: int) -> dict[str, float]:
    import torch

    from engines.preprocess import CropSpec
    from serve_app.graph import ClassifierRoute, cut_each_spec_once_many
    from tests.images import ASTRONAUT, read

    torch.set_num_threads(1)
    if device == "cpu":
        images = [torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8) for _ in range(frames)]
        box, big, small = np.array([[5.3, 4.1, 30.2, 33.5]], np.float32), 8, 4
    else:
        portrait = torch.from_numpy(read(ASTRONAUT)).to(device)
        images = [portrait.clone() for _ in range(frames)]
        box, big, small = np.array([[180.9, 61.1, 269.1, 173.5]], np.float32), 64, 32
    routes = [ClassifierRoute(name, None, CropSpec(size, size), None, 0, 0, 1)
              for name, size in (("age", big), ("gender", small), ("emotion", big))]
    wanted = [[(route, np.arange(1)) for route in routes] for _ in images]

    def cut() -> None:
        cut_each_spec_once_many(images, [box] * frames, wanted)

    for _ in range(3):
        cut()
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        cut()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"frames": frames, "host_cpu_ms_per_batch": round((time.process_time() - cpu) * 1e3 / repeats, 3),
            "wall_ms_per_batch": round((time.perf_counter() - start) * 1e3 / repeats, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=50)
    opts = parser.parse_args()
    for frames in opts.frames:
        print(json.dumps(measure(opts.device, frames, opts.repeats)), flush=True)


if __name__ == "__main__":
    main()
