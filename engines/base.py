"""The interface every inference backend implements.

An engine has three verbs, as a Triton model does (initialize, execute, finalize): it is loaded by its
constructor, `run` (or `launch`, then `wait`) executes a batch, and `close` releases what it holds.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


class EngineError(RuntimeError):
    """A model could not be loaded, or its inputs do not fit it."""


Dim = int | str | None  # a fixed size, or a symbolic / unknown one


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and element type of one model input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def fixed_dims(self) -> tuple[int | None, ...]:
        """The shape with symbolic dimensions replaced by None."""
        return tuple(d if isinstance(d, int) and d >= 0 else None for d in self.shape)


@dataclass(frozen=True)
class RunTiming:
    """Where one engine run's time went (seconds on `time.perf_counter()`'s clock; GPU times estimated on it
    from CUDA events, None where the engine has no device timeline)."""

    launched_at: float  # the host started enqueueing (or computing, for a synchronous engine)
    enqueued_at: float  # the host had handed everything to the device and was free again
    gpu_start_at: float | None = None
    gpu_end_at: float | None = None


class Pending(abc.ABC, Generic[T]):
    """Work handed to an engine: `wait` blocks until it is done and returns its result.

    `wait` may be called from another thread than the one that launched (it releases the GIL while it waits
    where the backend allows), and more than once (the result is kept)."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True when `wait` would return at once."""

    @abc.abstractmethod
    def wait(self) -> T:
        """The result."""

    @property
    @abc.abstractmethod
    def timing(self) -> RunTiming | None:
        """Where the work's time went; None before `wait` returned."""

    def then(self, fn: Callable[[T], R]) -> Pending[R]:
        """A Pending whose result is `fn` of this one's, computed by the first `wait`."""
        return _Then(self, fn)


PendingRun = Pending[dict[str, np.ndarray]]  # one engine run: its outputs by name


class Completed(Pending[T]):
    """Work that finished before it was handed back (every synchronous engine's run)."""

    def __init__(self, value: T, timing: RunTiming) -> None:
        self._value = value
        self._timing = timing

    def done(self) -> bool:
        return True

    def wait(self) -> T:
        return self._value

    @property
    def timing(self) -> RunTiming:
        return self._timing


def completed(fn: Callable[..., T], *args: Any) -> Completed[T]:
    """Run `fn(*args)` now, as a Pending that is already done (with its timing)."""
    start = time.perf_counter()
    value = fn(*args)
    return Completed(value, RunTiming(start, time.perf_counter()))


class _Then(Pending[R]):
    def __init__(self, source: Pending[Any], fn: Callable[[Any], R]) -> None:
        self._source, self._fn = source, fn
        self._lock = threading.Lock()
        self._has_value = False
        self._value: R | None = None

    def done(self) -> bool:
        return self._has_value or self._source.done()

    def wait(self) -> R:
        with self._lock:
            if not self._has_value:
                self._value = self._fn(self._source.wait())
                self._has_value = True
        return self._value  # type: ignore[return-value]

    @property
    def timing(self) -> RunTiming | None:
        return self._source.timing


def span(timings: Sequence[RunTiming | None]) -> RunTiming | None:
    """One timing covering several runs made one after another (the chunks of a large batch)."""
    known = [t for t in timings if t is not None]
    if not known:
        return None
    gpu_starts = [t.gpu_start_at for t in known if t.gpu_start_at is not None]
    gpu_ends = [t.gpu_end_at for t in known if t.gpu_end_at is not None]
    return RunTiming(min(t.launched_at for t in known), max(t.enqueued_at for t in known),
                     min(gpu_starts) if gpu_starts else None, max(gpu_ends) if gpu_ends else None)


class Engine(abc.ABC):
    """One loaded model: describes its tensors and runs a batch.

    `run` is synchronous and thread-compatible (one call at a time per engine); callers that
    need concurrency own the scheduling. `launch` hands a batch over and returns at once where the backend
    can (a CUDA-graph replay, a TensorRT enqueue): several engines launched one after another then compute
    together on their own streams, and the caller waits on each (`asynchronous` says whether it does).
    """

    backend: str
    device: str
    max_batch: int | None = None  # the largest batch one engine run takes (None: any); `run` splits larger ones
    _inputs: list[TensorSpec]  # set by each backend's constructor
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    asynchronous: bool = False  # `launch` returns before the outputs are ready

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""

    def launch(self, feeds: Mapping[str, np.ndarray]) -> PendingRun:
        """Hand one batch to the engine; `wait()` on the answer gives the outputs. Synchronous engines compute
        here. At most one run is in flight per engine: a launch waits for the one before it."""
        start = time.perf_counter()
        outputs = self.run(feeds)
        return Completed(outputs, RunTiming(start, time.perf_counter()))

    def prepare(self, samples: Iterable[Mapping[str, np.ndarray]]) -> None:
        """Get ready to take batches shaped like `samples` fast: each is run once (kernel selection, caches);
        an engine that captures CUDA graphs captures one per sample shape."""
        for sample in samples:
            self.run(sample)

    def close(self) -> None:
        """Release what the engine holds (sessions, device memory, contexts). Idempotent; the engine is
        unusable afterwards."""

    def batch_limit(self, wanted: int) -> int:
        """`wanted`, or the engine's own maximum batch when that is smaller: the size to chunk and pad to."""
        return wanted if self.max_batch is None else max(1, min(wanted, self.max_batch))

    def run_single(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a model that has exactly one input."""
        if len(self.inputs) != 1:
            raise EngineError(f"model has {len(self.inputs)} inputs; run_single needs exactly one")
        return self.run({self.inputs[0].name: batch})

    def check_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise EngineError naming the tensor when `shape` cannot feed input `name`."""
        spec = next((t for t in self.inputs if t.name == name), None)
        if spec is None:
            raise EngineError(f"model has no input named {name!r}; it has {[t.name for t in self.inputs]}")
        dims = spec.fixed_dims()
        if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise EngineError(f"input {name!r} takes shape {list(spec.shape)}, got {list(shape)}")
