"""Bounded soak: many requests at high concurrency against the face demo on 127.0.0.1.

    python -m bench.soak --requests 10000 --concurrency 32     # the long soak (docs/reliability.md)

Counts every answer by status, fails on any 5xx or lost response (exception or no answer), and
samples the resident memory of every Serve replica process to show it stays flat. Stops by itself
after --requests or --time-limit, whichever comes first. tests/test_soak.py runs a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.replicas import replica_processes, rss_mib


def replica_rss_mib(app: str) -> dict[str, float]:
    """Resident memory of each replica process of Serve application `app` on this machine, `APP:DEPLOYMENT[pid]`."""
    out = {}
    for pid, title in replica_processes(app).items():
        rss = rss_mib(pid)
        if rss is not None:
            out[f"{title}[{pid}]"] = rss
    return out


@dataclass
class SoakResult:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    lost: int = 0
    partial: int = 0  # 200s that carried a classifier error
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    rss_start: dict[str, float] = field(default_factory=dict)
    rss_middle: dict[str, float] = field(default_factory=dict)  # halfway through the requests
    rss_end: dict[str, float] = field(default_factory=dict)
    rss_samples: list[float] = field(default_factory=list)  # total replica RSS over time
    rss_series: list[dict[str, float]] = field(default_factory=list)  # each replica's RSS, every few requests

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def growth(self, since: dict[str, float]) -> dict[str, float]:
        """Each replica's RSS growth (MiB) from `since` to the end."""
        return {k: round(self.rss_end[k] - since[k], 1) for k in since if k in self.rss_end}

    @property
    def has_thirds(self) -> bool:
        """Enough samples (two a third) for `settled_growth`."""
        return len(self.rss_series) // 3 >= 2

    def settled_growth(self) -> dict[str, float]:
        """Each replica's RSS growth (MiB) from the middle third of the load to the last third, median against
        median. A leak grows with the requests and shows here; a sample that happens to catch frames and batches
        in flight (30 MiB for a moment in the detector) does not, where a two-point difference took it for one."""
        if not self.has_thirds:
            raise ValueError(f"{len(self.rss_series)} RSS samples are too few to compare thirds")
        third = len(self.rss_series) // 3
        middle, last = self.rss_series[third : 2 * third], self.rss_series[2 * third :]
        growth = {}
        for key in self.rss_start:
            before, after = [s[key] for s in middle if key in s], [s[key] for s in last if key in s]
            if before and after:  # a replica that was replaced has no samples under its old pid
                growth[key] = round(float(np.median(after) - np.median(before)), 1)
        return growth

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "statuses": dict(self.statuses),
            "server_errors": self.server_errors,
            "lost": self.lost,
            "partial_answers": self.partial,
            "p50_ms": round(float(np.percentile(self.latencies_ms, 50)), 1) if self.latencies_ms else None,
            "p95_ms": round(float(np.percentile(self.latencies_ms, 95)), 1) if self.latencies_ms else None,
            "throughput_rps": round(self.requests / self.wall_s, 1) if self.wall_s else None,
            "replica_rss_mib_start": {k: round(v, 1) for k, v in self.rss_start.items()},
            "replica_rss_mib_growth": self.growth(self.rss_start),
            "replica_rss_mib_growth_second_half": self.growth(self.rss_middle),
            "replica_rss_mib_growth_settled": self.settled_growth() if self.has_thirds else None,
            "total_rss_mib_samples": [round(v, 1) for v in self.rss_samples],
        }


async def soak(url: str, bodies: list[bytes], requests: int, concurrency: int, time_limit_s: float,
               app: str, sample_every_s: float = 5.0, warmup: int = 64, samples: int = 30) -> SoakResult:
    """`requests` POSTs at `concurrency` to `url`, bounded by `time_limit_s`; the RSS of application `app`'s
    replicas after the warm-up, halfway, at the end, `samples` times evenly over the requests, and the total every
    `sample_every_s`."""
    import aiohttp

    from bench.load_client import LoadClient

    result = SoakResult()
    async with LoadClient(concurrency) as client:
        # the warm-up runs at the soak's concurrency, so that what load itself allocates (frames and batches in
        # flight, allocator arenas sized for the largest batch of the mix) lands before the first sample and does
        # not count as growth; sequential warm-up left that to the first minutes of load
        for start in range(0, warmup, concurrency):
            await asyncio.gather(*(client.post(url, bodies[i % len(bodies)])
                                   for i in range(start, min(start + concurrency, warmup))))
        result.rss_start = replica_rss_mib(app)
        remaining = requests
        deadline = time.perf_counter() + time_limit_s
        next_sample = 0.0

        async def worker(w: int) -> None:
            nonlocal remaining, next_sample
            i = w
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                i += concurrency
                t0 = time.perf_counter()
                try:
                    response = await client.post(url, bodies[i % len(bodies)])
                except (aiohttp.ClientError, TimeoutError):
                    result.lost += 1
                    continue
                result.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                result.statuses[response.status_code] += 1
                if response.status_code == 200 and response.json()["errors"]:
                    result.partial += 1
                result.requests += 1
                if result.requests == requests // 2:
                    result.rss_middle = replica_rss_mib(app)
                if result.requests % max(1, requests // samples) == 0:
                    result.rss_series.append(replica_rss_mib(app))
                if time.perf_counter() >= next_sample:
                    next_sample = time.perf_counter() + sample_every_s
                    result.rss_samples.append(sum(replica_rss_mib(app).values()))

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    result.rss_end = replica_rss_mib(app)
    return result


def sample_bodies() -> list[bytes]:
    from tests.images import ASTRONAUT, NO_FACE, collage, encode, read

    return [encode(read(ASTRONAUT), ".jpg"), encode(collage(), ".jpg"), NO_FACE.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=3600.0)
    parser.add_argument("--out", default="bench/out/soak.json")
    opts = parser.parse_args(argv)

    import ray
    from ray import serve

    from bench.workloads import face_args
    from serve_app.app import build_app

    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8011})
    try:
        args = face_args()
        args["ingress"]["deployment"]["max_ongoing_requests"] = 64
        serve.run(build_app(args), name="soak", route_prefix="/")
        result = asyncio.run(soak("http://127.0.0.1:8011/v1/infer", sample_bodies(), opts.requests, opts.concurrency,
                                  opts.time_limit, app="soak"))
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = result.summary()
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "total_rss_mib_samples"}, indent=2))
    ok = result.server_errors == 0 and result.lost == 0 and result.requests == opts.requests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
