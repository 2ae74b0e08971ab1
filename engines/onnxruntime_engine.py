"""ONNX Runtime backend: CPU anywhere, CUDA where onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, EngineError, TensorSpec

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        path: Path,
        device: str = "auto",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        if device not in ("auto", "cpu", "cuda"):
            raise EngineError(f"unknown device {device!r}; use auto, cpu or cuda")
        has_cuda = cuda_provider_available()
        if device == "cuda" and not has_cuda:
            raise EngineError(
                f"device 'cuda' asked for {Path(path).name}, but this onnxruntime has no "
                "CUDAExecutionProvider (install onnxruntime-gpu, or use device: auto/cpu)"
            )
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and has_cuda:
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load ONNX model {Path(path).name}: {exc}") from exc
        active = self._session.get_providers()
        self.device = "cuda" if active and active[0] == "CUDAExecutionProvider" else "cpu"
        self._inputs = [self._spec(t) for t in self._session.get_inputs()]
        self._outputs = [self._spec(t) for t in self._session.get_outputs()]
        self._output_names = [t.name for t in self._outputs]
        logger.info("loaded %s on %s (%s)", Path(path).name, self.device, active)

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:  # onnxruntime.NodeArg
        if arg.type not in _ORT_TYPES:
            raise EngineError(f"tensor {arg.name!r} has unsupported type {arg.type}")
        return TensorSpec(arg.name, tuple(arg.shape), _ORT_TYPES[arg.type])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError("the engine is closed")
        values = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees its arenas and threads with it)."""
        self._session = None
