"""The ingress's relay of a streaming call from the streams replica (serve_app/stream_relay.py `Bounded`), over a
real Ray Serve streaming call: Serve's handles give such calls no backpressure, so a listener that stops reading
must cost the relaying replica at most its buffer (the oldest records lost, and said), and one that leaves must
stop the call at its source."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from serve_app.stream_relay import Bounded


def _source() -> Any:
    from ray import serve

    @serve.deployment(max_ongoing_requests=8)
    class Source:
        """Records as fast as it can make them, counting what it made and whether its caller cancelled it."""

        def __init__(self) -> None:
            self.made = 0
            self.cancelled = 0

        async def records(self, count: int) -> AsyncIterator[dict[str, int]]:
            try:
                for index in range(count):
                    self.made += 1
                    yield {"frame": index}
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        def state(self) -> dict[str, int]:
            return {"made": self.made, "cancelled": self.cancelled}

    return Source.bind()


@pytest.fixture()
def source(serve_url: str) -> Iterator[Any]:
    from ray import serve

    handle = serve.run(_source(), name="relay_source", route_prefix=None)
    try:
        yield handle
    finally:
        serve.delete("relay_source")


async def _until(check: Any, what: str, seconds: float = 60) -> None:
    """Wait (bounded) for a state, letting the relay's pump run meanwhile."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def test_a_reader_that_stops_reading_costs_the_relay_its_buffer_and_is_told_what_it_lost(source: Any) -> None:
    total, capacity = 2000, 16

    async def scenario() -> tuple[list[Any], Bounded]:
        relay = Bounded(source.options(stream=True).records.remote(total), capacity,
                        lost_line=lambda n: {"lost": n})
        items = aiter(relay)
        got = [await anext(items)]
        # the reader pauses while the source makes every record and the relay takes them all in
        await _until(lambda: asyncio.sleep(0, relay.pulled == total), "the relay took in every record")
        got += [item async for item in items]
        return got, relay

    got, relay = asyncio.run(scenario())
    frames = [item["frame"] for item in got if "frame" in item]
    lost = [item["lost"] for item in got if "lost" in item]
    assert len(frames) <= 1 + capacity + 1, len(frames)  # the first, then at most the buffer (and the newest)
    assert lost and sum(lost) == relay.lost == total - len(frames)
    assert frames[0] == 0 and frames[-1] == total - 1 and frames == sorted(frames)  # the oldest lost, not the end


def test_a_reader_that_leaves_cancels_the_call_at_its_source(source: Any) -> None:
    async def scenario() -> dict[str, int]:
        relay = Bounded(source.options(stream=True).records.remote(10**9), 16)
        items = aiter(relay)
        for _ in range(3):
            await anext(items)
        await items.aclose()

        async def cancelled() -> bool:
            return (await source.state.remote())["cancelled"] == 1

        await _until(cancelled, "the source's call cancelled")
        return await source.state.remote()

    state = asyncio.run(scenario())
    assert state["cancelled"] == 1 and state["made"] < 10**9
