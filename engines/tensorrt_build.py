"""Build a serialized TensorRT engine from an ONNX file, the way `trtexec` would:

    python -m engines.tensorrt_build models/gender.onnx gender.engine --fp16 \\
        --min-batch 1 --opt-batch 8 --max-batch 32 --workspace-mib 1024

Engines are specific to the GPU model and TensorRT version that built them: build on the
serving machine (e.g. the RTX 3090), then point a deployment's `model` at the .engine file
with `engine.backend: tensorrt`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.tensorrt_plan import profile_for

logger = logging.getLogger(__name__)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    fp16: bool = False,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 32,
    workspace_mib: int = 1024,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Parse `onnx_path`, add one optimization profile for its dynamic inputs, serialize to `engine_path`.

    A dynamic batch axis spans `min_batch`..`max_batch`; a static-batch export (ultralytics' default
    [1, 3, 640, 640]) keeps its fixed batch, and `TensorRTEngine` runs larger batches one engine-batch
    at a time. `input_shapes` fixes inputs whose non-batch axes are dynamic (e.g. a YOLO's height and
    width), given as the full shape with -1 for the batch.
    """
    import tensorrt as trt

    from engines.tensorrt_engine import trt_logger

    builder = trt.Builder(trt_logger(trt))
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_batch = min(8, max_batch) if opt_batch is None else opt_batch  # trtexec-like: 8 unless max is less
    shapes = input_shapes or {}
    unknown = set(shapes) - {network.get_input(i).name for i in range(network.num_inputs)}
    if unknown:
        raise ValueError(f"--shape names inputs the model does not have: {sorted(unknown)}")
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        declared = tuple(int(d) for d in tensor.shape)
        if all(d >= 0 for d in declared):
            continue  # a static input needs no profile (as with trtexec)
        dynamic = True
        low, opt, high = profile_for(tuple(shapes.get(tensor.name, declared)), min_batch, opt_batch, max_batch)
        profile.set_shape(tensor.name, low, opt, high)
    if dynamic and config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT refused the optimization profile for {onnx_path}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    logger.info("wrote %s (%d bytes)", engine_path, engine_path.stat().st_size)
    return engine_path


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition(":")
    return name, tuple(int(d) for d in dims.split("x"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("engine", type=Path)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=None, help="default: 8, or --max-batch if smaller")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--workspace-mib", type=int, default=1024)
    parser.add_argument("--shape", type=_shape, action="append", default=[],
                        help="NAME:-1x3x640x640 for inputs with dynamic non-batch axes")
    args = parser.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":
            raise
        print("tensorrt is not installed: pip install '.[tensorrt]' on a machine with CUDA", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    build_engine(args.onnx, args.engine, args.fp16, args.min_batch, args.opt_batch, args.max_batch,
                 args.workspace_mib, dict(args.shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
