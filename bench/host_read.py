"""Whether one thread's read of its GPU results holds up another thread's launches: the device pass's detector
thread reads its batch's faces while the classifiers' thread cuts crops and launches (on an H100 the crops' wall
time tripled beside the detector, 24 against 8 ms a batch of 16, for the same host work: docs/benchmarks.md).

    python -m bench.host_read --seconds 3

A reader thread queues about 15 ms of matrix products on a stream of its own and reads a small result back, over
and over, either with `.cpu()` (a copy into pageable memory) or with engines/torch_engine.py's `to_host` (a copy
into page-locked memory without blocking, then a wait on an event). Meanwhile the main thread times what the crops
do: a page-locked upload and 50 small element-wise launches on the default stream, host wall time each (no sync).
Prints the launcher's median and 95th percentile milliseconds alone and beside each reader.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import numpy as np


def _launches(torch: Any) -> float:
    """One round of the crops' kind of host work: an upload from page-locked memory and small launches."""
    start = time.perf_counter()
    host = torch.from_numpy(np.arange(4096, dtype=np.float32)).pin_memory()
    y = host.to("cuda", non_blocking=True)
    for _ in range(50):
        y = y * 1.0001 + 0.5
    return (time.perf_counter() - start) * 1e3


def measure(read: str | None, seconds: float) -> dict[str, float]:
    import torch

    from engines.torch_engine import to_host

    stop = threading.Event()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) / 64
    stream = torch.cuda.Stream()
    reads = 0

    def reader() -> None:
        nonlocal reads
        with torch.cuda.stream(stream):
            while not stop.is_set():
                x = a
                for _ in range(60):  # about 15 ms of kernels on an H100
                    x = x @ a
                small = x[:4, :17].float()
                small.cpu().numpy() if read == "cpu" else to_host(small)
                reads += 1

    thread = threading.Thread(target=reader) if read else None
    if thread:
        thread.start()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        times.append(_launches(torch))
    stop.set()
    if thread:
        thread.join()
    torch.cuda.synchronize()
    return {"launcher_p50_ms": round(float(np.percentile(times, 50)), 3),
            "launcher_p95_ms": round(float(np.percentile(times, 95)), 3), "rounds": len(times),
            "reads_per_s": round(reads / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    opts = parser.parse_args()
    import torch

    for _ in range(20):  # warm-up: kernels chosen, page-locked blocks cached
        _launches(torch)
    out = {"device": torch.cuda.get_device_name()}
    for read in (None, "cpu", "to_host"):
        out[f"beside a reader ({read})" if read else "alone"] = measure(read, opts.seconds)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
