"""One command, one table: the in-process pipeline, a plain FastAPI server, and the Ray Serve graph in
each layout, side by side on the same models and the same image.

    python -m bench.run                      # CPU: face demo + resnet stand-ins, the default variants
    python -m bench.run --device cuda --backend torch --fp16 --standin-size 224   # on a GPU

For each workload it measures, in one run:
  1. in process (project engines, no Ray, no HTTP): decode and each stage's time, the classifiers one
     after another, the ideal parallel figure decode + t_det + max(t_i), and each stage's batched throughput;
  2. the anchor: the same engines in one FastAPI + uvicorn process, classifiers sequential, same HTTP
     path and same per-request work (bench/anchor.py), at concurrency 1, 4 and 16;
  3. the bare Serve hop on this machine (bench/hops.py): one handle call between replicas, and three
     in parallel;
  4. each Serve variant (layout, ingress proxy, execution), end to end over HTTP on 127.0.0.1 at
     concurrency 1 (sequential and parallel), 4 and 16, with the per-request breakdown (`?trace=true` on
     every parallel request: the medians at c1, and at c4 and c16 the spans of the slowest 5 % against the
     medians, so a tail shows which span grew) and the server CPU per request (all processes, /proc/stat).
Every measurement is made on two images (`--images`): the one-face portrait, where the detector is most of
a request, and eight faces in one photo, where the classifiers matter (8 crops each); the second appears
as the workload `<name>-many`.
With `--gpus 1 2` each variant also runs on two cards (every deployment's replicas doubled, one set of models
per card), side by side with one card, at c32 as well, recording each card's utilisation at c16 and c32 and
which replica holds a CUDA context on which card (`bench/gpus.py`); the two-card runs appear as `<variant>@2gpu`.
Each Serve variant runs in a fresh Ray in its own subprocess. Load is bounded in count and time, talks
only to 127.0.0.1, and stops by itself. Results: markdown on stdout, JSON under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import proc_cpu
from bench.gpus import UtilisationSampler, one_set_per_card, replicas_by_card, visible_devices

ROOT = Path(__file__).resolve().parent.parent
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# the user code on the replica's own (uvloop) event loop, the one its HTTP server runs on with HAProxy, instead of a
# loop of its own on another thread (Ray 2.60's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, default 1)
ONE_LOOP = {**HAPROXY, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

# name -> (environment of the whole Ray cluster, config overrides)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "separate": ({}, {"layout": "separate"}),
    "separate+haproxy": (HAPROXY, {"layout": "separate"}),
    "colocated+haproxy": (HAPROXY, {"layout": "colocated"}),
    "ingress+haproxy": (HAPROXY, {"layout": "ingress"}),
    "separate+haproxy+thread": (HAPROXY, {"layout": "separate", "execution": "thread"}),
    "separate+haproxy+frame": (HAPROXY, {"layout": "separate", "detector_input": "frame"}),
    "separate+haproxy+no-log": (HAPROXY, {"layout": "separate", "access_log": False}),
    "separate+haproxy+cpu-threads": (HAPROXY, {"layout": "separate", "cpu_work": "threads"}),
    "ingress+haproxy+cpu-threads": (HAPROXY, {"layout": "ingress", "cpu_work": "threads"}),
    # the GPU-resident image path (issue 24): `ingress` keeps frames on the device where it can (auto); these force
    "ingress+haproxy+host-frames": (HAPROXY, {"layout": "ingress", "frames_on_device": False}),
    "ingress+haproxy+device-frames": (HAPROXY, {"layout": "ingress", "frames_on_device": True}),
    "ingress+haproxy+x2": (HAPROXY, {"layout": "ingress", "ingress_replicas": 2}),
    # frames on the device stage by stage (decode, detect, cut, each classifier batched on its own, a hand-over
    # between the loop and a thread per step) instead of the whole pipeline a batch at a time (the default)
    "ingress+haproxy+stages": (HAPROXY, {"layout": "ingress", "device_pass": "stages"}),
    "ingress+haproxy+x2+stages": (HAPROXY, {"layout": "ingress", "ingress_replicas": 2, "device_pass": "stages"}),
    "ingress+haproxy+device-frames+stages": (HAPROXY, {"layout": "ingress", "frames_on_device": True,
                                                       "device_pass": "stages"}),
    "ingress+haproxy+one-loop": (ONE_LOOP, {"layout": "ingress"}),
    # examples/faces_gpu.yaml: two ingress replicas sharing the card, each with its code on its own loop
    "ingress+haproxy+x2+one-loop": (ONE_LOOP, {"layout": "ingress", "ingress_replicas": 2}),
    "ingress+haproxy+x4": (HAPROXY, {"layout": "ingress", "ingress_replicas": 4}),
    "ingress+haproxy+x3+one-loop": (ONE_LOOP, {"layout": "ingress", "ingress_replicas": 3}),
    "ingress+haproxy+x4+one-loop": (ONE_LOOP, {"layout": "ingress", "ingress_replicas": 4}),
    # Ray's documented high-throughput mode beside HAProxy (RAY_SERVE_THROUGHPUT_OPTIMIZED=1): the user code on the
    # replica's loop (as one-loop), request-path log lines buffered (1000) and kept off stderr (so off Ray's log
    # monitor and the driver), gRPC between deployments, the garbage collector's start-up objects frozen
    "ingress+haproxy+throughput": ({**HAPROXY, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, {"layout": "ingress"}),
    "ingress+haproxy+x4+throughput": ({**HAPROXY, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
                                      {"layout": "ingress", "ingress_replicas": 4}),
    # the data-following cascade instead of the fixed shapes (run 13, H100: half the detector's kernels a frame, 2.5-3x
    # its host CPU; the eight-face photo's pooled fixed shapes cost 5.5 against 2.9 ms of kernels an image)
    "ingress+haproxy+x4+one-loop+data-following": (ONE_LOOP,
                                                   {"layout": "ingress", "ingress_replicas": 4, "fixed_shapes": False}),
    # the whole pass's decode on a thread of its own (ingress.decode_apart) while the detector works on the batch before
    "ingress+haproxy+x4+one-loop+decode-apart": (ONE_LOOP,
                                                 {"layout": "ingress", "ingress_replicas": 4, "decode_apart": True}),
    "ingress+haproxy+x2+one-loop+decode-apart": (ONE_LOOP,
                                                 {"layout": "ingress", "ingress_replicas": 2, "decode_apart": True}),
    # torch's CPU pool at every core, as the engines left it on CUDA before they held it to `intra_op_threads`
    "ingress+haproxy+x2+threads16": (HAPROXY, {"layout": "ingress", "ingress_replicas": 2, "host_threads": 16}),
}
DEFAULT_VARIANTS = ["separate", "separate+haproxy", "colocated+haproxy", "ingress+haproxy"]
LEVELS = ((1, "sequential"), (1, "parallel"), (4, "parallel"), (16, "parallel"))
SATURATION = ((64, "parallel"), (128, "parallel"))  # --saturate: where the card, not the clients, is the limit
SEVERAL_GPU_LEVELS = (*LEVELS, (32, "parallel"))  # two cards need more clients to fill
SAMPLED_LEVELS = (16, 32)  # the GPU utilisation is sampled during these concurrencies
IMAGES = ("one", "many")
WARM_UP_ROUNDS = 4  # before each level above c1: that many requests per client, unmeasured
SLOWEST_SHARE = 0.05  # the tail whose spans are printed: the slowest 5 % of each c4 / c16 run


def images() -> dict[str, bytes]:
    """The two request bodies, JPEG: one face (the 512x512 portrait) and eight faces (768x1536)."""
    from tests.images import ASTRONAUT, encode, many_faces, read

    return {"one": encode(read(ASTRONAUT), ".jpg"), "many": encode(many_faces(), ".jpg")}


def key_of(workload: str, image: str) -> str:
    """The report's name for a workload on an image: `face`, `face-many`."""
    return workload if image == "one" else f"{workload}-{image}"


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
    """CPU seconds the whole machine spent busy so far, from /proc/stat (`proc_cpu.busy`: steal left out)."""
    return proc_cpu.busy(proc_cpu.host_kinds())


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload_args(name: str, device: str, backend: str, fp16: bool, standin_size: int,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from bench import workloads

    if name == "face":
        base = workloads.face_args()
    else:
        from bench.standin import export_resnets

        base = workloads.standin_args(export_resnets(ROOT / "bench" / "out" / "models", standin_size), standin_size)
    return workloads.tune(base, device=device, backend=backend, fp16=fp16, **(overrides or {}))


def workload_config(name: str, device: str, backend: str, fp16: bool, standin_size: int) -> Any:
    from serve_app.config import PipelineConfig

    return PipelineConfig.model_validate(workload_args(name, device, backend, fp16, standin_size))


# ---------------------------------------------------------------------------------------------------------------
# HTTP load, the same for the graph and the anchor.


def _flatten(trace: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in trace.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        elif value is not None:
            out[f"{prefix}{key}"] = float(value)
    return out


def _medians(traces: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for t in traces for k in t)
    return {k: round(statistics.median(t[k] for t in traces if k in t), 2) for k in keys}


def slowest_spans(traces: list[dict[str, float]], share: float = SLOWEST_SHARE) -> dict[str, Any]:
    """The slowest `share` of the traced requests (at least one) with each span's excess over its median, the
    spans that grew most first: where a tail's time went."""
    if not traces:
        return {}
    medians = _medians(traces)
    count = max(1, round(len(traces) * share))
    slow = sorted(traces, key=lambda t: -t["client_ms"])[:count]
    rows = []
    for t in slow:
        excess = {k: round(v - medians[k], 2) for k, v in t.items()
                  if k.endswith("_ms") and k not in ("client_ms", "total_ms") and not k.endswith("start_ms")
                  and not k.endswith("gpu_end_ms") and not k.endswith("gpu_start_ms")}
        top = dict(sorted(excess.items(), key=lambda kv: -kv[1])[:4])
        rows.append({"client_ms": round(t["client_ms"], 1), "median_client_ms": medians["client_ms"],
                     "grew_ms": top})
    return {"count": len(traces), "slowest": rows}


async def measure_http(url: str, body: bytes, n: int, time_limit: float, levels: tuple = LEVELS,
                       trace: bool = True, sample_gpus: bool = False, all_levels: bool = False, replicas: int = 1,
                       count_batches: bool = False, detectors_per_ingress: bool = False) -> dict[str, Any]:
    """Each level's latency, throughput, errors and server CPU per request; the GPU's busy fraction at c16 and c32,
    or at every level (`all_levels`); `count_batches`: the detector's batches during each level (one replica's,
    from GET /v1/pipeline: their mean size, and which cascade answered); `replicas`: the ingress's, each warmed
    before the first level (run 9: with two or three, c1's p95 was 6-7x its p50, the first sights of some);
    `detectors_per_ingress` (layout ingress): each of them holds a detector, and the counts are summed over them."""
    from bench.load_client import LoadClient

    out: dict[str, Any] = {}
    async with LoadClient(max(32, *(c for c, _ in levels))) as client:
        for _ in range(5 * replicas):  # warm every replica's batch path (a lone request's graphs: second sight)
            (await client.post(url, body)).raise_for_status()
        for concurrency, mode in levels:
            errors = 0
            traces: list[dict[str, float]] = []
            # the breakdown up to c16; the saturation levels measure throughput with plain requests, as a client
            # sends them (run 8: c64 fell below c16 with every request traced, where a plain c64 load did not)
            want_trace = trace and mode == "parallel" and concurrency <= 16

            async def call(m: str = mode, t: bool = want_trace, sink: list = traces) -> None:
                nonlocal errors
                t0 = time.perf_counter()
                params = {"mode": m, **({"trace": "true"} if t else {})}
                response = await client.post(url, body, params=params)
                client_ms = (time.perf_counter() - t0) * 1e3
                answer = response.json() if response.status_code == 200 else {}
                if response.status_code != 200 or answer.get("errors"):
                    errors += 1
                elif t and answer.get("trace"):
                    spans = _flatten(answer["trace"])
                    spans["proxy_and_http_ms"] = client_ms - spans["total_ms"]
                    spans["client_ms"] = client_ms
                    sink.append(spans)

            count = n if concurrency == 1 else max(n * 2, concurrency * 8)
            if concurrency > 1:  # unmeasured: the batch sizes this level forms are seen (and their graphs captured)
                await closed_loop(lambda: client.post(url, body), concurrency, concurrency * WARM_UP_ROUNDS,
                                  time_limit)
            counting = replicas if detectors_per_ingress else 1
            counted = await detector_counts(client, url, replicas=counting) if count_batches else None
            sampler = UtilisationSampler().start() if sample_gpus and (concurrency in SAMPLED_LEVELS or all_levels) \
                else None
            kinds0, own0, procs0 = proc_cpu.host_kinds(), own_cpu_seconds(), proc_cpu.snapshot()
            lat, wall = await closed_loop(call, concurrency, count, time_limit)
            procs1, kinds1 = proc_cpu.snapshot(), proc_cpu.host_kinds()
            left_out = (os.getpid(), sampler.pid if sampler else None)
            cpu_s = (proc_cpu.busy(kinds1) - proc_cpu.busy(kinds0)) - (own_cpu_seconds() - own0) - \
                proc_cpu.spent(procs0, procs1, left_out[1])
            served = max(len(lat), 1)
            roles = proc_cpu.by_role(procs0, procs1, left_out)
            key = f"c{concurrency}_{mode}"
            out[key] = {**summary(lat, wall), "errors": errors, "server_cpu_ms_per_request": round(cpu_s * 1e3 / served, 1),
                        # where it went: each kind of process's CPU per request (the largest six; ms)
                        "server_cpu_ms_per_request_by_process": {role: round(seconds * 1e3 / served, 2) for role, seconds
                                                                 in list(roles.items())[:6]},
                        # the whole host's by kind (the client's and the sampler's included; steal is not in
                        # the server's figure), and the server's part that no live process was charged (the
                        # kernel's interrupts, processes that ended)
                        "host_cpu_ms_per_request_by_kind": {k: round((kinds1[k] - kinds0[k]) * 1e3 / served, 2)
                                                            for k in kinds1},
                        "server_cpu_ms_per_request_unattributed": round((cpu_s - sum(roles.values())) * 1e3 / served, 2)}
            if sampler is not None:
                out[key]["gpu_utilisation"] = sampler.stop()
            if counted is not None:
                out[key]["detector"] = await detector_counts(client, url, counted, counting)
            if traces and concurrency == 1:
                out["breakdown_p50_ms"] = _medians(traces)
            elif traces:
                out.setdefault("tails", {})[key] = slowest_spans(traces)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Baselines: in process, and the FastAPI anchor.


def measure_inprocess(opts: argparse.Namespace, workload: str, bodies: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Per image: each stage's p50 in one process, the sequential and ideal parallel sums, the classifiers
    launched together, and each stage's batched throughput."""
    from bench.inprocess import InProcessPipeline

    started = time.perf_counter()
    pipeline = InProcessPipeline(workload_config(workload, opts.device, opts.backend, opts.fp16, opts.standin_size),
                                 opts.device)
    startup_s = round(time.perf_counter() - started, 2)
    out = {}
    for image, body in bodies.items():
        warm_until = time.monotonic() + 3.0  # GPU and CPU clocks ramp up: a short warm-up measured the ramp
        while time.monotonic() < warm_until:
            pipeline.run(body)
        runs = [pipeline.run(body) for _ in range(opts.requests)]
        stages = {"decode": [r.decode for r in runs], "detector": [r.detector for r in runs]}
        for name in runs[0].classifiers:
            stages[name] = [r.classifiers[name] for r in runs]
        frame = pipeline.decode(body)
        out[image] = {
            "startup_s": startup_s,
            "stage_p50_ms": {k: round(pct(v, 50), 2) for k, v in stages.items()},
            "sequential_p50_ms": round(pct([r.sequential for r in runs], 50), 2),
            "ideal_parallel_p50_ms": round(pct([r.ideal_parallel for r in runs], 50), 2),
            "classifiers_together_p50_ms": round(pct([r.parallel for r in runs], 50), 2),
            "batched_throughput_rps": {k: round(v, 1) for k, v in pipeline.batched_throughput(frame, 16, 20).items()},
        }
    return out


def measure_anchor(opts: argparse.Namespace, workload: str, bodies: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "bench.anchor", "--port", str(port), "--workload", workload, "--device", opts.device,
           "--backend", opts.backend, "--standin-size", str(opts.standin_size), *(["--fp16"] if opts.fp16 else [])]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"anchor server exited: {server.stderr.read()[-2000:] if server.stderr else ''}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        levels = ((1, "sequential"), (4, "sequential"), (16, "sequential"))
        return {image: asyncio.run(measure_http(f"http://127.0.0.1:{port}/v1/infer", body, opts.requests,
                                                opts.time_limit, levels=levels, trace=False))
                for image, body in bodies.items()}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# ---------------------------------------------------------------------------------------------------------------
# One Serve variant, in a fresh process with its own Ray.


def run_variant(opts: argparse.Namespace, bodies: dict[str, bytes]) -> dict[str, Any]:
    import ray
    from ray import serve

    from bench.hops import measure_bare_hops
    from serve_app.app import build_app

    _, overrides = VARIANTS[opts.variant]
    overrides = {**overrides, "replicas": opts.gpu_count}
    levels = SEVERAL_GPU_LEVELS if max(opts.gpus) > 1 else LEVELS
    levels = (*levels, *SATURATION) if opts.saturate else levels
    on_gpu = opts.device != "cpu"
    results: dict[str, Any] = {"variant": opts.variant, "gpu_count": opts.gpu_count, "workloads": {}}
    ray.init(num_cpus=opts.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        if opts.hops:
            results["bare_hops"] = measure_bare_hops()
        for workload in opts.workloads:
            app = f"bench-{workload}"
            try:
                args = workload_args(workload, opts.device, opts.backend, opts.fp16, opts.standin_size, overrides)
                started = time.perf_counter()
                serve.run(build_app(args), name=app, route_prefix=f"/{app}")
                startup_s = round(time.perf_counter() - started, 1)
                url = f"http://127.0.0.1:{port}/{app}/v1/infer"
                placed: dict[str, Any] = {}
                if on_gpu:
                    cards = replicas_by_card(app)
                    placed = {"replicas_by_card": cards,
                              "one_set_per_card": one_set_per_card(cards, gpu_deployments(args)) if cards else None}
                for image, body in bodies.items():
                    ingress = args["ingress"].get("deployment", {}).get("num_replicas", 1)
                    http = asyncio.run(measure_http(url, body, opts.requests, opts.time_limit, levels=levels,
                                                    sample_gpus=on_gpu, all_levels=opts.saturate, count_batches=True,
                                                    replicas=ingress, detectors_per_ingress=args["layout"] == "ingress"))
                    results["workloads"][key_of(workload, image)] = {"http": {**http, "startup_s": startup_s,
                                                                              **placed}}
            except Exception as exc:  # one broken workload must not cost the others' numbers
                import traceback

                traceback.print_exc()
                for image in bodies:
                    results.setdefault("failed", {})[key_of(workload, image)] = f"{type(exc).__name__}: {exc}"
            finally:
                if app in serve.status().applications:
                    serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


async def detector_counts(client: Any, infer_url: str, since: dict[str, Any] | None = None,
                          replicas: int = 1) -> dict[str, Any]:
    """What the detector did (GET /v1/pipeline): its engine batches and frames, and, for the torch MTCNN, the frames
    each cascade answered (fixed shapes, or data-following: a batch size whose graph is not captured yet, or failed
    to capture), the limits grown and the chunk sizes cut down; with `since`, the counts since then, and the mean
    batch. `replicas` (layout ingress, each replica holding its own detector): asked until that many replicas
    answered (`x-served-by`, HAProxy spreads the asks) and summed, so that a level's counts are every replica's,
    not whichever one answered (run 11's deltas went negative between two replicas)."""
    seen: dict[str, dict[str, Any]] = {}
    try:
        for _ in range(replicas * 8):
            answer = await client.get(infer_url.replace("/v1/infer", "/v1/pipeline"))
            seen[answer.headers.get("x-served-by", "one")] = answer.json()["detector"]
            if len(seen) >= replicas:
                break
    except Exception as exc:  # noqa: BLE001 - a count that cannot be read must not cost the level's figures
        return {"error": f"{type(exc).__name__}: {exc}"}
    counts: dict[str, Any] = dict.fromkeys(("batches", "frames", "frames_fixed_shapes", "frames_data_following"), 0)
    extra: dict[str, Any] = {}
    for detector in seen.values():
        cascade, batches = detector.get("cascade") or {}, detector.get("batches") or {}
        counts["batches"] += batches.get("count", 0)
        counts["frames"] += batches.get("frames", 0)
        counts["frames_fixed_shapes"] += cascade.get("frames_fixed_shapes", 0)
        counts["frames_data_following"] += cascade.get("frames_data_following", 0)
        for key in ("grown_limits", "largest_chunks"):  # the replicas' own, one after another
            extra.setdefault(key, {}).update(cascade.get(key) or {})
    counts["replicas"] = sorted(seen)
    if since is None or "error" in since:
        return counts
    delta: dict[str, Any] = {k: v - since.get(k, 0) for k, v in counts.items() if k != "replicas"}
    delta["mean_batch"] = round(delta["frames"] / delta["batches"], 2) if delta["batches"] else None
    if counts["replicas"] != since.get("replicas"):  # not the same replicas both times: deltas are not the level's
        delta["replicas_differ"] = True
    delta["replicas"] = len(seen)
    delta.update({key: value for key, value in extra.items() if value})
    return delta


def gpu_deployments(args: dict[str, Any]) -> list[str]:
    """The deployments of a workload's layout that hold models, so a CUDA context each on a GPU."""
    layout = args.get("layout", "separate")
    if layout == "ingress":
        return ["ingress"]
    if layout == "colocated":
        return ["detector", "classifiers"]
    return ["detector", *(c["name"] for c in args["classifiers"])]


def variant_key(name: str, gpu_count: int) -> str:
    """The report's name for a variant run on `gpu_count` cards: `separate+haproxy`, `separate+haproxy@2gpu`."""
    return name if gpu_count == 1 else f"{name}@{gpu_count}gpu"


def several_gpus(variants: dict[str, Any]) -> list[dict[str, Any]]:
    """Each variant run on N cards against the same variant on one (issue 19's targets): c16 and c32 throughput
    ratios, the c1 latency ratio, each card's mean utilisation at c16, and whether each card held one set."""
    rows = []
    for key, many in variants.items():
        one = variants.get(key.split("@")[0]) if "@" in key else None
        if one is None:
            continue

        def ratio(level: str, field: str) -> float | None:
            a, b = many.get(level, {}).get(field), one.get(level, {}).get(field)
            return round(a / b, 3) if a and b else None

        rows.append({
            "variant": key,
            "c16_rps_ratio": ratio("c16_parallel", "rps"),
            "c32_rps_ratio": ratio("c32_parallel", "rps"),
            "c1_p50_ratio": ratio("c1_parallel", "p50_ms"),
            "c16_gpu_mean_pct": {card: u["mean_pct"] for card, u in
                                 many.get("c16_parallel", {}).get("gpu_utilisation", {}).items()},
            "one_set_per_card": many.get("one_set_per_card"),
            "replicas_by_card": many.get("replicas_by_card"),
        })
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The report.


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
            info["gpus"] = torch.cuda.device_count()
    return info


def ratios(ip: dict[str, Any] | None, anchor: dict[str, Any] | None, http: dict[str, Any],
           hops: dict[str, float] | None) -> dict[str, float]:
    """The benchmark issue's targets, each as one number (see docs/benchmarks.md)."""
    r: dict[str, float] = {}
    if not ip or "c1_parallel" not in http:
        return r
    par = http["c1_parallel"]["p50_ms"]
    stages = ip["stage_p50_ms"]
    classifiers = [v for k, v in stages.items() if k not in ("decode", "detector")]
    ideal = stages["decode"] + stages["detector"] + max(classifiers, default=0.0)
    r["c1_parallel_over_ideal"] = round(par / ideal, 3)
    r["c1_parallel_over_inprocess_sequential"] = round(par / ip["sequential_p50_ms"], 3)
    if hops:
        r["c1_parallel_minus_ideal_in_bare_hops"] = round((par - ideal) / hops["bare_hop_p50_ms"], 2)
    if anchor and "c1_sequential" in anchor:
        r["c1_parallel_over_anchor"] = round(par / anchor["c1_sequential"]["p50_ms"], 3)
    if "c1_sequential" in http:
        seq = http["c1_sequential"]["p50_ms"]
        theory = (stages["detector"] + sum(classifiers)) / (stages["detector"] + max(classifiers, default=0.0))
        r["seq_over_par_achieved_vs_theoretical"] = round((seq / par) / theory, 3)
    b = http.get("breakdown_p50_ms", {})
    if hops and b:
        if "detector.transport_ms" in b:
            r["detector_hop_over_bare_hop"] = round(b["detector.transport_ms"] / hops["bare_hop_p50_ms"], 2)
        computes = [v for k, v in b.items() if k.startswith("classifiers.") and k.endswith(".compute_ms")]
        if computes and "classify_ms" in b:
            fanout_overhead = b["classify_ms"] - max(computes)
            r["fanout_overhead_over_bare_fanout_x3"] = round(fanout_overhead / hops["bare_fanout_x3_p50_ms"], 2)
    compute_ms = stages["detector"] + sum(classifiers)
    r["framework_cpu_ms_per_request"] = round(http["c1_parallel"]["server_cpu_ms_per_request"] - compute_ms, 1)
    if "c16_parallel" in http:
        slowest = min(ip["batched_throughput_rps"].values())
        r["c16_throughput_over_slowest_stage"] = round(http["c16_parallel"]["rps"] / slowest, 3)
    r["worst_p95_over_p50"] = round(max(s["p95_ms"] / s["p50_ms"] for k, s in http.items() if k.startswith("c")), 2)
    r["c16_errors"] = http.get("c16_parallel", {}).get("errors", "")
    return r


def _http_rows(label: str, table: dict[str, Any]) -> list[str]:
    rows = []
    for key, s in table.items():
        if not key.startswith("c"):
            continue
        c, mode = key.split("_", 1)
        busy = "/".join(str(u.get("mean_pct")) for u in s.get("gpu_utilisation", {}).values()) or "-"
        rows.append(f"| {label} | {mode} | {c[1:]} | {s['p50_ms']} | {s['p95_ms']} | {s['rps']} | "
                    f"{s['server_cpu_ms_per_request']} | {busy} | {s['errors']} |")
    return rows


HOST_CPU_TARGET_MS = {1: 3.0, 8: 6.0}  # issue 24: host CPU per served image at saturation, by faces in the image


def _against_ceiling(workload: dict[str, Any], ceiling: dict[str, Any] | None) -> list[str]:
    """Each variant's best saturated throughput against the GPU-bound ceiling of the same run (bench/ceiling.py),
    and the host CPU per served image at that level against issue 24's targets."""
    if not ceiling or not ceiling.get("ceiling_images_per_s"):
        return []
    limit = ceiling["ceiling_images_per_s"]
    target = HOST_CPU_TARGET_MS.get(round(ceiling["objects_per_image"]))
    lines = ["", f"Against the GPU-bound ceiling of this run ({limit} images/s: kernel time per image "
             f"{ceiling['kernel_ms_per_image']} ms, the {ceiling.get('cascade', 'fixed_shapes')} cascade, batches "
             "of the ceiling's size, one process; target >= 0.9x; host "
             f"CPU per served image at that level, target <= {target} ms):", "",
             "| variant | best level | req/s | / ceiling | server CPU ms/req |", "|---|---|---|---|---|"]
    for variant, http in workload.get("variants", {}).items():
        levels = [(k, v) for k, v in http.items() if k.startswith("c") and k.endswith("_parallel")
                  and isinstance(v, dict) and v.get("rps")]
        if not levels:
            continue
        level, best = max(levels, key=lambda kv: kv[1]["rps"])
        lines.append(f"| {variant} | {level} | {best['rps']} | {round(best['rps'] / limit, 3)} | "
                     f"{best.get('server_cpu_ms_per_request', '')} |")
    return lines


# the torch MTCNN's two cascades, by bench.ceiling's --fixed-shapes: the card's ceiling is whichever needs fewer
# kernels for an image (run 13, H100: the fixed shapes 1.07 / 5.49 ms an image, the data-following 0.71 / 2.87)
CASCADES = {"fixed_shapes": "true", "data_following": "false"}


def fastest_ceiling(ceilings: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """Per image, the ceiling of the cascade with the higher images/s (marked with its `cascade`)."""
    images: dict[str, dict[str, Any]] = {}
    for cascade, ceiling in ceilings.items():
        for image, row in ((ceiling or {}).get("images") or {}).items():
            best = images.get(image)
            if best is None or (row.get("ceiling_images_per_s") or 0) > (best.get("ceiling_images_per_s") or 0):
                images[image] = {**row, "cascade": cascade}
    return {"images": images} if images else None


def measure_ceiling(opts: argparse.Namespace, batch: int, extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """bench/ceiling.py in a process of its own, on this run's device (the face workload's GPU-resident path);
    `extra`: more of its arguments (bench/streams.py gives its clips)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ceiling.json"
        cmd = [sys.executable, "-m", "bench.ceiling", "--device", "cuda" if opts.device != "cpu" else "cpu",
               "--batch", str(batch), "--repeats", "10", "--out", str(out), *(["--fp16"] if opts.fp16 else []), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write("the ceiling failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
            return None
        return json.loads(out.read_text())


def report(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"Machine: {env['cpu_model']}, {env['cpus']} cores" + (f", {env['gpu']}" if "gpu" in env else ""),
             f"Versions: Python {env['python']}, Ray {env['ray']}, ONNX Runtime {env['onnxruntime']}"
             + (f", torch {env['torch']}" if "torch" in env else ""),
             f"Command: `{env['command']}` ({env['date']})", ""]
    hops = result.get("bare_hops")
    if hops:
        lines += [f"Bare Serve hop on this machine: {hops['bare_hop_p50_ms']} ms; three in parallel "
                  f"{hops['bare_fanout_x3_p50_ms']} ms; overhead of a hop to a callee that takes 50 ms "
                  f"{hops.get('bare_hop_to_a_50ms_callee_overhead_p50_ms', 'n/a')} ms (p50)", ""]
    for name, w in result["workloads"].items():
        ip, anchor = w.get("inprocess"), w.get("anchor")
        lines.append(f"### {name}")
        if ip:
            stages = ", ".join(f"{k} {ms}" for k, ms in ip["stage_p50_ms"].items())
            classifiers = [v for k, v in ip["stage_p50_ms"].items() if k not in ("decode", "detector")]
            together = ip.get("classifiers_together_p50_ms")
            lines.append(f"In process p50 ms: {stages}; sequential (decode + t_det + sum t_i) {ip['sequential_p50_ms']}, "
                         f"ideal parallel (decode + t_det + max t_i) {ip['ideal_parallel_p50_ms']}; classifiers launched "
                         f"together {together} (slowest alone {max(classifiers, default=0)}, "
                         f"{round(together / max(classifiers), 2) if together and classifiers else ''}x); batched "
                         f"throughput (req/s): " + ", ".join(f"{k} {v}" for k, v in ip["batched_throughput_rps"].items())
                         + f"; start-up {ip.get('startup_s')} s")
        lines += ["", "| server | mode | concurrency | p50 ms | p95 ms | req/s | server CPU ms/req | GPU busy % | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        if anchor:
            lines += _http_rows("anchor: FastAPI, one process", anchor)
        for variant, http in w.get("variants", {}).items():
            lines += _http_rows(variant, http)
        breakdowns = {v: h["breakdown_p50_ms"] for v, h in w.get("variants", {}).items() if "breakdown_p50_ms" in h}
        if breakdowns:
            keys = list(dict.fromkeys(k for b in breakdowns.values() for k in b))
            lines += ["", "Where the time goes, c1 parallel, p50 of each span (ms; `?trace=true`):", "",
                      "| span | " + " | ".join(breakdowns) + " |", "|---|" + "---|" * len(breakdowns)]
            for k in keys:
                lines.append(f"| {k} | " + " | ".join(str(b.get(k, "")) for b in breakdowns.values()) + " |")
        lines += ["", "Ratios (targets: c1_parallel_over_ideal <= 1.15; on GPU c1_parallel_over_inprocess_sequential "
                  "and _over_anchor < 1; hops <= 1.5; framework CPU <= 20 ms; c16 >= 0.9; p95/p50 <= 3):", "",
                  "| variant | " + " | ".join(RATIO_KEYS) + " |", "|---|" + "---|" * len(RATIO_KEYS)]
        for variant, http in w.get("variants", {}).items():
            r = ratios(ip, anchor, http, hops)
            lines.append(f"| {variant} | " + " | ".join(str(r.get(k, "")) for k in RATIO_KEYS) + " |")
        tails = [(v, level, t) for v, http in w.get("variants", {}).items() for level, t in http.get("tails", {}).items()]
        if tails:
            lines += ["", f"The slowest {SLOWEST_SHARE:.0%} of each c4 and c16 run (`?trace=true`): client ms against the "
                      "run's median, and the spans that grew most over their medians (ms):", "",
                      "| variant | level | client ms (median) | grew most |", "|---|---|---|---|"]
            for variant, level, t in tails:
                for row in t.get("slowest", []):
                    grew = ", ".join(f"{k} +{v}" for k, v in row["grew_ms"].items())
                    lines.append(f"| {variant} | {level} | {row['client_ms']} ({row['median_client_ms']}) | {grew} |")
        lines += _against_ceiling(w, (result.get("ceiling") or {}).get("images", {}).get(name))
        spread = several_gpus(w.get("variants", {}))
        if spread:
            lines += ["", "Several GPUs against one (targets: c16 and c32 throughput >= 1.8x, c1 p50 <= 1.1x, each card "
                      ">= 60 % busy at c16):", "",
                      "| variant | c16 req/s ratio | c32 req/s ratio | c1 p50 ratio | c16 busy % per card | one set per card | replicas by card |",
                      "|---|---|---|---|---|---|---|"]
            for row in spread:
                lines.append(f"| {row['variant']} | {row['c16_rps_ratio']} | {row['c32_rps_ratio']} | {row['c1_p50_ratio']} "
                             f"| {row['c16_gpu_mean_pct']} | {row['one_set_per_card']} | {row['replicas_by_card']} |")
        for variant, error in w.get("failed", {}).items():
            lines.append(f"\n{variant}: FAILED: {error}")
        lines.append("")
    return "\n".join(lines)


RATIO_KEYS = ["c1_parallel_over_ideal", "c1_parallel_over_inprocess_sequential", "c1_parallel_over_anchor",
              "c1_parallel_minus_ideal_in_bare_hops", "seq_over_par_achieved_vs_theoretical",
              "detector_hop_over_bare_hop", "fanout_overhead_over_bare_fanout_x3", "framework_cpu_ms_per_request",
              "c16_throughput_over_slowest_stage", "worst_p95_over_p50", "c16_errors"]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --backend and --fp16, as every benchmark that starts the service takes them."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--fp16", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["face", "standin"], choices=["face", "standin"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES),
                        help="one: the one-face portrait; many: eight faces in one photo (workload <name>-many)")
    add_engine_arguments(parser)
    parser.add_argument("--standin-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=40, help="per measurement at concurrency 1 (x2 above)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per measurement, at most")
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs for Ray (default: the machine's)")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1],
                        help="run each variant on this many cards (every deployment's replicas times N, one set of "
                        "models per card), e.g. `--gpus 1 2` for one and two side by side")
    parser.add_argument("--saturate", action="store_true",
                        help="also c64 and c128, and the GPU's busy fraction at every level (issue 24)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also the GPU-bound ceiling (bench/ceiling.py) of the face workload, and each variant's "
                        "best throughput against it")
    parser.add_argument("--ceiling-batch", type=int, default=16, help="the ceiling's batch of images")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--tag", default="", help="suffix for the JSON file name")
    parser.add_argument("--no-anchor", dest="anchor", action="store_false", help="skip the FastAPI anchor")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # inner mode: run one variant, print JSON
    parser.add_argument("--hops", action="store_true", help=argparse.SUPPRESS)  # inner: also the bare hop
    parser.add_argument("--gpu-count", type=int, default=1, help=argparse.SUPPRESS)  # inner: this run's cards
    opts = parser.parse_args(argv)
    opts.ray_cpus = opts.ray_cpus or os.cpu_count()
    bodies = {name: body for name, body in images().items() if name in opts.images}

    if opts.variant:
        print("RESULT " + json.dumps(run_variant(opts, bodies)), flush=True)
        return 0

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{opts.device}{('-' + opts.tag) if opts.tag else ''}.json"
    keys = [key_of(w, i) for w in opts.workloads for i in bodies]
    result: dict[str, Any] = {"environment": environment(opts), "workloads": {k: {} for k in keys}}
    for workload in opts.workloads:
        print(f"in process and anchor: {workload} ...", file=sys.stderr, flush=True)
        for image, measured in measure_inprocess(opts, workload, bodies).items():
            result["workloads"][key_of(workload, image)]["inprocess"] = measured
        if opts.anchor:
            for image, measured in measure_anchor(opts, workload, bodies).items():
                result["workloads"][key_of(workload, image)]["anchor"] = measured
    if opts.ceiling and "face" in opts.workloads:
        print("the GPU-bound ceiling ...", file=sys.stderr, flush=True)
        result["ceilings"] = {name: measure_ceiling(opts, opts.ceiling_batch, ("--fixed-shapes", flag))
                              for name, flag in CASCADES.items()}
        result["ceiling"] = fastest_ceiling(result["ceilings"])
    inner = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs = [(name, count) for name in opts.variants for count in opts.gpus]
    for i, (name, count) in enumerate(runs):
        key = variant_key(name, count)
        cmd = [sys.executable, "-m", "bench.run", "--variant", name, "--gpu-count", str(count), *inner,
               *(["--hops"] if i == 0 else [])]
        env = {**os.environ, **VARIANTS[name][0]}
        if opts.device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(count)  # Ray hands out only these cards
        print(f"running variant {key} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(f"variant {key} failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
            continue
        variant = json.loads(line[len("RESULT "):])
        if "bare_hops" in variant:
            result["bare_hops"] = variant["bare_hops"]
        for workload, w in variant["workloads"].items():
            result["workloads"][workload].setdefault("variants", {})[key] = w["http"]
        for workload, error in variant.get("failed", {}).items():
            result["workloads"][workload].setdefault("failed", {})[key] = error
        path.write_text(json.dumps(result, indent=2))  # after each variant: a run cut short keeps what it measured
    path.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\n(JSON: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
