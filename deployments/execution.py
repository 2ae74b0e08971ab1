"""Where a stage runs model compute relative to its asyncio event loop.

- `inline`: on the event loop itself. A stage that has its replica to itself loses nothing by it
  (the replica's control plane runs on Serve's own loop), and skips a thread hand-off per batch:
  measured on the 2-core CPU box, an in-replica MTCNN ran at in-process speed inline and ~5 ms slower on
  a worker thread; on the GPU machine, launch-bound CUDA code in a thread pool ran ~10x slower
  (../shared/ray-serve-notes.md).
- `thread`: on one dedicated worker thread per stage. Where several stages share a process (layouts
  `colocated` and `ingress`), this is what lets them overlap: ONNX Runtime and torch release the GIL
  while they compute, and on a GPU each engine has its own CUDA stream.
- `auto`: inline when the stage is alone in its process, a thread when it shares it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ComputeExecutor:
    def __init__(self, mode: str, shared: bool, name: str) -> None:
        if mode == "auto":
            mode = "thread" if shared else "inline"
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
