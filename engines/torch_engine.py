"""Torch backend: the same ONNX file converted with onnx2torch, on CUDA (optionally fp16) or CPU.

This is the GPU path where TensorRT is not installed (our GPU machine has torch but neither
TensorRT nor onnxruntime-gpu), so GPU numbers come from the project's own code path.

On CUDA it launches like TensorRT does: `prepare` captures the forward once per batch shape it is given
(the power-of-two buckets of engines/batching.py) as a CUDA graph on the engine's own stream, into static
device buffers, and every run of a captured shape is one copy into a page-locked buffer, one host-to-device
copy, one graph replay and one device-to-host copy, enqueued without waiting; `wait` then blocks on that
stream's event alone, with the GIL released. Eager onnx2torch, which launches each of a model's kernels
from Python, stays for the CPU, for shapes nobody prepared, and where `cuda_graphs` is off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Completed, Engine, EngineError, Pending, PendingRun, RunTiming, TensorSpec
from engines.cuda_sync import CudaSync, set_sync

logger = logging.getLogger(__name__)

_ONNX_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64}
_CLOCK_REANCHOR_S = 30.0  # CUDA event times are float milliseconds: re-anchor before they lose precision


def _spec(value_info: Any) -> TensorSpec:
    tensor = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    if tensor.elem_type not in _ONNX_TYPES:
        raise EngineError(f"tensor {value_info.name!r} has unsupported ONNX type {tensor.elem_type}")
    return TensorSpec(value_info.name, dims, np.dtype(_ONNX_TYPES[tensor.elem_type]))


def _dtype_name(dtype: Any) -> str:
    """'float32' for np.float32, np.dtype('float32') and torch.float32 alike."""
    return str(dtype).removeprefix("torch.") if not isinstance(dtype, np.dtype | type) else np.dtype(dtype).name


Key = tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype name) of each input


@dataclass
class CapturedGraph:
    """One captured forward: static device inputs and outputs, and page-locked host copies of both."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[Any]  # static device tensors the replay reads
    outputs: list[Any]  # static device tensors the replay writes
    host_inputs: list[Any] = field(default_factory=list)  # page-locked, made on the first host run
    host_outputs: list[Any] = field(default_factory=list)


def capture_graph(fn: Callable[[list[Any]], list[Any]], example: Sequence[Any], stream: Any, pool: Any = None,
                  warmups: int = 2) -> CapturedGraph:
    """`fn` (device tensors -> device tensors) captured as one CUDA graph on `stream`, with clones of `example`
    as its static inputs. Runs `fn` `warmups` times first (cuDNN/cuBLAS handles and algorithm choice happen
    there, not inside the capture). Captures thread-locally: other threads of the process keep using CUDA
    meanwhile (the stages of layouts ingress and colocated), and skips torch.cuda.graph's device-wide
    synchronize and cache flush, which would stall every other engine when a capture happens at run time."""
    import torch

    static = [t.clone() for t in example]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn(static)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()  # known here, should the capture fail
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            outputs = fn(static)
            graph.capture_end()
        except BaseException:
            _abandon_capture(torch, graph, stream.device, pool)
            raise
    return CapturedGraph(graph, static, list(outputs))


def _abandon_capture(torch: Any, graph: Any, device: Any, pool: Any) -> None:
    """End a capture that failed, and the memory pool's recording with it. torch's capture_end raises on an
    invalidated capture before it tells the caching allocator that the pool stopped recording, so every later
    capture into that pool failed ("beginAllocateToPool: already recording to mempool_id"; seen on an H100 when
    another thread's CUDA work invalidated one capture and no graph of the detector captured after it). The pool
    is the one passed to capture_begin: a graph names its pool only after a capture that succeeded. Where torch
    still leaves the pool recording (2.11 did on an H100, with this), the engines capture into a new pool after a
    failure."""
    with suppress(Exception):  # the first error is the one to report
        graph.capture_end()
    with suppress(Exception):  # raises where capture_end got as far as ending the recording itself
        torch._C._cuda_endAllocateToPool(torch.device(device).index, pool)


