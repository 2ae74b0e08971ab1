"""One listener for every stream of a process (`GET /v1/events`), as DeepStream's message broker gives
one consumer the metadata of all its sources.

A per-stream listener costs a Ray object, an await and an HTTP chunk for every frame (about 1 ms of CPU a hop on
the GPU host: docs/benchmarks.md); a feed takes the records of all streams that are ready at once, the frames of
one muxer batch finish together, and hands them over as one list: one object, one chunk for the lot. No record
waits for company: a feed never lingers, it hands over what is there whenever its reader asks.

Nothing queues without bound: a feed holds at most `capacity` records and, like a per-stream listener, a reader
that falls behind loses the oldest, never a stream; the next batch starts with a `{"lost": n}` line saying how
many.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any


class Feed:
    """The records of every stream, tagged with the stream's id, in batches. `close()` ends `batches()` once what
    is queued has been read; `on_close` runs once, however the feed ends (the registry's listener count)."""

    def __init__(self, capacity: int, on_close: Callable[[], None] = lambda: None) -> None:
        self._queue: deque[dict[str, Any]] = deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        self._ended = False
        self._released = False
        self._on_close = on_close
        self._lost = 0  # records dropped because the reader fell behind, since the last batch said so

    def put(self, stream_id: str, record: dict[str, Any]) -> None:
        if self._ended:
            return
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self._lost += 1
        self._queue.append({"stream": stream_id, **record})
        self._ready.set()

    def end(self) -> None:
        """No more records (the process's streams are closing): the reader gets what is queued, then the end."""
        self._ended = True
        self._ready.set()

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """What is queued, each time some is: at least one record a batch."""
        while True:
            await self._ready.wait()
            await asyncio.sleep(0)  # the other streams' records of the same batch, finishing in this loop pass
            self._ready.clear()
            batch = list(self._queue)
            self._queue.clear()
            if self._lost:
                batch.insert(0, {"lost": self._lost})
                self._lost = 0
            if batch:
                yield batch
            if self._ended and not self._queue:
                return

    def close(self) -> None:
        self._ended = True
        self._queue.clear()
        if not self._released:
            self._released = True
            self._on_close()
