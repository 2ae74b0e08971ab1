"""The listener of every stream (serve_app/stream_feed.py `Feed`): records ready together leave together, a reader
that falls behind loses the oldest and is told how many, and the feed ends after what was queued."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.stream_feed import Feed


async def _take(feed: Feed, batches: int) -> list[list[dict[str, Any]]]:
    out = []
    async for batch in feed.batches():
        out.append(batch)
        if len(out) == batches:
            break
    return out


def test_records_published_in_one_loop_pass_leave_as_one_batch_tagged_with_their_streams() -> None:
    async def scenario() -> list[list[dict[str, Any]]]:
        feed = Feed(capacity=64)
        reading = asyncio.ensure_future(_take(feed, 2))
        await asyncio.sleep(0)  # the reader waits
        for stream in ("a", "b", "c"):  # a muxer batch's frames, finishing together
            feed.put(stream, {"frame": 7})
        await asyncio.sleep(0.01)
        feed.put("a", {"frame": 8})  # later: a batch of its own
        return await asyncio.wait_for(reading, 5)

    first, second = asyncio.run(scenario())
    assert first == [{"stream": "a", "frame": 7}, {"stream": "b", "frame": 7}, {"stream": "c", "frame": 7}]
    assert second == [{"stream": "a", "frame": 8}]


def test_a_reader_that_falls_behind_loses_the_oldest_records_and_is_told_how_many() -> None:
    async def scenario() -> list[list[dict[str, Any]]]:
        feed = Feed(capacity=3)
        for frame in range(5):  # nobody reads yet
            feed.put("a", {"frame": frame})
        return await asyncio.wait_for(_take(feed, 1), 5)

    (batch,) = asyncio.run(scenario())
    assert batch == [{"lost": 2}, *({"stream": "a", "frame": f} for f in (2, 3, 4))]


def test_an_ended_feed_gives_what_was_queued_then_stops_and_closing_releases_it_once() -> None:
    released = []

    async def scenario() -> list[list[dict[str, Any]]]:
        feed = Feed(capacity=8, on_close=lambda: released.append(1))
        feed.put("a", {"summary": {"state": "stopped"}})
        feed.end()
        feed.put("b", {"frame": 1})  # after the end: not queued
        batches = [batch async for batch in feed.batches()]
        feed.close()
        feed.close()
        return batches

    assert asyncio.run(scenario()) == [[{"stream": "a", "summary": {"state": "stopped"}}]]
    assert released == [1]


def test_a_listener_of_every_stream_counts_under_max_listeners_and_gives_its_place_back() -> None:
    from serve_app.config import StreamsConfig
    from serve_app.decoding import InputError
    from serve_app.streams import StreamRegistry

    async def scenario() -> None:
        registry = StreamRegistry(StreamsConfig(max_listeners=1), new_session=lambda fps: None)
        first = registry.feed()
        with pytest.raises(InputError) as refused:
            registry.feed()
        assert refused.value.status == 429 and refused.value.code == "too_many_listeners"
        assert registry.listening == 1
        first.close()
        assert registry.listening == 0
        registry.feed().close()  # the place is free again
        await registry.close()

    asyncio.run(scenario())
