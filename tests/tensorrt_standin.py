"""A stand-in for `tensorrt` (10.x) and `pycuda.driver` that enforces their documented rules.

TensorRT cannot be installed on our machines, so `engines/tensorrt_engine.py` and
`engines/tensorrt_build.py` are tested against this. It is not a copy of what our code expects: each
rule below is one that TensorRT or pycuda documents, and a violation fails the way the real library
fails (a `False` return, `None`, or an exception) or, where the real library would silently corrupt
device memory, with `DeviceMemoryViolation`. The "engine" computes with onnxruntime on the ONNX file
it was "built" from, so outputs are real numbers and can be compared with the reference backend.

TensorRT 10 rules enforced (Python API docs: ICudaEngine, IExecutionContext, IBuilder,
IOptimizationProfile; developer guide, "Working with Dynamic Shapes"):
- one `Logger` per process is expected (TensorRT warns on more): instances are counted;
- `Runtime.deserialize_cuda_engine` returns None for bytes that are not an engine;
- `ICudaEngine.get_tensor_shape` has -1 for every dimension not fixed at build time, outputs included;
- `IExecutionContext.set_input_shape` returns False for a shape of the wrong rank, one that differs
  from a fixed dimension, or one outside the optimization profile (every axis, the batch included);
- `IExecutionContext.get_tensor_shape` keeps -1 in an input until `set_input_shape`, in an output until
  every input shape is set, and in a data-dependent output (NonZero, NonMaxSuppression, ...) always;
- `execute_async_v3` returns False unless every input shape and every I/O tensor address is set; it
  reads each input and writes each output at its bound address, at the shape the context reports;
- a build fails (`build_serialized_network` returns None) when a dynamic input has no profile shape,
  or a profile contradicts a fixed dimension, or min <= opt <= max does not hold.
- a build with a workspace pool (`set_memory_pool_limit`) smaller than the network needs fails;
- the builder's and the profile's argument errors are RuntimeError.
pycuda rules enforced (and CUDA's, which pycuda passes through): `init()` before anything else; a current
context (`push`) for allocations, copies, streams, events and launches, the context stack being per host
thread; async copies only from and to page-locked host memory; a context stack popped in order; a retained
primary context detached once, and only after every object made in it (execution contexts, engines, device
memory) is gone. Work queued on a stream (`memcpy_*_async`, `execute_async_v3`) runs in order and completes
only when the stream or a later event is synchronised: until then a device-to-host copy has not landed, and a
host buffer rewritten before its host-to-device copy has run is what the device reads.
"""

from __future__ import annotations

import enum
import pickle
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

MAGIC = b"STANDIN-TRT-10\n"
DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression", "Unique"}
_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int32)": "INT32",
               "tensor(int64)": "INT64", "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
          "UINT8": np.uint8, "BOOL": np.bool_}


class DeviceMemoryViolation(AssertionError):
    """A read or write past a device allocation: on a GPU, silent corruption or a crash."""


class LogicError(RuntimeError):
    """pycuda.driver.LogicError."""


# ---------------------------------------------------------------- pycuda.driver


@dataclass
class _Cuda:
    initialised: bool = False
    allocations: dict[int, bytearray] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)  # ids of page-locked host buffers
    next_address: int = 0x7F0000000000
    retained: int = 0
    streams: dict[int, Any] = field(default_factory=dict)  # handle -> stream, for execute_async_v3
    # cuEventSynchronize on an event created without CU_EVENT_BLOCKING_SYNC busy-waits: the host thread holds a
    # core for as long as the device works (CUDA driver API, cuEventCreate); each such wait that found work left
    busy_waits: int = 0
    _local: threading.local = field(default_factory=threading.local)

    @property
    def stack(self) -> list[_Context]:
        """This host thread's context stack (CUDA keeps one per thread)."""
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def require_context(self, what: str) -> None:
        if not self.initialised:
            raise LogicError(f"{what} failed: cuInit has not been called")
        if not self.stack:
            raise LogicError(f"{what} failed: invalid device context - no currently active context?")


class _Context:
    def __init__(self, cuda: _Cuda) -> None:
        self._cuda, self.detached = cuda, False
        self.owned: set[str] = set()  # what was made while this context was current and is still alive

    def push(self) -> None:
        if self.detached:
            raise LogicError("cannot push a detached context")
        self._cuda.stack.append(self)

    def pop(self) -> None:
        if not self._cuda.stack or self._cuda.stack[-1] is not self:
            raise LogicError("context stack: pop of a context that is not current")
        self._cuda.stack.pop()

    def detach(self) -> None:
        if self.detached:
            raise LogicError("context detached twice")
        if self.owned:
            raise LogicError(f"context detached while what was made in it is alive: {sorted(self.owned)}")
        self.detached = True
        self._cuda.retained -= 1


