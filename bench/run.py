"""One command, one table: the in-process pipeline and the Ray Serve graph, side by side on the same
models and images.

    python -m bench.run                      # CPU, face demo + resnet stand-ins, every variant
    python -m bench.run --device cuda --backend torch --fp16 --standin-size 224   # on a GPU

For each workload it measures, in one run:
  1. in process (project engines, no Ray): each stage's time, classifiers sequential, and the ideal
     parallel figure t_det + max(t_i) from the same per-request stage times;
  2. the Serve graph through handles (driver -> detector/classifier deployments), sequential and parallel;
  3. the graph end to end over HTTP on 127.0.0.1, at concurrency 1 (sequential and parallel), 4 and 16;
  4. concurrency 16 without cross-request batching (max_batch_size 1);
and the framework CPU per request (all processes, minus model compute). Each Serve variant (access
logs, handle options, Serve's event-loop settings) runs in a fresh Ray in its own subprocess.
Load is bounded in count and time, talks only to 127.0.0.1, and stops by itself.
Results: a markdown table on stdout and JSON under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name -> (environment for the whole Ray cluster, config overrides)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "serve-defaults": ({}, {"access_log": True, "by_reference": True}),
    "by-value": ({}, {"access_log": True, "by_reference": False}),  # the project's defaults
    "no-access-log": ({}, {"access_log": False, "by_reference": True}),
    "no-log+by-value": ({}, {"access_log": False, "by_reference": False}),
    "no-log+by-value+inline": ({}, {"access_log": False, "by_reference": False, "execution": "inline"}),
    "throughput-optimized": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, {"access_log": False, "by_reference": False}),
    "no-log+same-loop": (
        {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
        {"access_log": False, "by_reference": True},
    ),
}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(latencies: list[float], wall_s: float) -> dict[str, float]:
    return {
        "n": len(latencies),
        "p50_ms": round(pct(latencies, 50), 2),
        "p95_ms": round(pct(latencies, 95), 2),
        "rps": round(len(latencies) / wall_s, 2) if wall_s > 0 else 0.0,
    }


def busy_cpu_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (user + system), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def closed_loop(call, concurrency: int, requests: int, time_limit_s: float) -> tuple[list[float], float]:
    """`concurrency` workers issue `requests` calls in all (or stop at the time limit); latencies in ms."""
    latencies: list[float] = []
    remaining = requests
    deadline = time.perf_counter() + time_limit_s

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            t0 = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - t0) * 1e3)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# One variant, in a fresh process with its own Ray.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload_args(name: str, opts: argparse.Namespace) -> dict[str, Any]:
    from bench import workloads

    if name == "face":
        return workloads.face_args()
    from bench.standin import export_resnets

    models = export_resnets(ROOT / "bench" / "out" / "models", opts.standin_size)
    return workloads.standin_args(models, opts.standin_size)


def run_variant(opts: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from tests.images import ASTRONAUT, encode, read

    _, overrides = VARIANTS[opts.variant]
    loop = asyncio.new_event_loop()  # one loop for every handle call: handles bind to the loop they first run on
    frame = read(ASTRONAUT)
    body = encode(frame, ".jpg")
    results: dict[str, Any] = {"variant": opts.variant, "workloads": {}}
    ray.init(num_cpus=opts.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for workload in opts.workloads:
            try:
                results["workloads"][workload] = measure_workload(workload, opts, overrides, frame, body, port, loop)
            except Exception as exc:  # one broken workload must not cost the others' numbers
                import traceback

                traceback.print_exc()
                results.setdefault("failed", {})[workload] = f"{type(exc).__name__}: {exc}"
                for app_name in list(serve.status().applications):
                    serve.delete(app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
        loop.close()
    return results


def measure_workload(workload: str, opts: argparse.Namespace, overrides: dict[str, Any], frame: np.ndarray,
                     body: bytes, port: int, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    import httpx
    from ray import serve

    from bench.inprocess import InProcessPipeline
    from bench.workloads import tune
    from serve_app.app import build_app
    from serve_app.config import PipelineConfig
    from serve_app.graph import ClassifierRoute, InferenceGraph

    n = opts.requests
    base = _workload_args(workload, opts)
    out: dict[str, Any] = {}
    for batching, max_batch in (("batched", None), ("unbatched", 1)):
        if batching == "unbatched" and not opts.unbatched:
            continue
        args = tune(base, device=opts.device, backend=opts.backend, fp16=opts.fp16,
                    access_log=overrides["access_log"], by_reference=overrides["by_reference"],
                    max_batch_size=max_batch, execution=overrides.get("execution", "auto"))
        config = PipelineConfig.model_validate(args)
        if batching == "batched" and opts.inprocess:
            out["inprocess"] = measure_inprocess(InProcessPipeline(config, opts.device), frame, n)
        app = f"bench-{workload}-{batching}"
        serve.run(build_app(args), name=app, route_prefix=f"/{app}")
        url = f"http://127.0.0.1:{port}/{app}/v1/infer"
        with httpx.Client(timeout=60) as client:  # warm every replica and batch path
            for _ in range(5):
                client.post(url, content=body, headers={"Content-Type": "image/jpeg"}).raise_for_status()
        if batching == "batched":
            routes = [ClassifierRoute.from_config(c, serve.get_deployment_handle(c.name, app))
                      for c in config.classifiers]
            graph = InferenceGraph(serve.get_deployment_handle("detector", app), routes, 30.0)
            out["handles"] = loop.run_until_complete(measure_handles(graph, frame, n))
            out["http"] = loop.run_until_complete(measure_http(url, body, n, opts.time_limit))
        else:
            out["http_unbatched"] = loop.run_until_complete(
                measure_http(url, body, n, opts.time_limit, levels=((16, "parallel"),)))
        serve.delete(app)
    return out


def measure_inprocess(pipeline: Any, frame: np.ndarray, n: int) -> dict[str, Any]:
    for _ in range(3):
        pipeline.run(frame)
    runs = [pipeline.run(frame) for _ in range(n)]
    stages = {"detector": [r.detector for r in runs]}
    for name in runs[0].classifiers:
        stages[name] = [r.classifiers[name] for r in runs]
    return {
        "stage_p50_ms": {k: round(pct(v, 50), 2) for k, v in stages.items()},
        "sequential_p50_ms": round(pct([r.sequential for r in runs], 50), 2),
        "ideal_parallel_p50_ms": round(pct([r.ideal_parallel for r in runs], 50), 2),
        "batched_throughput_rps": {k: round(v, 1) for k, v in pipeline.batched_throughput(frame, 16, 20).items()},
    }


async def measure_handles(graph: Any, frame: np.ndarray, n: int) -> dict[str, Any]:
    out = {}
    for mode in ("sequential", "parallel"):
        lat, wall = await closed_loop(lambda m=mode: graph.run(frame, m), 1, n, 120)
        out[mode] = summary(lat, wall)
    return out


async def measure_http(url: str, body: bytes, n: int, time_limit: float,
                       levels: tuple = ((1, "sequential"), (1, "parallel"), (4, "parallel"), (16, "parallel"))) -> dict:
    import httpx

    out: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for concurrency, mode in levels:
            errors = 0

            async def call(m: str = mode) -> None:
                nonlocal errors
                response = await client.post(url, content=body, headers={"Content-Type": "image/jpeg"},
                                             params={"mode": m})
                if response.status_code != 200 or response.json()["errors"]:
                    errors += 1

            count = n if concurrency == 1 else n * 2
            cpu0, own0 = busy_cpu_seconds(), own_cpu_seconds()
            lat, wall = await closed_loop(call, concurrency, count, time_limit)
            cpu_ms = ((busy_cpu_seconds() - cpu0) - (own_cpu_seconds() - own0)) * 1e3 / max(len(lat), 1)
            key = f"c{concurrency}_{mode}"
            out[key] = {**summary(lat, wall), "errors": errors, "server_cpu_ms_per_request": round(cpu_ms, 1)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole table: every variant in its own subprocess, then one report.


def environment(opts: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import ray

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpus": os.cpu_count(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), platform.processor()),
    }
    if opts.backend == "torch" or opts.device == "cuda":
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def ratios(w: dict[str, Any]) -> dict[str, float]:
    ip, http = w.get("inprocess"), w.get("http", {})
    r: dict[str, float] = {}
    if not ip or not http:
        return r
    par, seq = http["c1_parallel"]["p50_ms"], http["c1_sequential"]["p50_ms"]
    stages = ip["stage_p50_ms"]
    det, cls = stages["detector"], [v for k, v in stages.items() if k != "detector"]
    ideal_par, ideal_seq = det + max(cls), det + sum(cls)
    r["parallel_http_p50_over_ideal"] = round(par / ideal_par, 3)
    r["seq_over_par_achieved_vs_theoretical"] = round((seq / par) / (ideal_seq / ideal_par), 3)
    r["graph_minus_inprocess_sequential_ms"] = round(seq - ip["sequential_p50_ms"], 1)
    r["graph_minus_inprocess_parallel_ideal_ms"] = round(par - ideal_par, 1)
    compute_ms = det + sum(cls)
    r["framework_cpu_ms_per_request"] = round(http["c1_parallel"]["server_cpu_ms_per_request"] - compute_ms, 1)
    slowest = min(ip["batched_throughput_rps"].values())
    r["c16_throughput_over_slowest_stage"] = round(http["c16_parallel"]["rps"] / slowest, 3)
    return r


def report(env: dict[str, Any], variants: list[dict[str, Any]]) -> str:
    lines = [f"Machine: {env['cpu_model']}, {env['cpus']} cores" + (f", {env['gpu']}" if "gpu" in env else ""),
             f"Versions: Python {env['python']}, Ray {env['ray']}, ONNX Runtime {env['onnxruntime']}"
             + (f", torch {env['torch']}" if "torch" in env else ""),
             f"Command: `{env['command']}` ({env['date']})", ""]
    for v in variants:
        for name, error in v.get("failed", {}).items():
            lines += [f"### {name} / {v['variant']}", f"FAILED: {error}", ""]
        for name, w in v["workloads"].items():
            lines.append(f"### {name} / {v['variant']}")
            ip = w.get("inprocess")
            if ip:
                stages = ", ".join(f"{k} {ms}" for k, ms in ip["stage_p50_ms"].items())
                lines.append(f"in process p50 ms: {stages}; sequential {ip['sequential_p50_ms']}, "
                             f"ideal parallel (t_det + max t_i) {ip['ideal_parallel_p50_ms']}")
            lines.append("")
            lines.append("| path | mode | concurrency | p50 ms | p95 ms | req/s | server CPU ms/req |")
            lines.append("|---|---|---|---|---|---|---|")
            for mode, s in w.get("handles", {}).items():
                lines.append(f"| handles | {mode} | 1 | {s['p50_ms']} | {s['p95_ms']} | {s['rps']} | |")
            for label, table in (("HTTP", w.get("http", {})), ("HTTP, no batching", w.get("http_unbatched", {}))):
                for key, s in table.items():
                    c, mode = key.split("_", 1)
                    lines.append(f"| {label} | {mode} | {c[1:]} | {s['p50_ms']} | {s['p95_ms']} | {s['rps']} | "
                                 f"{s['server_cpu_ms_per_request']} |")
            r = ratios(w)
            if r:
                lines.append("")
                lines.append("ratios: " + ", ".join(f"{k} = {val}" for k, val in r.items()))
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["face", "standin"], choices=["face", "standin"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--standin-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=40, help="per measurement at concurrency 1 (x2 above)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per measurement, at most")
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs for Ray (default: the machine's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--tag", default="", help="suffix for the JSON file name")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # inner mode: run one variant, print JSON
    parser.add_argument("--no-inprocess", dest="inprocess", action="store_false")
    parser.add_argument("--no-unbatched", dest="unbatched", action="store_false")
    opts = parser.parse_args(argv)
    opts.ray_cpus = opts.ray_cpus or os.cpu_count()

    if opts.variant:
        print("RESULT " + json.dumps(run_variant(opts)), flush=True)
        return 0

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(opts)
    variants = []
    for i, name in enumerate(opts.variants):
        child_env = {**os.environ, **VARIANTS[name][0]}
        cmd = [sys.executable, "-m", "bench.run", "--variant", name, *(argv if argv is not None else sys.argv[1:])]
        if i > 0:
            cmd.append("--no-inprocess")  # the in-process baseline is measured once, in the first variant
        print(f"running variant {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=child_env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(f"variant {name} failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
            continue
        variants.append(json.loads(line[len("RESULT "):]))
    if not variants:
        return 1
    if len(variants) > 1:  # ratios for later variants use the first variant's in-process baseline
        for v in variants[1:]:
            for name, w in v["workloads"].items():
                w.setdefault("inprocess", variants[0]["workloads"].get(name, {}).get("inprocess"))
    result = {"environment": env, "variants": variants}
    path = out / f"bench-{opts.device}{('-' + opts.tag) if opts.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(report(env, variants))
    print(f"\n(JSON: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
