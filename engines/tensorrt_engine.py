"""TensorRT backend (production, GPU): a serialized engine run through the TensorRT 10 tensor-name API.

Install with `pip install .[tensorrt]` on a machine with CUDA (pycuda builds from source against
the CUDA toolkit). Page-locked host buffers and device buffers are allocated once, for the
largest shapes the engine's optimization profile accepts (outputs at the shapes the execution
context reports for those inputs), bound once, and reused; each engine has its own CUDA stream.
A batch larger than the profile's maximum is split into profile-sized runs; before every run the
output shapes the context reports are checked against their buffers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, EngineError, TensorSpec
from engines.tensorrt_plan import BindingPlan

logger = logging.getLogger(__name__)


def _import_tensorrt() -> tuple[Any, Any]:
    """Import TensorRT and pycuda. Only their absence becomes the install hint: a broken install (a
    missing shared library, a version clash) raises as itself."""
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name not in ("tensorrt", "pycuda", "pycuda.driver"):
            raise
        raise EngineError(
            f"the tensorrt backend needs the 'tensorrt' and 'pycuda' packages ({exc.name} is missing): "
            "pip install '.[tensorrt]' on a machine with a CUDA toolkit, or use backend onnxruntime/torch"
        ) from exc
    return trt, cuda


@functools.cache
def trt_logger(trt: Any) -> Any:
    """TensorRT's logger: one per process, shared by every runtime and builder (TensorRT warns otherwise)."""
    return trt.Logger(trt.Logger.WARNING)


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
        self._cuda_context = cuda.Device(device_index).retain_primary_context()
        self._cuda_context.push()
        try:
            runtime = trt.Runtime(trt_logger(trt))
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
            self._capacity = self.plan.buffer_nbytes(self._output_shapes_at(self.plan.max_shapes()))
            self._stream = cuda.Stream()
            self._host: dict[str, np.ndarray] = {}
            self._device: dict[str, Any] = {}
            for binding in (*self.plan.inputs, *self.plan.outputs):
                nbytes = self._capacity[binding.name]
                self._host[binding.name] = cuda.pagelocked_empty(nbytes // binding.dtype.itemsize, binding.dtype)
                self._device[binding.name] = cuda.mem_alloc(max(nbytes, 1))
                if not self._context.set_tensor_address(binding.name, int(self._device[binding.name])):
                    raise EngineError(f"TensorRT refused the address of tensor {binding.name!r}")
        except BaseException:
            self._cuda_context.pop()
            self._cuda_context.detach()
            raise
        self._cuda_context.pop()
        self.device = "cuda"
        self.max_batch = self.plan.max_batch
        logger.info("loaded TensorRT engine %s (batch %s..%s)", Path(path).name, self.plan.min_batch, self.plan.max_batch)

    def _output_shapes_at(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Set every input's shape on the context; the output shapes it then reports."""
        for name, shape in input_shapes.items():
            if not self._context.set_input_shape(name, shape):
                raise EngineError(f"TensorRT refused shape {list(shape)} for input {name!r}")
        return {b.name: tuple(int(d) for d in self._context.get_tensor_shape(b.name)) for b in self.plan.outputs}

    def check_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        binding = next((b for b in self.plan.inputs if b.name == name), None)
        if binding is None:
            raise EngineError(f"engine has no input named {name!r}")
        binding.check(shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.plan.check_feeds(feeds)  # every axis but the batch; each run's batch is checked below
        parts = [self._run_once({k: v[s] for k, v in feeds.items()}) for s in self.plan.batch_slices(batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _run_once(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        self._cuda_context.push()
        try:
            for binding in self.plan.inputs:
                binding.check(tuple(feeds[binding.name].shape))
            shapes = self._output_shapes_at({name: tuple(array.shape) for name, array in feeds.items()})
            for name, shape in shapes.items():  # before TensorRT writes them: never past the allocation
                binding = next(b for b in self.plan.outputs if b.name == name)
                nbytes = int(np.prod(shape)) * binding.dtype.itemsize
                if any(d < 0 for d in shape) or nbytes > self._capacity[name]:
                    raise EngineError(
                        f"output {name!r} would have shape {list(shape)}, which does not fit the "
                        f"{self._capacity[name]} bytes allocated for it at the profile maximum"
                    )
            for binding in self.plan.inputs:
                array = np.ascontiguousarray(feeds[binding.name], dtype=binding.dtype)
                host = self._host[binding.name][: array.size]
                host[:] = array.ravel()
                cuda.memcpy_htod_async(self._device[binding.name], host, self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineError("TensorRT execute_async_v3 failed")
            results = {}
            for name, shape in shapes.items():
                host = self._host[name][: int(np.prod(shape))]
                cuda.memcpy_dtoh_async(host, self._device[name], self._stream)
                results[name] = (host, shape)
            self._stream.synchronize()
        finally:
            self._cuda_context.pop()
        return {name: host.reshape(shape).copy() for name, (host, shape) in results.items()}

    def close(self) -> None:
        """Release, in order and inside the context they belong to, the execution context and the engine, the
        device and page-locked buffers and the stream; only then detach the retained primary context (TensorRT
        objects and buffers still alive after the detach would be freed against a context that is gone)."""
        if getattr(self, "_cuda_context", None) is None:
            return
        self._cuda_context.push()
        try:
            self._stream.synchronize()
            self._context = None  # the execution context first: it refers to the engine and the buffers
            self._engine = None
            for buffer in self._device.values():
                buffer.free()
            self._device.clear()
            self._host.clear()
            self._stream = None
        finally:
            self._cuda_context.pop()
            self._cuda_context.detach()
            self._cuda_context = None
