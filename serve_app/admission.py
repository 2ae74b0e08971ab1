"""The ingress's capacity for API requests, counted apart from live stream listeners.

Each `/v1/streams/{id}/events` listener holds one of the ingress replica's ongoing requests for as long as it
listens. Counted together, 32 listeners took every slot (`max_ongoing_requests`), and `/v1/infer` and the stream
routes stopped answering while `/healthz` still said 200. So the replica is given room for the listeners on top
of its configured capacity (serve_app/app.py), and the API's own requests pass this gate, which admits as many
at once as `ingress.deployment.max_ongoing_requests` says; more wait their turn here, first come first served,
as Serve would have queued them. `/healthz` passes the gate too: when no slot frees within its wait, the API is
not answering and health says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ApiGate:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the API needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self._slots: asyncio.Semaphore | None = None  # made on the replica's loop, on first use
        self.waiting = 0

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.capacity)
        return self._slots

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        slots = self._semaphore()
        self.waiting += 1
        try:
            await slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            slots.release()

    async def saturated(self, wait_s: float) -> str | None:
        """None if an API request would be admitted within `wait_s`, else why not (for /healthz)."""
        try:
            async with asyncio.timeout(wait_s):
                async with self.admit():
                    return None
        except TimeoutError:
            return (f"the API is saturated: its {self.capacity} request slots stayed busy for {wait_s:g} s "
                    f"({self.waiting} requests waiting)")
