"""Create an engine from a backend name: the one place that knows every backend."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine, EngineError

BACKENDS = ("onnxruntime",)


def create_engine(
    backend: str,
    path: Path,
    device: str = "auto",
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
) -> Engine:
    if not Path(path).is_file():
        raise EngineError(f"model file not found: {path}")
    if backend == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device, intra_op_threads, inter_op_threads)
    raise EngineError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
