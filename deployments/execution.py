"""Where a replica runs model compute relative to its asyncio event loop.

Measured on the H100 (see ../shared/ray-serve-notes.md): GPU work in Serve's default thread pool
(sync `def` methods) ran ~10x slower than in one process, while `async def` methods that compute
on the event loop ran at in-process speed. On CPU, ONNX Runtime releases the GIL, so a single
dedicated worker thread keeps the event loop free to gather @serve.batch batches and answer
health checks while a batch computes. `auto` picks inline for CUDA and the thread for CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ComputeExecutor:
    def __init__(self, mode: str, device: str, name: str) -> None:
        if mode == "auto":
            mode = "inline" if device == "cuda" else "thread"
        if mode not in ("inline", "thread"):
            raise ValueError(f"unknown execution mode {mode!r}")
        self.mode = mode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute") if mode == "thread" else None

    async def run(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """Run fn(*args); returns its result and the compute time in milliseconds."""

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            result = fn(*args)
            return result, (time.perf_counter() - start) * 1e3

        if self._pool is None:
            return timed()
        return await asyncio.get_running_loop().run_in_executor(self._pool, timed)
