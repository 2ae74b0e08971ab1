"""Where a stage runs model compute relative to its asyncio event loop.

A stage hands its executor a `launch` function that returns an `engines.Pending`; what differs is where the
launch and the wait happen:

- `inline`: both on the event loop itself. A stage that has its replica to itself loses nothing by it
  (the replica's control plane runs on Serve's own loop), and skips a thread hand-off per batch:
  measured on the 2-core CPU box, an in-replica MTCNN ran at in-process speed inline and ~5 ms slower on
  a worker thread; on the GPU machine, launch-bound CUDA code in a thread pool ran ~10x slower
  (../shared/ray-serve-notes.md).
- `thread`: both on one dedicated worker thread per stage. Where several stages share a process (layouts
  `colocated` and `ingress`), this is what lets host-bound engines overlap: ONNX Runtime and torch release
  the GIL while they compute.
- `async`: the launch on the event loop (an engine that replays a CUDA graph or enqueues a TensorRT engine
  only copies its input and enqueues: microseconds), the wait on a waiter thread that blocks in CUDA with the
  GIL released. Stages that share a process then launch one after another on the loop and compute together
  on their own streams, and no compute thread competes for the GIL.
- `auto`: `async` when the stage's engine launches asynchronously, else inline when the stage is alone in
  its process and a thread when it shares it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from engines import Pending, RunTiming

T = TypeVar("T")

MODES = ("inline", "thread", "async")


def resolve_mode(mode: str, shared: bool, asynchronous: bool) -> str:
    """The mode `auto` stands for, given whether the stage shares its process and its engine launches
    asynchronously."""
    if mode == "auto":
        return "async" if asynchronous else "thread" if shared else "inline"
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; use auto, {', '.join(MODES)}")
    return mode


class ComputeExecutor:
    def __init__(self, mode: str, shared: bool, name: str, asynchronous: bool = False) -> None:
        self.mode = resolve_mode(mode, shared, asynchronous)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{self.mode}") if self.mode != "inline" else None

    async def run(self, launch: Callable[..., Pending[T]], *args: object) -> tuple[T, float, RunTiming | None]:
        """Launch and wait for `launch(*args)`; returns its result, the time from launch to result in
        milliseconds, and the engine's own timing of the run (None where it has none)."""

        def both() -> tuple[T, float, RunTiming | None]:
            start = time.perf_counter()
            pending = launch(*args)
            result = pending.wait()
            return result, (time.perf_counter() - start) * 1e3, pending.timing

        if self.mode == "inline":
            return both()
        loop = asyncio.get_running_loop()
        if self.mode == "thread":
            return await loop.run_in_executor(self._pool, both)
        start = time.perf_counter()
        pending = launch(*args)
        result = pending.wait() if pending.done() else await loop.run_in_executor(self._pool, pending.wait)
        return result, (time.perf_counter() - start) * 1e3, pending.timing

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
