"""The engines alone, in one process, on the GPU: eager onnx2torch against CUDA-graph replay, three classifiers
launched together, the numpy MTCNN against the GPU-resident one, torch.compile as the alternative, start-up
times, and the emotion classifier's tails under contention with the old and the new ONNX conversion.

    python -m bench.engines_gpu [--crops 8] [--seconds 4] [--out bench/out/gpu]   (on the GPU machine)

Every figure is a p50 over repeated calls, synchronised (results on the host), crops already cut: what an
engine costs its caller. Prints a markdown summary; JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCALE = {"iters": 1.0}  # --iters-scale: fewer repeats for a dry run on a CPU


def p50(fn: Callable[[], object], iters: int = 100, warmup: int = 10) -> float:
    iters, warmup = max(3, int(iters * SCALE["iters"])), max(1, int(warmup * SCALE["iters"]))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def classifiers(workload: str, device: str, cuda_graphs: bool) -> tuple[dict[str, Any], float]:
    """The workload's classifier models as the service builds them (bench.run's configs), and the seconds
    their build took (conversion, plus capture with graphs)."""
    from bench.run import workload_args
    from deployments.models import build_classifier
    from serve_app.config import PipelineConfig

    args = workload_args(workload, device, "torch", True, 224)
    for c in args["classifiers"]:
        c["engine"]["cuda_graphs"] = cuda_graphs
    config = PipelineConfig.model_validate(args)
    start = time.perf_counter()
    models = {c.name: (build_classifier(c, device), c) for c in config.classifiers}
    return models, time.perf_counter() - start


def fan_out(workload: str, device: str, crops_n: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for label, graphs in (("eager", False), ("graphs", True)):
        models, startup = classifiers(workload, device, graphs)
        crops = {n: rng.integers(0, 256, (crops_n, c.input.height, c.input.width, 3), dtype=np.uint8)
                 for n, (_, c) in models.items()}
        alone = {n: p50(lambda n=n: m.predict(crops[n])) for n, (m, _) in models.items()}

        def in_turn() -> None:
            for n, (m, _) in models.items():
                m.predict(crops[n])

        def together() -> None:
            pending = [m.launch(crops[n]) for n, (m, _) in models.items()]
            for run in pending:
                run.wait()

        pool = ThreadPoolExecutor(len(models))

        def threads() -> None:
            list(pool.map(lambda item: item[1][0].predict(crops[item[0]]), models.items()))

        out[label] = {
            "startup_s": round(startup, 2),
            "alone_ms": alone,
            "in_turn_ms": p50(in_turn),
            "together_ms": p50(together),
            "threads_ms": p50(threads),
        }
        pool.shutdown()
        out[label]["together_over_slowest"] = round(out[label]["together_ms"] / max(alone.values()), 2)
        out[label]["threads_over_slowest"] = round(out[label]["threads_ms"] / max(alone.values()), 2)
    out["compile"] = torch_compile(workload, device, crops_n)
    return out


def torch_compile(workload: str, device: str, crops_n: int) -> dict[str, Any]:
    """The alternative to hand-made graphs: torch.compile(mode="reduce-overhead") of the slowest classifier's
    module (it captures CUDA graphs itself), its compile time and p50 against our replay of the same model."""
    import torch

    if device != "cuda":
        return {"skipped": "CUDA only"}
    models, _ = classifiers(workload, device, True)
    name, (model, config) = max(models.items(), key=lambda kv: kv[1][0].engine.inputs[0].shape[-1] or 0)
    engine = model.engine
    x = torch.randint(0, 256, (crops_n, config.input.height, config.input.width, 3), dtype=torch.uint8, device="cuda")
    try:
        start = time.perf_counter()
        compiled = torch.compile(engine._module, mode="reduce-overhead")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for _ in range(3):
                compiled(engine._transform(x))
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start

            def run() -> None:
                compiled(engine._transform(x)).float().cpu()

            ms = p50(run)
    except Exception as exc:  # inductor needs a C compiler and triton; say what stopped it
        return {"model": name, "failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    crops = x.cpu().numpy()
    return {"model": name, "compile_s": round(compile_s, 1), "compiled_ms": ms,
            "replay_ms": p50(lambda: model.predict(crops))}


def detectors(device: str) -> dict[str, Any]:
    """The astronaut photo and the eight-face photo through: the numpy cascade over eager torch nets (the
    service before this work), the numpy cascade over replayed nets, and the GPU-resident cascade."""
    from engines import create_engine
    from engines.mtcnn import Mtcnn, MtcnnParams
    from engines.mtcnn_torch import TorchMtcnn
    from tests.images import ASTRONAUT, many_faces, read

    def nets(graphs: bool) -> list[Any]:
        return [create_engine("torch", ROOT / "models" / f"mtcnn_{n}.onnx", device, fp16=True, cuda_graphs=graphs)
                for n in ("pnet", "rnet", "onet")]

    photos = {"one": read(ASTRONAUT), "many": many_faces()}
    out: dict[str, Any] = {}
    for label, make in (("numpy+eager", lambda: Mtcnn(*nets(False), MtcnnParams(), pad_batches=True)),
                        ("numpy+graphs", lambda: Mtcnn(*nets(True), MtcnnParams(), pad_batches=True)),
                        ("gpu-resident", lambda: TorchMtcnn(*nets(True), MtcnnParams()))):
        start = time.perf_counter()
        detector = make()
        detector.warm_up()
        entry: dict[str, Any] = {"startup_s": round(time.perf_counter() - start, 2)}
        for photo, image in photos.items():
            faces = len(detector.detect(image))
            entry[f"{photo}_faces"] = faces
            entry[f"{photo}_detect_ms"] = p50(lambda: detector.detect(image), iters=60)
            for frames in (4, 8):
                batch = [image] * frames
                ms = p50(lambda: detector.detect_batch(batch), iters=15, warmup=3)
                entry[f"{photo}_batch{frames}_fps"] = round(frames / ms * 1e3, 1)
        out[label] = entry
    return out


def emotion_tails(device: str, seconds: float) -> dict[str, Any]:
    """Emotion under contention, as in a replica that holds every model (layout ingress): four threads in one
    process (the detector and the three face classifiers, eager), each calling its model in a loop for
    `seconds`; emotion's latencies with the ONNX conversion as it was (pads computed at run time: a
    device-to-host copy and sync for each of its ~20 pad operations) and as it is now (constants folded)."""
    from engines import create_engine
    from engines.mtcnn import Mtcnn
    from engines.onnx_to_torch import host_reads
    from tests.images import ASTRONAUT, read

    photo = read(ASTRONAUT)
    out: dict[str, Any] = {}
    for label in ("runtime pads (before)", "folded (now)"):
        engines = {n: create_engine("torch", ROOT / "models" / f"{n}.onnx", device, fp16=True, cuda_graphs=False)
                   for n in ("age", "gender", "emotion")}
        if label.startswith("runtime"):
            engines["emotion"]._module = _old_conversion(ROOT / "models" / "emotion.onnx", device)
        reads = host_reads(engines["emotion"]._module)
        detector = Mtcnn(*[create_engine("torch", ROOT / "models" / f"mtcnn_{n}.onnx", device, fp16=True,
                                         cuda_graphs=False) for n in ("pnet", "rnet", "onet")])
        inputs = {"age": (8, 3, 64, 64), "gender": (8, 3, 32, 32), "emotion": (8, 1, 64, 64)}
        feeds = {n: {e.inputs[0].name: np.random.default_rng(1).normal(0, 1, inputs[n]).astype(np.float32)}
                 for n, e in engines.items()}
        for _ in range(3):  # warm in this thread, as a replica's constructor does
            detector.detect(photo)
            for n, e in engines.items():
                e.run(feeds[n])
        stop = time.perf_counter() + seconds
        latencies: dict[str, list[float]] = {n: [] for n in (*engines, "detector")}

        def loop(name: str, call: Callable[[], object]) -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                call()
                latencies[name].append((time.perf_counter() - start) * 1e3)

        threads = [threading.Thread(target=loop, args=(n, lambda n=n: engines[n].run(feeds[n]))) for n in engines]
        threads.append(threading.Thread(target=loop, args=("detector", lambda: detector.detect(photo))))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the first call of each thread (a new thread: a compute thread's first batch) apart from the rest
        out[label] = {"emotion_host_reads": reads, **{
            n: {"calls": len(v), "first_call_ms": round(v[0], 1), "p50_ms": round(float(np.percentile(v[1:], 50)), 2),
                "p99_ms": round(float(np.percentile(v[1:], 99)), 2), "max_ms": round(max(v[1:]), 1)}
            for n, v in latencies.items() if len(v) > 1}}
    return out


def _old_conversion(path: Path, device: str) -> Any:
    """emotion.onnx converted as the service did before this work: Constant nodes folded, nothing evaluated,
    onnx2torch's own Pad converters (runtime pads)."""
    import onnx
    from onnx import numpy_helper
    from onnx2torch import convert

    model = onnx.load(str(path))
    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            kept.append(node)
        else:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    from onnx import defs
    from onnx2torch.node_converters.pad import OnnxPadDynamic, _onnx_to_torch_mode
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    def dynamic(node: Any, _graph: Any) -> Any:
        return OperationConverterResult(torch_module=OnnxPadDynamic(mode=_onnx_to_torch_mode(node.attributes.get("mode", "constant"))),
                                        onnx_mapping=OnnxMapping(inputs=node.input_values, outputs=node.output_values))

    description = OperationDescription(defs.ONNX_DOMAIN, "Pad", 13)
    ours = _CONVERTER_REGISTRY[description]
    _CONVERTER_REGISTRY[description] = dynamic
    try:
        return convert(model).eval().to(device)
    finally:
        _CONVERTER_REGISTRY[description] = ours