def _own(cuda: _Cuda, what: str) -> _Context:
    """Record `what` as made in the current context (which must exist); returns that context."""
    context = cuda.stack[-1]
    context.owned.add(what)
    return context


class DeviceAllocation:
    def __init__(self, cuda: _Cuda, nbytes: int) -> None:
        self._cuda = cuda
        self.address = cuda.next_address
        cuda.next_address += (nbytes + 255) // 256 * 256 + 256
        cuda.allocations[self.address] = bytearray(nbytes)
        self._context = _own(cuda, f"allocation {self.address:#x}")

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self._cuda.require_context("cuMemFree")
        del self._cuda.allocations[self.address]
        self._context.owned.discard(f"allocation {self.address:#x}")


def _pinned_base(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def make_pycuda(devices: int = 1) -> tuple[types.ModuleType, types.ModuleType, _Cuda]:
    state = _Cuda()
    driver = types.ModuleType("pycuda.driver")
    driver.LogicError = LogicError

    def init() -> None:
        state.initialised = True

    class Device:
        def __init__(self, index: int) -> None:
            if not state.initialised:
                raise LogicError("cuDeviceGet failed: cuInit has not been called")
            if not 0 <= index < devices:
                raise LogicError(f"cuDeviceGet failed: invalid device ordinal {index}")

        @staticmethod
        def count() -> int:
            if not state.initialised:
                raise LogicError("cuDeviceGetCount failed: cuInit has not been called")
            return devices

        def retain_primary_context(self) -> _Context:
            state.retained += 1
            return _Context(state)

    class Stream:
        """Work queued here runs, in order, when the stream (or an event recorded on it) is synchronised."""

        def __init__(self) -> None:
            state.require_context("cuStreamCreate")
            self.handle = id(self)
            self.queue: list[Callable[[], None]] = []
            state.streams[self.handle] = self

        def enqueue(self, work: Callable[[], None]) -> None:
            self.queue.append(work)

        def run(self, upto: int | None = None) -> None:
            count = len(self.queue) if upto is None else upto
            done, self.queue = self.queue[:count], self.queue[count:]
            for work in done:
                work()

        def synchronize(self) -> None:
            state.require_context("cuStreamSynchronize")
            self.run()

    default: dict[str, Stream] = {}

    def _stream(stream: Stream | None) -> Stream:
        if stream is None:  # the legacy default stream: asynchronous as well
            stream = default.setdefault("stream", Stream())
        return stream

    class event_flags:  # noqa: N801 (pycuda's name): CUevent_flags
        DEFAULT = 0x0
        BLOCKING_SYNC = 0x1
        DISABLE_TIMING = 0x2
        INTERPROCESS = 0x4

    class Event:
        def __init__(self, flags: int = 0) -> None:
            state.require_context("cuEventCreate")
            if flags & ~0x7:
                raise LogicError(f"cuEventCreate failed: invalid value (flags {flags:#x})")
            if flags & event_flags.INTERPROCESS and not flags & event_flags.DISABLE_TIMING:
                raise LogicError("cuEventCreate failed: invalid value (an interprocess event must disable timing)")
            self.flags = flags
            self._stream: Stream | None = None
            self._marker: Callable[[], None] | None = None
            self._done = True

        def record(self, stream: Stream | None = None) -> Event:
            state.require_context("cuEventRecord")
            self._stream, self._done = _stream(stream), False

            def reached() -> None:
                self._done = True

            self._marker = reached
            self._stream.enqueue(reached)
            return self

        def query(self) -> bool:
            state.require_context("cuEventQuery")
            return self._done  # the stand-in's device only works when something synchronises

        def synchronize(self) -> None:
            state.require_context("cuEventSynchronize")
            if not self._done and self._stream is not None:
                if not self.flags & event_flags.BLOCKING_SYNC:
                    state.busy_waits += 1
                self._stream.run(upto=self._stream.queue.index(self._marker) + 1)

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        state.require_context("cuMemHostAlloc")
        array = np.empty(shape, dtype)
        state.pinned.add(id(array))
        return array

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        state.require_context("cuMemAlloc")
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument (size 0)")
        return DeviceAllocation(state, int(nbytes))

    def _check_pinned(array: np.ndarray, what: str) -> None:
        if id(_pinned_base(array)) not in state.pinned:
            raise LogicError(f"{what}: async copies need page-locked host memory")

    def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream | None = None) -> None:
        state.require_context("cuMemcpyHtoDAsync")
        _check_pinned(src, "cuMemcpyHtoDAsync")
        memory = state.allocations[int(dest)]
        if src.nbytes > len(memory):
            raise DeviceMemoryViolation(f"copy of {src.nbytes} bytes into a {len(memory)}-byte allocation")

        def copy() -> None:  # reads the host buffer as it is when the copy runs, not when it was queued
            memory[: src.nbytes] = src.tobytes()

        _stream(stream).enqueue(copy)

    def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream | None = None) -> None:
        state.require_context("cuMemcpyDtoHAsync")
        _check_pinned(dest, "cuMemcpyDtoHAsync")
        memory = state.allocations[int(src)]
        if dest.nbytes > len(memory):
            raise DeviceMemoryViolation(f"copy of {dest.nbytes} bytes out of a {len(memory)}-byte allocation")

        def copy() -> None:
            dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(memory[: dest.nbytes]), np.uint8)

        _stream(stream).enqueue(copy)

    for name, value in dict(init=init, Device=Device, Stream=Stream, Event=Event, event_flags=event_flags,
                            pagelocked_empty=pagelocked_empty,
                            mem_alloc=mem_alloc, memcpy_htod_async=memcpy_htod_async,
                            memcpy_dtoh_async=memcpy_dtoh_async).items():
        setattr(driver, name, value)
    package = types.ModuleType("pycuda")
    package.driver = driver
    return package, driver, state


