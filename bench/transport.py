"""By value or by reference: what a Serve handle call costs with a frame in it, in each direction.

    python -m bench.transport                # 8 crops, 512x512, 720p, 1080p and 4K BGR frames, 30 calls each
    python -m bench.transport --calls 100 --out docs/results/transport-cpu-2core.json

Ray Serve 2.60 sends a call `by value` (`_by_reference=False`) as cloudpickle over the callee replica's gRPC
server, whose messages are capped at `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` (4 MiB by default: a 1080p
frame is 6.2 MB); `by reference` goes through Ray's object store. For every size the caller (a replica, as the
ingress is) sends the frame as the argument (`to callee`) and asks for one back as the result (`from callee`),
by value and by reference, one call at a time; by value runs with the cap raised in both replicas so that it
can be measured at all. Serve runs in a fresh local Ray (127.0.0.1) in this process; results are medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"8 crops of 64x64": (64, 512), "512x512": (512, 512), "720p": (1280, 720), "1080p": (1920, 1080),
         "4K": (3840, 2160)}
UNCAPPED = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(512 * 1024 * 1024)}


def _deployments() -> tuple[Any, Any]:
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": UNCAPPED}})
    class Callee:
        def __init__(self) -> None:
            self._frames = {name: np.full((h, w, 3), 7, np.uint8) for name, (w, h) in SIZES.items()}

        async def take(self, frame: np.ndarray) -> int:
            return int(frame[0, 0, 0])

        async def give(self, name: str) -> np.ndarray:
            return self._frames[name]

    @serve.deployment(ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": UNCAPPED}})
    class Caller:
        def __init__(self, callee: Any) -> None:
            self._by = {"value": callee.options(_by_reference=False), "reference": callee.options(_by_reference=True)}
            self._frames = {name: np.full((h, w, 3), 7, np.uint8) for name, (w, h) in SIZES.items()}

        async def measure(self, calls: int) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for name, frame in self._frames.items():
                for how, handle in self._by.items():
                    for direction, call in (("to callee", lambda h=handle, f=frame: h.take.remote(f)),
                                            ("from callee", lambda h=handle, n=name: h.give.remote(n))):
                        for _ in range(3):
                            await call()
                        times = []
                        for _ in range(calls):
                            start = time.perf_counter()
                            await call()
                            times.append((time.perf_counter() - start) * 1e3)
                        out.setdefault(f"{name} {direction}", {})[how] = round(statistics.median(times), 2)
            return out

    return Caller, Callee


def measure(calls: int) -> dict[str, Any]:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="bench-transport")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        caller, callee = _deployments()
        handle = serve.run(caller.bind(callee.bind()), name="transport", route_prefix=None)
        table = handle.measure.remote(calls).result(timeout_s=900)
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "ray": ray.__version__, "calls": calls, "median_ms": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30, help="calls per size, direction and mode")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    opts = parser.parse_args()
    result = measure(opts.calls)
    print("| frame, direction | by value (ms) | by reference (ms) | reference / value |")
    print("|---|---|---|---|")
    for row, cells in result["median_ms"].items():
        print(f"| {row} | {cells['value']} | {cells['reference']} | {cells['reference'] / cells['value']:.2f} |")
    if opts.out:
        opts.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