def report(result: dict[str, Any]) -> str:
    lines = [f"Device: {result['device_name']}; torch {result['torch']}; {result['crops']} crops per classifier", ""]
    for workload, w in result.get("fan_out", {}).items():
        lines += [f"### {workload} classifiers", "", "| | start-up s | alone ms | in turn | together (/ slowest) | "
                  "3 threads (/ slowest) |", "|---|---|---|---|---|---|"]
        for label in ("eager", "graphs"):
            r = w[label]
            lines.append(f"| {label} | {r['startup_s']} | {r['alone_ms']} | {r['in_turn_ms']} | {r['together_ms']} "
                         f"({r['together_over_slowest']}) | {r['threads_ms']} ({r['threads_over_slowest']}) |")
        lines += ["", f"torch.compile(mode='reduce-overhead'): {w['compile']}", ""]
    lines += ["### MTCNN", "", "| cascade | start-up s | one face: detect ms | batch 4 / 8 fps | eight faces: detect ms "
              "| batch 4 / 8 fps | faces found |", "|---|---|---|---|---|---|---|"]
    for label, r in result.get("detectors", {}).items():
        lines.append(f"| {label} | {r['startup_s']} | {r['one_detect_ms']} | {r['one_batch4_fps']} / {r['one_batch8_fps']} "
                     f"| {r['many_detect_ms']} | {r['many_batch4_fps']} / {r['many_batch8_fps']} | "
                     f"{r['one_faces']}, {r['many_faces']} |")
    lines += ["", "### Under contention (4 threads, eager, warmed in the main thread)", "", "| conversion | emotion host "
              "reads | model: first call in its thread; p50 / p99 / max of the rest (ms) |", "|---|---|---|"]
    for label, r in result.get("emotion_tails", {}).items():
        stats = "; ".join(f"{n} {v['first_call_ms']}; {v['p50_ms']} / {v['p99_ms']} / {v['max_ms']}"
                          for n, v in r.items() if isinstance(v, dict))
        lines.append(f"| {label} | {', '.join(r['emotion_host_reads']) or 'none'} | {stats} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each contention run")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "engines_gpu"))
    parser.add_argument("--parts", nargs="+", default=["fan_out", "detectors", "emotion_tails"])
    parser.add_argument("--workloads", nargs="+", default=["face", "standin"], choices=["face", "standin"])
    parser.add_argument("--iters-scale", type=float, default=1.0, help="repeats x this (a CPU dry run: 0.1)")
    opts = parser.parse_args(argv)
    SCALE["iters"] = opts.iters_scale
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from engines import create_engine

    create_engine("torch", ROOT / "models" / "gender.onnx", device)  # imports and CUDA set-up: not any start-up's
    result: dict[str, Any] = {"device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
                              "torch": torch.__version__, "crops": opts.crops,
                              "command": "python -m bench.engines_gpu " + " ".join(argv or sys.argv[1:])}
    if "fan_out" in opts.parts:
        result["fan_out"] = {w: fan_out(w, device, opts.crops) for w in opts.workloads}
    if "detectors" in opts.parts:
        result["detectors"] = detectors(device)
    if "emotion_tails" in opts.parts:
        result["emotion_tails"] = emotion_tails(device, opts.seconds)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines-gpu.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