# ---------------------------------------------------------------- tensorrt


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 6


class _Engine:
    """ICudaEngine over an ONNX model run by onnxruntime."""

    def __init__(self, onnx_bytes: bytes, profiles: dict[str, tuple], cuda: _Cuda) -> None:
        cuda.require_context("deserializeCudaEngine")
        self._session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self._cuda = cuda
        self._context = _own(cuda, f"engine {id(self):#x}")
        self.profiles = profiles
        self.data_dependent = _has_data_dependent_ops(onnx_bytes)
        self.io: dict[str, tuple[TensorIOMode, str, tuple[int, ...]]] = {}
        for arg in self._session.get_inputs():
            self.io[arg.name] = (TensorIOMode.INPUT, _ORT_TO_TRT[arg.type], _dims(arg.shape))
        for arg in self._session.get_outputs():
            self.io[arg.name] = (TensorIOMode.OUTPUT, _ORT_TO_TRT[arg.type], _dims(arg.shape))
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = 1

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.io[name][1]]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if self.io[name][0] is not TensorIOMode.INPUT or profile_index != 0:
            raise RuntimeError(f"no profile shape for {name!r} in profile {profile_index}")
        if name in self.profiles:
            return [tuple(s) for s in self.profiles[name]]
        return [self.io[name][2]] * 3  # a fixed input: its shape

    def create_execution_context(self) -> _ExecutionContext:
        self._cuda.require_context("createExecutionContext")
        return _ExecutionContext(self)

    def __del__(self) -> None:
        self._context.owned.discard(f"engine {id(self):#x}")

    def compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, feeds)))


def _workspace_needed(onnx_bytes: bytes | None) -> int:
    """The workspace the stand-in's "tactics" need: as many bytes as the network's weights."""
    import onnx
    from onnx import numpy_helper

    if onnx_bytes is None:
        return 0
    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load_from_string(onnx_bytes).graph.initializer)


