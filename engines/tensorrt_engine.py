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
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Completed, Engine, EngineError, Pending, PendingRun, RunTiming, TensorSpec
from engines.cuda_sync import set_sync
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

    def __init__(self, path: Path, device: str = "cuda", device_index: int = 0, cuda_sync: str = "block") -> None:
        if device == "cpu":
            raise EngineError("the tensorrt backend runs on CUDA only; use backend onnxruntime for CPU")
        trt, cuda = _import_tensorrt()
        cuda.init()
        if cuda.Device.count() == 0:
            raise EngineError("the tensorrt backend needs a CUDA GPU, and none is visible")
        self._cuda = cuda
        set_sync(cuda_sync, device_index)  # type: ignore[arg-type]
        self._cuda_context = cuda.Device(device_index).retain_primary_context()
        self._cuda_context.push()
        self._context: Any = None
        self._engine: Any = None
        self._device: dict[str, Any] = {}
        self._host: dict[str, np.ndarray] = {}
        self._stream: Any = None
        try:
            runtime = trt.Runtime(trt_logger(trt))
            self._engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if self._engine is None:
                raise EngineError(
                    f"cannot deserialize TensorRT engine {Path(path).name} (built by another TensorRT version or GPU?)"
                )
            self._context = self._engine.create_execution_context()
            self.plan = BindingPlan.from_engine(self._engine)
            self._inputs = [TensorSpec(b.name, b.shape, b.dtype) for b in self.plan.inputs]
            self._outputs = [TensorSpec(b.name, b.shape, b.dtype) for b in self.plan.outputs]
            self._capacity = self.plan.buffer_nbytes(self._output_shapes_at(self.plan.max_shapes()))
            self._stream = cuda.Stream()
            for binding in (*self.plan.inputs, *self.plan.outputs):
                nbytes = self._capacity[binding.name]
                self._host[binding.name] = cuda.pagelocked_empty(nbytes // binding.dtype.itemsize, binding.dtype)
                self._device[binding.name] = cuda.mem_alloc(max(nbytes, 1))
                if not self._context.set_tensor_address(binding.name, int(self._device[binding.name])):
                    raise EngineError(f"TensorRT refused the address of tensor {binding.name!r}")
        except BaseException:
            self._release()  # what was made in the context goes before the context
            self._cuda_context.pop()
            self._cuda_context.detach()
            self._cuda_context = None
            raise
        self._cuda_context.pop()
        self._in_flight: _TensorRTRun | None = None
        self._lock = threading.Lock()
        self.asynchronous = True
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
        return self.launch(feeds).wait()

    def launch(self, feeds: Mapping[str, np.ndarray]) -> PendingRun:
        """Enqueue the batch (copies in, `execute_async_v3`, copies out) and return; `wait` synchronises this
        engine's stream alone. A batch larger than the profile takes several runs, each waited for in turn."""
        if self._cuda_context is None:
            raise EngineError("the engine is closed")
        batch = self.plan.check_feeds(feeds)  # every axis but the batch; each run's batch is checked below
        slices = self.plan.batch_slices(batch)
        if len(slices) > 1:
            start = time.perf_counter()
            parts = [self._launch_once({k: v[s] for k, v in feeds.items()}).wait() for s in slices]
            outputs = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            return Completed(outputs, RunTiming(start, time.perf_counter()))
        return self._launch_once(feeds)

    def _launch_once(self, feeds: Mapping[str, np.ndarray]) -> _TensorRTRun:
        cuda = self._cuda
        with self._lock:
            if self._in_flight is not None:
                self._in_flight.wait()  # its page-locked buffers are about to be rewritten
            launched_at = time.perf_counter()
            self._cuda_context.push()
            try:
                shapes = self._enqueue(feeds)
                # BLOCKING_SYNC: the waiting thread sleeps until the GPU signals; without it cuEventSynchronize
                # busy-waits, a core held for as long as the run takes
                done = cuda.Event(cuda.event_flags.BLOCKING_SYNC | cuda.event_flags.DISABLE_TIMING)
                done.record(self._stream)
            finally:
                self._cuda_context.pop()
            run = _TensorRTRun(self, shapes, done, launched_at, time.perf_counter())
            self._in_flight = run
            return run

    def _finished(self, run: _TensorRTRun) -> None:
        if self._in_flight is run:
            self._in_flight = None

    def _enqueue(self, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """Queue one run on the stream (a current context is pushed by the caller); the output shapes."""
        cuda = self._cuda
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
        for name, shape in shapes.items():
            host = self._host[name][: int(np.prod(shape))]
            cuda.memcpy_dtoh_async(host, self._device[name], self._stream)
        return shapes

    def _read(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Copies of the outputs out of the page-locked buffers (after the run's event was reached)."""
        return {name: self._host[name][: int(np.prod(shape))].reshape(shape).copy() for name, shape in shapes.items()}

    def close(self) -> None:
        """Release, in order and inside the context they belong to, the execution context and the engine, the
        device and page-locked buffers and the stream; only then detach the retained primary context (TensorRT
        objects and buffers still alive after the detach would be freed against a context that is gone)."""
        if getattr(self, "_cuda_context", None) is None:
            return
        if self._in_flight is not None:
            self._in_flight.wait()
        self._cuda_context.push()
        try:
            self._release()
        finally:
            self._cuda_context.pop()
            self._cuda_context.detach()
            self._cuda_context = None

    def _release(self) -> None:
        """Inside the context: the stream's work finished, then the execution context (it refers to the engine and
        the buffers), the engine, the device and page-locked buffers, the stream."""
        if self._stream is not None:
            self._stream.synchronize()
        self._context = None
        self._engine = None
        for buffer in self._device.values():
            buffer.free()
        self._device.clear()
        self._host.clear()
        self._stream = None


class _TensorRTRun(Pending[dict[str, np.ndarray]]):
    """A run enqueued on the engine's stream: `wait` synchronises its event (in the engine's context, pushed on
    the waiting thread: CUDA's context stack is per thread) and copies the outputs out."""

    def __init__(self, engine: TensorRTEngine, shapes: dict[str, tuple[int, ...]], done: Any, launched_at: float,
                 enqueued_at: float) -> None:
        self._engine, self._shapes, self._done = engine, shapes, done
        self._launched_at, self._enqueued_at = launched_at, enqueued_at
        self._lock = threading.Lock()
        self._outputs: dict[str, np.ndarray] | None = None

    def done(self) -> bool:
        return self._outputs is not None

    def wait(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._outputs is None:
                engine = self._engine
                engine._cuda_context.push()
                try:
                    self._done.synchronize()  # pycuda releases the GIL while it waits
                finally:
                    engine._cuda_context.pop()
                self._outputs = engine._read(self._shapes)
                engine._finished(self)
            return self._outputs

    @property
    def timing(self) -> RunTiming | None:
        return RunTiming(self._launched_at, self._enqueued_at) if self._outputs is not None else None
