"""A bound on the decoded image memory one replica holds at once, counted in pixels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

# Above this many pixels an image's decode or resize (tens of milliseconds, a second for 36 Mpx) runs on a
# thread in every replica, off its event loop: the replica's other requests go on meanwhile.
LARGE_PIXELS = 4_000_000


class PixelBudget:
    """At most `capacity` pixels of decoded frames at once; a request that would pass it waits for its turn
    (first come, first served), so a burst of huge images queues instead of growing the replica without bound."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pixel budget needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self._changed: asyncio.Condition | None = None  # made in the replica's event loop, on first use

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(max(pixels, 0), self.capacity)
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            await changed.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            async with changed:
                self.used -= pixels
                changed.notify_all()