def _dims(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def _has_data_dependent_ops(onnx_bytes: bytes) -> bool:
    import onnx

    return any(node.op_type in DATA_DEPENDENT_OPS for node in onnx.load_from_string(onnx_bytes).graph.node)


class _ExecutionContext:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self._context = _own(engine._cuda, f"execution context {id(self):#x}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self.executions: list[dict[str, tuple[int, ...]]] = []  # input shapes of every execution

    def _inputs(self) -> list[str]:
        return [n for n, (mode, _, _) in self.engine.io.items() if mode is TensorIOMode.INPUT]

    def set_input_shape(self, name: str, shape: Any) -> bool:
        if self.engine.get_tensor_mode(name) is not TensorIOMode.INPUT:
            return False
        shape = tuple(int(d) for d in shape)
        fixed = self.engine.io[name][2]
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(fixed) or any(f >= 0 and f != s for f, s in zip(fixed, shape)):
            return False
        if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            return False
        self._shapes[name] = shape
        return True

    @property
    def all_input_dimensions_specified(self) -> bool:
        return all(n in self._shapes for n in self._inputs())

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, _, declared = self.engine.io[name]
        if mode is TensorIOMode.INPUT:
            return self._shapes.get(name, declared)
        if not self.all_input_dimensions_specified or (self.engine.data_dependent and -1 in declared):
            return declared
        return self._output_shapes_now()[name]

    def _output_shapes_now(self) -> dict[str, tuple[int, ...]]:
        key = tuple(sorted(self._shapes.items()))
        if key not in self._output_shapes:
            zeros = {n: np.zeros(s, _NUMPY[self.engine.io[n][1]]) for n, s in self._shapes.items()}
            self._output_shapes[key] = {n: tuple(v.shape) for n, v in self.engine.compute(zeros).items()}
        return self._output_shapes[key]

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.io:
            return False
        self._addresses[name] = int(address)
        return True

    def __del__(self) -> None:
        self._context.owned.discard(f"execution context {id(self):#x}")

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Checks what TensorRT checks at enqueue time, then queues the inference on the stream: it reads the
        inputs and writes the outputs when the stream runs, at the shapes and addresses bound now."""
        cuda = self.engine._cuda
        if not cuda.stack:
            return False  # no current CUDA context: the launch fails
        if not self.all_input_dimensions_specified or set(self._addresses) != set(self.engine.io):
            return False
        stream = cuda.streams.get(stream_handle)
        if stream is None:
            return False
        shapes, addresses = dict(self._shapes), dict(self._addresses)
        self.executions.append(dict(shapes))
        stream.enqueue(lambda: self._compute(shapes, addresses))
        return True

    def _compute(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        cuda = self.engine._cuda
        feeds = {}
        for name, shape in shapes.items():
            dtype = np.dtype(_NUMPY[self.engine.io[name][1]])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            memory = cuda.allocations.get(addresses[name])
            if memory is None or nbytes > len(memory):
                raise DeviceMemoryViolation(f"input {name!r} of {nbytes} bytes read past its allocation")
            feeds[name] = np.frombuffer(bytes(memory[:nbytes]), dtype).reshape(shape)
        for name, value in self.engine.compute(feeds).items():
            data = np.ascontiguousarray(value, _NUMPY[self.engine.io[name][1]]).tobytes()
            memory = cuda.allocations.get(addresses[name])
            if memory is None or len(data) > len(memory):
                size = None if memory is None else len(memory)
                raise DeviceMemoryViolation(f"output {name!r} of {len(data)} bytes written into an allocation of {size}")
            memory[: len(data)] = data


class _Network:
    def __init__(self) -> None:
        self.inputs: list[types.SimpleNamespace] = []
        self.onnx: bytes | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> types.SimpleNamespace:
        return self.inputs[index]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        shapes = tuple(tuple(int(d) for d in s) for s in (low, opt, high))
        if len({len(s) for s in shapes}) != 1:
            raise RuntimeError("min, opt and max must have the same rank")
        if any(not (a <= b <= c) for a, b, c in zip(*shapes)):
            raise RuntimeError(f"profile for {name!r} breaks min <= opt <= max: {shapes}")
        self.shapes[name] = shapes


def make_tensorrt(cuda: _Cuda) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0-standin"
    trt.TensorIOMode, trt.DataType = TensorIOMode, DataType
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    trt.loggers = []  # every Logger made in this "process"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            trt.loggers.append(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            if not data.startswith(MAGIC):
                return None  # TensorRT logs "Serialization assertion ... failed" and returns None
            plan = pickle.loads(data[len(MAGIC):])
            return _Engine(plan["onnx"], plan["profiles"], cuda)

    class OnnxParser:
        def __init__(self, network: _Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> str:
            return self.errors[index]

        def parse(self, data: bytes) -> bool:
            try:
                session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            except Exception as exc:
                self.errors.append(str(exc))
                return False
            self.network.onnx = data
            self.network.inputs = [types.SimpleNamespace(name=a.name, shape=_dims(a.shape)) for a in session.get_inputs()]
            return True

    class BuilderConfig:
        def __init__(self) -> None:
            self.profiles: list[_Profile] = []
            self.flags: set[str] = set()
            self.pool_limits: dict[str, int] = {}

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pool_limits[pool] = int(size)

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, profile: _Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            return _Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: BuilderConfig) -> bytes | None:
            limit = config.pool_limits.get(trt.MemoryPoolType.WORKSPACE)
            if limit is not None and limit < _workspace_needed(network.onnx):
                return None  # TensorRT: no tactic fits the workspace: the build fails
            profile = config.profiles[0].shapes if config.profiles else {}
            for tensor in network.inputs:
                dynamic = any(d < 0 for d in tensor.shape)
                shapes = profile.get(tensor.name)
                if shapes is None:
                    if dynamic:
                        return None  # "Network has dynamic or shape inputs, but no optimization profile"
                    continue
                for s in shapes:
                    if len(s) != len(tensor.shape) or any(f >= 0 and f != d for f, d in zip(tensor.shape, s)):
                        return None  # the profile contradicts a fixed dimension of the network input
            return MAGIC + pickle.dumps({"onnx": network.onnx, "profiles": profile})

    for name, value in dict(Logger=Logger, Runtime=Runtime, OnnxParser=OnnxParser, Builder=Builder).items():
        setattr(trt, name, value)
    return trt


def install(monkeypatch: Any, devices: int = 1) -> types.SimpleNamespace:
    """Put the stand-ins in sys.modules for one test; returns them and pycuda's state."""
    package, driver, state = make_pycuda(devices)
    trt = make_tensorrt(state)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return types.SimpleNamespace(trt=trt, cuda=driver, state=state)
