"""Cross-request batching that never waits: a batch runs as soon as the engine is free.

`@serve.batch` holds every call for `batch_wait_timeout_s` hoping for company, so at low load each
call pays the wait and gains nothing (measured: a 2 ms wait made a bare hop 1.4 -> 4.0 ms). Here a
call that finds the engine idle runs at once, alone; calls that arrive while a batch computes
queue and go together in the next batch, up to `max_batch_size` items. Under load batches form by
themselves (like Triton's dynamic batcher with no queue delay), at no latency cost when idle.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from deployments.execution import ComputeExecutor
from engines import Pending, RunTiming

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One call's result, with where its time went."""

    result: R
    queue_ms: float  # from submit to the start of the batch it rode in
    compute_ms: float  # that batch's compute time (launch to result)
    batch_size: int  # items (e.g. crops) in that batch
    timing: RunTiming | None = None  # the engine's own timing of that batch (launch, enqueue, GPU start and end)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    size: int
    future: asyncio.Future[Batched[R]]
    enqueued: float
    source: Hashable | None = None  # whose item it is (the muxer's stream); None: its own


def _settle(batch: list[_Pending[T, R]], results: Sequence[R], started: float, compute_ms: float, size: int,
            timing: RunTiming | None = None) -> None:
    """Each waiting caller gets its own result (callers that gave up are skipped)."""
    for entry, result in zip(batch, results):
        if not entry.future.done():
            entry.future.set_result(Batched(result, (started - entry.enqueued) * 1e3, compute_ms, size, timing))


def _fail(batch: list[_Pending[T, R]], exc: Exception) -> None:
    for entry in batch:
        if not entry.future.done():
            entry.future.set_exception(exc)


class GreedyBatcher(Generic[T, R]):
    """Runs `run_batch(items) -> Pending[results]` (one result per item, in order) on `executor`.

    Items are sized by `size_of` (crops in a chunk, say); a batch holds up to `max_batch_size`
    units, and always at least one item. One batch computes at a time per batcher.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Pending[Sequence[R]]],
        executor: ComputeExecutor,
        max_batch_size: int,
        size_of: Callable[[T], int] = lambda _: 1,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run_batch = run_batch
        self._executor = executor
        self._max = max_batch_size
        self._size_of = size_of
        self._on_batch = on_batch  # (batch size, compute ms), called on the event loop once per batch
        self._pending: deque[_Pending[T, R]] = deque()
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, item: T) -> Batched[R]:
        loop = asyncio.get_running_loop()
        entry = _Pending(item, self._size_of(item), loop.create_future(), time.perf_counter())
        self._pending.append(entry)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await entry.future

    def _take(self) -> list[_Pending[T, R]]:
        batch = [self._pending.popleft()]
        total = batch[0].size
        while self._pending and total + self._pending[0].size <= self._max:
            entry = self._pending.popleft()
            total += entry.size
            batch.append(entry)
        return [e for e in batch if not e.future.done()]  # callers that gave up (timeout) are dropped

    async def _drain(self) -> None:
        while self._pending:
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results, compute_ms, timing = await self._executor.run(self._run_batch, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function gave {len(results)} results for {len(batch)} items")
            except Exception as exc:  # the whole batch shares the failure; the batcher lives on
                _fail(batch, exc)
                continue
            size = sum(e.size for e in batch)
            if self._on_batch is not None:
                self._on_batch(size, compute_ms)
            _settle(batch, results, started, compute_ms, size, timing)
            await asyncio.sleep(0)  # let calls that arrived during the compute join the next batch


class Muxer(Generic[T, R]):
    """nvstreammux's rule for work that is itself awaited (a handle call carrying a batch of frames): a batch goes
    when it holds items of `full()` sources (the streams that are live, say; at most `max_batch_size` items; an
    item submitted without a source counts as one of its own) or when its oldest item has waited `push_timeout_s`
    (nvstreammux's batched-push-timeout; 0: at once, with whatever queued while the previous batch was out). Two
    frames of one stream (detected ahead) count once, so they do not fill a batch that waits for the others. Up to
    `in_flight` batches are out at a time (1: the next fills once the last is back; 2: the next fills and goes
    while the last is out, so the detector starts it as soon as it is free, not after the last one's results have
    come back through the event loop). `run_batch(items)` returns one result per item, in order; a failure fails
    every item of its batch, and the muxer lives on."""

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[Sequence[R]]], max_batch_size: int,
                 push_timeout_s: float, full: Callable[[], int] | None = None, in_flight: int = 1) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._run_batch = run_batch
        self._max = max_batch_size
        self._timeout = push_timeout_s
        self._full = full or (lambda: max_batch_size)
        self._pending: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(in_flight)
        self._out: set[asyncio.Task[None]] = set()  # batches out (held: the loop keeps only weak references)
        self.in_flight = in_flight
        self.batches = 0
        self.items = 0
        self.largest = 0
        # where a batch's cycle goes: filling it while a slot was free (the detector waiting for frames, with one
        # batch out), and its run
        self.waited_s = 0.0
        self.ran_s = 0.0

    async def submit(self, item: T, source: Hashable | None = None) -> R:
        loop = asyncio.get_running_loop()
        entry: _Pending[T, R] = _Pending(item, 1, loop.create_future(), time.perf_counter(), source)
        self._pending.append(entry)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return (await entry.future).result

    def _target(self) -> int:
        return max(1, min(self._full(), self._max))

    def _ready(self) -> bool:
        """Full: items of `_target()` sources, or `max_batch_size` items."""
        if len(self._pending) >= self._max:
            return True
        sources = {id(e) if e.source is None else e.source for e in self._pending}
        return len(sources) >= self._target()

    async def _drain(self) -> None:
        while self._pending:
            await self._slots.acquire()  # a batch may go out: it fills from now
            free = time.perf_counter()
            try:
                deadline = self._pending[0].enqueued + self._timeout if self._pending else free
                while not self._ready() and (left := deadline - time.perf_counter()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
                batch = [self._pending.popleft() for _ in range(min(self._max, len(self._pending)))]
                batch = [e for e in batch if not e.future.done()]  # callers that gave up
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            started = time.perf_counter()
            self.waited_s += started - max(free, batch[0].enqueued)
            task = asyncio.get_running_loop().create_task(self._send(batch, started))
            self._out.add(task)
            task.add_done_callback(self._out.discard)

    async def _send(self, batch: list[_Pending[T, R]], started: float) -> None:
        try:
            results = await self._run_batch([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function gave {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - the batch shares the failure
            _fail(batch, exc)
            return
        finally:
            self._slots.release()
        self.batches += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        ran = time.perf_counter() - started
        self.ran_s += ran
        _settle(batch, results, started, ran * 1e3, len(batch))
