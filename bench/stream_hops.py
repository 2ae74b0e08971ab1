"""What a Ray streaming hop costs a record: the host CPU (every process, /proc/stat) per item of a streaming call
(`num_returns="streaming"`) relayed through 0, 1 or 2 actors, as a stream's events records cross processes
(a stream worker -> the streams replica -> the ingress). 8 generators at 30 items/s each, a record shaped like a
stream's (two faces with three attributes).

    python -m bench.stream_hops [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import ray

from bench.run import busy_cpu_seconds

RECORD = {"frame": 1, "time_ms": 33.3, "read_at": 1.0, "objects": [
    {"track_id": i, "box": [1.0, 2.0, 3.0, 4.0], "score": 0.99, "label": "face",
     "attributes": {"age": {"label": "(25-32)", "score": 0.9, "frame": 3},
                    "gender": {"label": "male", "score": 0.8, "frame": 3},
                    "emotion": {"label": "happy", "score": 0.7, "frame": 3}}} for i in range(2)]}
GENERATORS, RATE = 8, 30.0


@ray.remote(num_cpus=0)
class Source:
    async def events(self, n: int, rate: float) -> Any:
        began = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            yield dict(RECORD, frame=i)


@ray.remote(num_cpus=0)
class Relay:
    def __init__(self, source: Any) -> None:
        self.source = source

    async def events(self, n: int, rate: float) -> Any:
        async for ref in self.source.events.options(num_returns="streaming").remote(n, rate):
            yield await ref


async def measure(hops: int, seconds: float) -> float:
    """CPU ms per record, all processes, with `hops` process boundaries between the source and this driver."""
    target = Source.remote()
    for _ in range(hops - 1):
        target = Relay.remote(target)

    async def drain(n: int, rate: float) -> None:
        async for ref in target.events.options(num_returns="streaming").remote(n, rate):
            await ref

    await drain(10, 1000.0)  # warm
    n = int(seconds * RATE)
    before = busy_cpu_seconds()
    await asyncio.gather(*(drain(n, RATE) for _ in range(GENERATORS)))
    return 1000 * (busy_cpu_seconds() - before) / (GENERATORS * n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    opts = parser.parse_args(argv)
    ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        before = busy_cpu_seconds()
        time.sleep(opts.seconds)
        idle = 1000 * (busy_cpu_seconds() - before) / (GENERATORS * opts.seconds * RATE)
        print(f"idle machine: {idle:.2f} ms per record's time slot")
        for hops in (1, 2, 3):
            print(f"{hops} hop(s): {asyncio.run(measure(hops, opts.seconds)):.2f} ms CPU per record, all processes")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
