"""Create an engine from a backend name: the one place that knows every backend."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine, EngineError

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def create_engine(
    backend: str,
    path: Path,
    device: str = "auto",
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    fp16: bool = False,
    cuda_graphs: bool | str = "auto",
    cuda_sync: str = "block",
) -> Engine:
    """Load `path` with `backend` on `device` ("auto", "cpu" or "cuda").

    onnxruntime and torch take ONNX files; tensorrt takes a serialized engine (see
    `python -m engines.tensorrt_build`). Threads apply to onnxruntime (intra and inter op) and to torch
    on CPU (intra op); fp16 and cuda_graphs ("auto", True, False) to torch (TensorRT precision is chosen when
    the engine is built); cuda_sync to torch and tensorrt on CUDA (engines/cuda_sync.py).
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if not Path(path).is_file():
        raise EngineError(f"model file not found: {path}")
    if backend == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device, intra_op_threads, inter_op_threads)
    if backend == "torch":
        from engines.torch_engine import TorchEngine

        return TorchEngine(path, device, fp16, intra_op_threads, cuda_graphs, cuda_sync)
    from engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(path, device, cuda_sync=cuda_sync)
