"""TensorRT backend (production, GPU): a serialized engine run through the TensorRT 10 tensor-name API.

Install with `pip install .[tensorrt]` on a machine with CUDA (pycuda builds from source against
the CUDA toolkit). Page-locked host buffers and device buffers are allocated once, for the
largest shapes the engine's optimization profile accepts, and reused; each engine has its own
CUDA stream. A batch larger than the profile's maximum is split into profile-sized runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, EngineError, TensorSpec
from engines.tensorrt_plan import BindingPlan

logger = logging.getLogger(__name__)


def _import_tensorrt() -> tuple[Any, Any]:
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(
            f"the tensorrt backend needs the 'tensorrt' and 'pycuda' packages ({exc.name} is missing): "
            "pip install '.[tensorrt]' on a machine with a CUDA toolkit, or use backend onnxruntime/torch"
        ) from exc
    return trt, cuda


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda", device_index: int = 0) -> None:
        if device == "cpu":
            raise EngineError("the tensorrt backend runs on CUDA only; use backend onnxruntime for CPU")
        trt, cuda = _import_tensorrt()
        cuda.init()
        if cuda.Device.count() == 0:
            raise EngineError("the tensorrt backend needs a CUDA GPU, and none is visible")
        self._cuda = cuda
        self._context_handle = cuda.Device(device_index).retain_primary_context()
        self._context_handle.push()
        try:
            self._trt_logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(self._trt_logger)
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if engine is None:
                raise EngineError(
                    f"cannot deserialize TensorRT engine {Path(path).name} (built by another TensorRT version or GPU?)"
                )
            self._engine = engine
            self._context = engine.create_execution_context()
            self.plan = BindingPlan.from_engine(engine)
            self._inputs = [TensorSpec(b.name, b.shape, b.dtype) for b in self.plan.inputs]
            self._outputs = [TensorSpec(b.name, b.shape, b.dtype) for b in self.plan.outputs]
            self._stream = cuda.Stream()
            self._host: dict[str, np.ndarray] = {}
            self._device: dict[str, Any] = {}
            for name, nbytes in self.plan.buffer_nbytes().items():
                binding = next(b for b in (*self.plan.inputs, *self.plan.outputs) if b.name == name)
                count = nbytes // binding.dtype.itemsize
                self._host[name] = cuda.pagelocked_empty(count, binding.dtype)
                self._device[name] = cuda.mem_alloc(max(nbytes, 1))
        finally:
            self._context_handle.pop()
        self.device = "cuda"
        logger.info("loaded TensorRT engine %s (max batch %s)", Path(path).name, self.plan.max_batch)

    def check_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        binding = next((b for b in self.plan.inputs if b.name == name), None)
        if binding is None:
            raise EngineError(f"engine has no input named {name!r}")
        # a probe with batch 1 must fit the profile's per-sample shape
        binding.check(shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.plan.check_feeds(feeds)
        parts = [self._run_once({k: v[s] for k, v in feeds.items()}) for s in self.plan.batch_slices(batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _run_once(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        self._context_handle.push()
        try:
            for binding in self.plan.inputs:
                array = np.ascontiguousarray(feeds[binding.name], dtype=binding.dtype)
                if not self._context.set_input_shape(binding.name, array.shape):
                    raise EngineError(f"TensorRT refused shape {list(array.shape)} for input {binding.name!r}")
                host = self._host[binding.name][: array.size]
                host[:] = array.ravel()
                cuda.memcpy_htod_async(self._device[binding.name], host, self._stream)
            for name, buffer in self._device.items():
                self._context.set_tensor_address(name, int(buffer))
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineError("TensorRT execute_async_v3 failed")
            results = {}
            for binding in self.plan.outputs:
                shape = tuple(self._context.get_tensor_shape(binding.name))
                host = self._host[binding.name][: int(np.prod(shape))]
                cuda.memcpy_dtoh_async(host, self._device[binding.name], self._stream)
                results[binding.name] = (host, shape)
            self._stream.synchronize()
        finally:
            self._context_handle.pop()
        return {name: host.reshape(shape).copy() for name, (host, shape) in results.items()}
