"""Where the ingress and the streams deployment run their own CPU work (image decode, crops, annotation, video
file writes and frame decodes, MP4 encodes, the tracker): on the event loop, or on a small thread pool so that
one request's CPU work does not hold every other request behind it (`ingress.cpu_work`)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from deployments.budget import LARGE_PIXELS

T = TypeVar("T")


class CpuWork:
    def __init__(self, where: str, threads: int = 4) -> None:
        if where not in ("loop", "threads"):
            raise ValueError(f"cpu work runs on 'loop' or 'threads', not {where!r}")
        self.where = where
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cpu-work") if where == "threads" else None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._pool is None:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def run_large(self, pixels: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`run`, except that work on a large image (over LARGE_PIXELS) always leaves the event loop: decoding
        a 36 Mpx PNG takes a second, and every other request of the replica would wait behind it."""
        if self._pool is None and pixels > LARGE_PIXELS:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


INLINE = CpuWork("loop")  # for callers that have no replica of their own (the benchmark's in-process pipeline)