def to_host(tensor: Any) -> np.ndarray:
    """A tensor's values as a numpy array on the host. On CUDA it waits for the current stream's work only, on an
    event, after a copy into page-locked memory that does not block: `.cpu()` copies into pageable memory, a
    synchronous copy for as long as the stream's work runs, and other threads' launches and copies queued behind
    it (bench/host_read.py measures both). The event blocks: CUDA busy-waits on any other, whatever the
    context's scheduling flag (engines/cuda_sync.py), and on an H100 the detector's thread spun a core through its
    whole batch (1.31 against 0.37 ms of its CPU an image, docs/benchmarks.md run 11)."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    import torch

    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event(blocking=True)
    done.record()
    done.synchronize()  # torch releases the GIL while it waits
    return host.numpy()


def replay(graph: CapturedGraph, tensors: Sequence[Any]) -> list[Any]:
    """Copy `tensors` into the graph's inputs and replay it, on the caller's current stream; returns the graph's
    own output tensors (overwritten by its next replay)."""
    for static, tensor in zip(graph.inputs, tensors):
        static.copy_(tensor)
    graph.graph.replay()
    return graph.outputs


class _GpuClock:
    """Maps CUDA events onto time.perf_counter(): an event recorded on an idle stream and waited for is
    `anchor`; any later event is anchor + its elapsed time."""

    def __init__(self, torch: Any, stream: Any) -> None:
        self._torch, self._stream = torch, stream
        self._anchor: Any = None
        self._anchor_at = 0.0

    def reanchor_if_stale(self) -> None:
        """Call when the stream is idle (the event is then reached at once)."""
        if self._anchor is None or time.perf_counter() - self._anchor_at > _CLOCK_REANCHOR_S:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record(self._stream)
            event.synchronize()
            self._anchor, self._anchor_at = event, time.perf_counter()

    def at(self, event: Any) -> float:
        return self._anchor_at + self._anchor.elapsed_time(event) / 1e3


class _GraphRun(Pending[dict[str, np.ndarray]]):
    """A replay in flight: its outputs land in the graph's page-locked buffers when `end` is reached."""

    def __init__(self, engine: TorchEngine, graph: CapturedGraph, begin: Any, end: Any, launched_at: float,
                 enqueued_at: float) -> None:
        self._engine, self._graph = engine, graph
        self._begin, self._end = begin, end
        self._launched_at, self._enqueued_at = launched_at, enqueued_at
        self._lock = threading.Lock()
        self._outputs: dict[str, np.ndarray] | None = None
        self._timing: RunTiming | None = None

    def done(self) -> bool:
        return self._outputs is not None or bool(self._end.query())

    def wait(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._outputs is None:
                self._end.synchronize()  # this stream's work only; torch releases the GIL meanwhile
                names = [s.name for s in self._engine.outputs]
                self._outputs = {n: host.numpy().copy() for n, host in zip(names, self._graph.host_outputs)}
                clock = self._engine._clock
                self._timing = RunTiming(self._launched_at, self._enqueued_at, clock.at(self._begin),
                                         clock.at(self._end))
                self._engine._finished(self)
            return self._outputs

    @property
    def timing(self) -> RunTiming | None:
        return self._timing


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, path: Path, device: str = "auto", fp16: bool = False, intra_op_threads: int = 1,
                 cuda_graphs: bool | str = "auto", cuda_sync: CudaSync = "block") -> None:
        """`cuda_graphs`: "auto" (capture on CUDA; a model that will not capture runs eager, with a warning),
        True (the same, but a model that will not capture fails the load), False (always eager). `cuda_sync`: how
        this process's host threads wait for the GPU (engines/cuda_sync.py)."""
        try:
            import onnx
            import torch

            from engines import onnx_to_torch
        except ImportError as exc:
            raise EngineError(f"the torch backend needs torch and onnx2torch ({exc.name} is missing): pip install '.[torch]'") from exc
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for the torch backend, but torch sees no CUDA GPU")
        self.device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        self.cuda_sync = set_sync(cuda_sync, torch.cuda.current_device()) if self.device == "cuda" else None
        # torch's CPU thread pool is per process and defaults to every core: hold it to the replica's share
        # (stages that share a process, as in layout "ingress", share one pool; the last setting wins). On CUDA
        # too: the host's own torch ops there are small, and a pool of every core spun between them.
        torch.set_num_threads(intra_op_threads)
        self.name = Path(path).name
        try:
            model = onnx.load(str(path))
            self._inputs_of(model)  # unsupported types fail before the conversion
            module = onnx_to_torch.convert(model)
        except EngineError:
            raise
        except Exception as exc:  # onnx2torch raises NotImplementedError and friends
            raise EngineError(f"onnx2torch cannot convert {self.name}: {exc}") from exc
        self._inputs = self._inputs_of(model)
        self._outputs = [_spec(v) for v in model.graph.output]
        # fp16 through autocast, not .half(): ops that need fp32 (softmax, reductions, the casts some
        # exports contain) stay in fp32, and inputs and weights keep their types
        self._fp16 = fp16 and self.device == "cuda"
        self._module = module.eval().to(self.device)
        self._torch = torch
        self._transform: Callable[[Any], Any] | None = None
        # Each engine queues its work on its own stream, so engines that share a process (layouts colocated
        # and ingress) overlap on the GPU instead of serialising on the default stream.
        self._stream = torch.cuda.Stream() if self.device == "cuda" else None
        self._clock = _GpuClock(torch, self._stream) if self._stream is not None else None
        self.cuda_graphs = self.device == "cuda" and cuda_graphs is not False
        self._strict_capture = cuda_graphs is True
        self.asynchronous = self.cuda_graphs
        self._graphs: dict[Key, CapturedGraph] = {}
        self._pool: Any = None  # one memory pool for all of this engine's graphs (they never replay at once)
        self._lock = threading.Lock()
        self._in_flight: _GraphRun | None = None
        self.capture_s = 0.0
        logger.info("loaded %s through onnx2torch on %s%s", self.name, self.device, " fp16" if self._fp16 else "")

    @staticmethod
    def _inputs_of(model: Any) -> list[TensorSpec]:
        initializers = {i.name for i in model.graph.initializer}
        return [_spec(v) for v in model.graph.input if v.name not in initializers]

    # -- set-up ------------------------------------------------------------------------------------------

    def fuse_input(self, transform: Callable[[Any], Any]) -> None:
        """Prepend `transform` (torch tensor -> the model's input tensor) to the forward, so callers feed what
        it takes (uint8 crops, say) and it runs on the engine's device, inside the captured graph. Before
        `prepare`."""
        if len(self._inputs) != 1:
            raise EngineError(f"{self.name}: an input transform needs a model with one input")
        if self._graphs:
            raise EngineError(f"{self.name}: fuse the input transform before prepare()")
        self._transform = transform

    def prepare(self, samples: Iterable[Mapping[str, np.ndarray]]) -> None:
        """Capture one CUDA graph per sample shape (largest first is best: later, smaller captures reuse the
        memory the first reserved); without graphs, run each once."""
        samples = list(samples)
        if not self.cuda_graphs:
            for sample in samples:
                self.run(sample)
            return
        start = time.perf_counter()
        for sample in samples:
            arrays = [np.ascontiguousarray(sample[s.name]) for s in self._inputs]
            self.capture([self._torch.from_numpy(a).to(self.device) for a in arrays])
        self.capture_s += time.perf_counter() - start
        if self.cuda_graphs:
            logger.info("%s: %d CUDA graphs captured in %.2f s", self.name, len(self._graphs), self.capture_s)

    def capture(self, example: Sequence[Any]) -> bool:
        """Capture the forward for inputs shaped like the device tensors `example`; False (and eager from then
        on for that shape) where the model will not capture and `cuda_graphs` is "auto"."""
        torch = self._torch
        key = self._key(example)
        if key in self._graphs or not self.cuda_graphs:
            return key in self._graphs
        try:
            def forward(tensors: list[Any]) -> list[Any]:
                with self._context(own_stream=False):
                    return self._forward(tensors)

            captured = capture_graph(forward, example, self._stream, self._pool)
        except Exception as exc:
            if self._strict_capture:
                raise EngineError(f"{self.name}: cannot capture the forward as a CUDA graph: {exc}") from exc
            logger.warning("%s: cannot capture shape %s as a CUDA graph (%s); it runs eager", self.name,
                           [list(t.shape) for t in example], str(exc).splitlines()[0][:200])
            self._stream.synchronize()  # not the device: another thread's capture would fail on that
            self._pool = None  # the next capture goes into a new pool (a failed one may leave its pool recording)
            return False
        self._pool = captured.graph.pool()
        self._graphs[key] = captured
        return True

    @property
    def captured(self) -> list[Key]:
        """The input shapes (and dtypes) replayed as CUDA graphs."""
        return list(self._graphs)

    # -- running -----------------------------------------------------------------------------------------

    @staticmethod
    def _key(arrays: Sequence[Any]) -> Key:
        return tuple((tuple(int(d) for d in a.shape), _dtype_name(a.dtype)) for a in arrays)

    def _autocast(self) -> Any:
        if not self._fp16:
            return nullcontext()
        # autocast's cache of fp16 weight copies must stay off inside a CUDA graph capture
        capturing = self._torch.cuda.is_current_stream_capturing()
        return self._torch.autocast("cuda", dtype=self._torch.float16, cache_enabled=not capturing)

    def _context(self, own_stream: bool = True) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(self._torch.inference_mode())
        if own_stream and self._stream is not None:
            stack.enter_context(self._torch.cuda.stream(self._stream))
        stack.enter_context(self._autocast())
        return stack

    def _forward(self, tensors: Sequence[Any]) -> list[Any]:
        if self._transform is not None:
            tensors = [self._transform(tensors[0])]
        out = self._module(*tensors)
        out = out if isinstance(out, (list, tuple)) else (out,)
        if len(out) != len(self._outputs):
            raise EngineError(
                f"the converted model returned {len(out)} outputs, the ONNX graph declares "
                f"{len(self._outputs)} ({[s.name for s in self._outputs]})"
            )
        return [o.float() if o.is_floating_point() else o for o in out]

    def _arrays(self, feeds: Mapping[str, Any]) -> list[Any]:
        """The inputs in declared order: numpy arrays (host), or torch tensors already on the engine's device."""
        return [np.ascontiguousarray(feeds[spec.name]) if isinstance(feeds[spec.name], np.ndarray)
                else feeds[spec.name].contiguous() for spec in self._inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.launch(feeds).wait()

    def launch(self, feeds: Mapping[str, np.ndarray]) -> PendingRun:
        if self._module is None:
            raise EngineError(f"{self.name}: the engine is closed")
        arrays = self._arrays(feeds)
        graph = self._graphs.get(self._key(arrays)) if self._graphs else None
        if graph is None:
            start = time.perf_counter()
            outputs = self._run_eager(arrays)
            return Completed(outputs, RunTiming(start, time.perf_counter()))
        torch = self._torch
        with self._lock:
            if self._in_flight is not None:
                self._in_flight.wait()  # its page-locked buffers are about to be overwritten
            self._clock.reanchor_if_stale()
            launched_at = time.perf_counter()
            if not graph.host_inputs:
                graph.host_inputs = [torch.empty_like(t, device="cpu").pin_memory() for t in graph.inputs]
                graph.host_outputs = [torch.empty_like(t, device="cpu").pin_memory() for t in graph.outputs]
            on_device = not isinstance(arrays[0], np.ndarray)
            if on_device:  # made on the caller's stream: the replay waits for it, and it lives until the copy ran
                self._stream.wait_stream(torch.cuda.current_stream())
                for array in arrays:
                    array.record_stream(self._stream)
            else:
                for host, array in zip(graph.host_inputs, arrays):
                    np.copyto(host.numpy(), array)
            with torch.cuda.stream(self._stream):
                for device_input, host, array in zip(graph.inputs, graph.host_inputs, arrays):
                    device_input.copy_(array if on_device else host, non_blocking=True)
                begin = torch.cuda.Event(enable_timing=True)
                begin.record(self._stream)
                graph.graph.replay()
                for host, device_output in zip(graph.host_outputs, graph.outputs):
                    host.copy_(device_output, non_blocking=True)
                end = torch.cuda.Event(enable_timing=True)
                end.record(self._stream)
            run = _GraphRun(self, graph, begin, end, launched_at, time.perf_counter())
            self._in_flight = run
            return run

    def _finished(self, run: _GraphRun) -> None:
        if self._in_flight is run:
            self._in_flight = None

    def _run_eager(self, arrays: list[Any]) -> dict[str, np.ndarray]:
        torch = self._torch
        if arrays and not isinstance(arrays[0], np.ndarray) and self.device == "cuda":
            self._stream.wait_stream(torch.cuda.current_stream())  # tensors made on the caller's stream
        with self._context():
            tensors = [torch.from_numpy(a).to(self.device, non_blocking=True) if isinstance(a, np.ndarray)
                       else a.to(self.device) for a in arrays]
            out = self._forward(tensors)
            # waits for this stream's work only, on an event (not .cpu()'s blocking copy: to_host)
            return {spec.name: to_host(o) for spec, o in zip(self._outputs, out)}

    def run_tensors(self, tensors: Sequence[Any]) -> list[Any]:
        """Device tensors in, device tensors out, queued on the caller's current stream with no host copy (the
        GPU-resident MTCNN). A batch of n rows replays the captured graph of the smallest batch >= n of the
        same item shape (its first n rows copied into the graph's inputs, the rest left as they are: rows are
        independent), and the first n rows of its outputs are cloned, so they survive the next replay. Other
        shapes run eager. Callers serialise their calls to one engine."""
        graph, rows = self._graph_for(tensors)
        with self._context(own_stream=False):
            if graph is None:
                return self._forward(tensors)
            with self._lock:
                if self._in_flight is not None:
                    self._in_flight.wait()
                for static, tensor in zip(graph.inputs, tensors):
                    static[:rows].copy_(tensor)
                graph.graph.replay()
                return [o[:rows].clone() for o in graph.outputs]

    def forward_tensors(self, tensors: Sequence[Any]) -> list[Any]:
        """Device tensors in, device tensors out, always eager on the caller's current stream: for a caller that
        captures a larger graph around this model (engines/mtcnn_static.py), where replaying the model's own graph
        would not be captured."""
        with self._context(own_stream=False):
            return self._forward(tensors)

    def _graph_for(self, tensors: Sequence[Any]) -> tuple[CapturedGraph | None, int]:
        """The graph for these inputs (exact shape, or the smallest larger batch of one input), and the rows."""
        if not self._graphs:
            return None, 0
        key = self._key(tensors)
        if key in self._graphs:
            return self._graphs[key], int(tensors[0].shape[0])
        if len(key) != 1:
            return None, 0
        (shape, dtype), = key
        fits = [k for k in self._graphs if k[0][1] == dtype and k[0][0][1:] == shape[1:] and k[0][0][0] >= shape[0]]
        if not fits:
            return None, 0
        return self._graphs[min(fits, key=lambda k: k[0][0][0])], shape[0]

    def close(self) -> None:
        """Wait for a run in flight, then drop the graphs, their memory pool and the module."""
        with self._lock:
            if self._in_flight is not None:
                self._in_flight.wait()
            self._graphs.clear()
            self._pool = None
            self._module = None
        if self._stream is not None:
            self._stream.synchronize()
