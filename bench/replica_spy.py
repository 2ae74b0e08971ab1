"""Where a serving replica's CPU goes per request: py-spy samples one replica's threads while a bounded load runs.

bench.run says how much CPU each process spends per request (issue 24: the ingress replicas, 8-12 ms a one-face
request on an H100, where one process spends 0.85 ms an image on the same work in batches); this says which
thread and which functions spend it. It starts one Serve variant of the face demo as bench.run does (a fresh Ray,
127.0.0.1), warms it up, then records `py-spy record --threads --format raw` on the replica for `--seconds` while
`--concurrency` clients post the chosen image, and prints each thread's CPU per request and the functions that
hold it (inclusive samples).

    python -m bench.replica_spy --variant ingress+haproxy --concurrency 16 --seconds 15   # CPU
    python -m bench.replica_spy --device cuda --backend torch --fp16 --concurrency 16    # GPU machine

py-spy (Ray's dependency) must be on PATH or next to this interpreter; on the GPU machine its binary is not in the
device pack (`bash bench/gpu_fixed.sh spy` carries it xz-compressed). Attaching needs ptrace rights over the replica (same user, no Yama
restriction, or CAP_SYS_PTRACE). A sample counts a thread that is not idle: running, or runnable and waiting for a
core. Where the machine's cores are busy (the 2-core box under load) the second inflates every thread's figure: a
Ray histogram's `observe`, 3.6 us alone in a replica, showed there as 120 us. `--gil` counts only the thread holding
the GIL: the Python work that one replica's interpreter does one thread at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.replicas import replica_processes
from bench.run import VARIANTS, add_engine_arguments, images, workload_args

ROOT = Path(__file__).resolve().parent.parent
WRAPPER_SHARE = 0.9  # a function on at least this share of a thread's samples wraps the thread: not listed


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`: one name per function, whatever the line."""
    func, _, where = frame.partition(" (")
    return f"{func} ({Path(where.split(':', 1)[0]).name})" if where else func


def summarise(raw: str, requests: int, rate_hz: int, top: int = 12) -> dict[str, Any]:
    """py-spy's raw output (collapsed stacks, one `thread (TID): NAME;frame;frame COUNT` line per distinct stack)
    -> each thread's CPU ms per request and, per thread, the functions with the most inclusive samples (those on
    nearly every sample of the thread, its bootstrap and loop, left out: they say nothing) and the innermost
    functions where the samples ended (self)."""
    if requests < 1 or rate_hz < 1:
        raise ValueError(f"need requests >= 1 and rate >= 1, got {requests}, {rate_hz}")
    per_thread: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    innermost: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head = frames[0]
        thread = head.split("): ", 1)[1] if "): " in head else head  # thread (123): name -> name
        thread = re.sub(r"_\d+$", "", thread)  # a pool's threads, numbered _0, _1: one name
        samples = int(count)
        per_thread[thread] += samples
        inclusive.setdefault(thread, Counter()).update({name: samples for name in {_frame_name(f) for f in frames[1:]}})
        innermost.setdefault(thread, Counter())[_frame_name(frames[-1]) if len(frames) > 1 else "(native)"] += samples
    ms = 1e3 / rate_hz / requests  # one sample's CPU ms, per request

    def listed(counts: Counter[str], most: int | None = None) -> dict[str, float]:
        return {name: round(n * ms, 3) for name, n in counts.most_common() if most is None or n < most}

    threads = {}
    for thread, samples in per_thread.most_common():
        telling = listed(inclusive[thread], most=int(samples * WRAPPER_SHARE))
        threads[thread] = {"cpu_ms_per_request": round(samples * ms, 3),
                           "functions_ms_per_request": dict(list(telling.items())[:top]),
                           "self_ms_per_request": dict(list(listed(innermost[thread]).items())[:top])}
    return {"requests": requests, "cpu_ms_per_request": round(sum(per_thread.values()) * ms, 3), "threads": threads}


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: it comes with ray[default]; on the GPU machine carry .venv/bin/py-spy")
    return found


async def _load(url: str, body: bytes, concurrency: int, seconds: float) -> int:
    from bench.load_client import LoadClient

    done = 0
    deadline = time.perf_counter() + seconds
    async with LoadClient(concurrency) as client:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.post(url, body)
                response.raise_for_status()
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="ingress+haproxy", choices=list(VARIANTS),
                        help="bench.run's variant: its layout, settings and environment")
    parser.add_argument("--replica", default="ingress", help="the deployment whose first replica is sampled")
    parser.add_argument("--image", default="one", choices=["one", "many"])
    add_engine_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long the replica is sampled (under load)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy's samples per second")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "replica-spy.json"))
    opts = parser.parse_args()
    os.environ.update(VARIANTS[opts.variant][0])  # the variant's environment (HAProxy ...), read as Ray starts
    spy = _py_spy()

    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        args = workload_args("face", opts.device, opts.backend, opts.fp16, 128, VARIANTS[opts.variant][1])
        serve.run(build_app(args), name="spy", route_prefix="/spy")
        pids = sorted(pid for pid, title in replica_processes("spy").items() if title == f"spy:{opts.replica}")
        if not pids:
            raise SystemExit(f"no replica of {opts.replica!r} found")
        url, body = "http://127.0.0.1:8000/spy/v1/infer", images()[opts.image]
        asyncio.run(_load(url, body, opts.concurrency, 5.0))  # warm-up: batch sizes seen, graphs captured
        raw = Path(opts.out).with_suffix(".raw.txt")
        raw.parent.mkdir(parents=True, exist_ok=True)
        recorder = subprocess.Popen([spy, "record", "--pid", str(pids[0]), "--duration", str(int(opts.seconds)),
                                     "--rate", str(opts.rate), "--threads", "--nonblocking", "--format", "raw",
                                     "--output", str(raw), *(["--gil"] if opts.gil else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
        requests = asyncio.run(_load(url, body, opts.concurrency, opts.seconds + 1.0))  # covers the recording
        _, errors = recorder.communicate(timeout=opts.seconds + 60)
        if recorder.returncode != 0 or not raw.exists():
            raise SystemExit(f"py-spy failed ({recorder.returncode}): {errors.strip()[-400:]}")
        # the load ran a second past the recording: count the requests of the recorded seconds only
        recorded = max(1, round(requests * opts.seconds / (opts.seconds + 1.0)))
        result = {"variant": opts.variant, "replica": opts.replica, "pid": pids[0], "image": opts.image, "gil": opts.gil,
                  "device": opts.device, "concurrency": opts.concurrency, "seconds": opts.seconds,
                  "requests_per_s": round(requests / (opts.seconds + 1.0), 1),
                  **summarise(raw.read_text(), recorded, opts.rate)}
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(opts.out).write_text(json.dumps(result, indent=1))
    print(f"{opts.variant}, {opts.image} face(s), c{opts.concurrency}: {result['requests_per_s']} req/s; replica "
          f"{opts.replica} (pid {result['pid']}) {result['cpu_ms_per_request']} ms of CPU a request")
    for thread, entry in result["threads"].items():
        print(f"  {entry['cpu_ms_per_request']:8.3f} ms  {thread}")
        for name, ms in list(entry["functions_ms_per_request"].items())[:6]:
            print(f"             {ms:8.3f}  {name}")
        print("             self: " + ", ".join(f"{name} {ms}" for name, ms in list(entry["self_ms_per_request"].items())[:4]))
    print(f"(JSON: {opts.out})")


if __name__ == "__main__":
    main()
