"""The floor: a bare Serve handle call between two replicas on this machine, measured the way
../shared/probes/serve_hops.py does (from inside a replica, an echo deployment, 8 crops of 64x64x3 uint8),
one call at a time and three in parallel (the fan-out's shape), and the overhead of a call whose callee takes
50 ms (it sleeps: no CPU), which is what Serve itself costs a hop to a detector. Runs in the caller's Ray."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np
from ray import serve

CROPS = np.zeros((8, 64, 64, 3), np.uint8)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Echo:
    async def classify(self, crops: np.ndarray) -> int:
        return int(crops.shape[0])

    async def slow(self, crops: np.ndarray, ms: float) -> int:
        await asyncio.sleep(ms / 1e3)
        return int(crops.shape[0])


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class HopProbe:
    def __init__(self, echoes: list[Any]) -> None:
        self._echoes = [e.options(_by_reference=False) for e in echoes]

    async def measure(self, n: int) -> dict[str, float]:
        one = self._echoes[0]
        for _ in range(20):
            await one.classify.remote(CROPS)
        single, fanned = [], []
        for _ in range(n):
            t = time.perf_counter()
            await one.classify.remote(CROPS)
            single.append((time.perf_counter() - t) * 1e3)
        for _ in range(n):
            t = time.perf_counter()
            await asyncio.gather(*(e.classify.remote(CROPS) for e in self._echoes))
            fanned.append((time.perf_counter() - t) * 1e3)
        slow = []
        for _ in range(max(n // 4, 10)):
            t = time.perf_counter()
            await one.slow.remote(CROPS, 50.0)
            slow.append((time.perf_counter() - t) * 1e3 - 50.0)
        return {"bare_hop_p50_ms": round(statistics.median(single), 2),
                "bare_fanout_x3_p50_ms": round(statistics.median(fanned), 2),
                "bare_hop_to_a_50ms_callee_overhead_p50_ms": round(statistics.median(slow), 2)}


def measure_bare_hops(n: int = 200) -> dict[str, float]:
    app = HopProbe.bind([Echo.options(name=f"echo{i}").bind() for i in range(3)])
    handle = serve.run(app, name="hops", route_prefix=None)
    try:
        return handle.measure.remote(n).result(timeout_s=300)
    finally:
        serve.delete("hops")
