"""The ingress's side of the live streams: forwards the streams API to the `streams` deployment and relays what
streams back (a stream's records, every stream's feed, a video's records from a stream worker), following a
stream worker itself where one holds the stream. The HTTP routes over it: serve_app/routes/streams.py."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from serve_app.admission import ApiGate
from serve_app.clients import awaited
from serve_app.config import StreamsConfig
from serve_app.decoding import InputError
from serve_app.streams import StreamRefusal

logger = logging.getLogger("ray.serve")

_LOST = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)


async def _first(generator: Any, silent: str) -> Any:
    """A streaming call's first item, checked before any response starts: a refusal raises its HTTP error; no
    answer, a 503 that says `silent`."""
    try:
        first = await generator.__anext__()
    except _LOST as exc:
        raise InputError(503, "streams_unavailable", f"{silent} ({type(exc).__name__})") from exc
    if isinstance(first, StreamRefusal):
        raise first.error()
    return first


async def relay_first(generator: Any, who: str) -> AsyncIterator[dict[str, Any]]:
    """A video's records from a stream worker (relayed by the streams deployment): its first item (the opened
    video, or why not) is checked now; the rest follow, ending with an error line if `who` goes away."""
    await _first(generator, f"{who}: no answer")

    async def rest() -> AsyncIterator[dict[str, Any]]:
        try:
            async for record in generator:
                yield record
        except _LOST as exc:
            yield {"error": {"code": "worker_lost", "message": f"{who} stopped answering ({type(exc).__name__}); "
                             "the video ended"}}

    return rest()


async def _items(generator: Any) -> AsyncIterator[Any]:
    """A Ray actor's streaming call (an ObjectRefGenerator), item by item; cancelled on the worker's side when the
    caller leaves (its listener's slot is freed there)."""
    import ray

    try:
        async for ref in generator:
            yield await ref
    finally:
        ray.cancel(generator)


class _Ended:
    """What ended a relayed generator: nothing (its end), or the exception its reader gets after what came before."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Bounded:
    """`items` read as fast as they come and handed on as fast as the reader takes them, holding at most
    `capacity` records (`size(item)` each) between the two: a reader that falls behind loses the oldest, and the
    next item handed on is `lost_line(n)` first where that is given. The streams replica's streaming calls have no
    backpressure (Ray Serve's handles cannot set one), so without this a listener that stops reading would have
    this replica hold every record its stream makes for as long as it runs. Ends as `items` ends, raising what it
    raised after the items before it; closing it before then cancels `items` (a Serve call: the streams replica
    frees the listener)."""

    def __init__(self, items: AsyncIterator[Any], capacity: int, size: Callable[[Any], int] = lambda item: 1,
                 lost_line: Callable[[int], Any] | None = None) -> None:
        self._items, self._capacity, self._size, self._lost_line = items, capacity, size, lost_line
        self._queue: deque[Any] = deque()
        self._held = 0
        self._lost = 0  # records lost since the reader was last told
        self.pulled = 0  # items read from `items`
        self.lost = 0  # records lost in all
        self._finished = False  # `items` ended or raised: nothing to cancel

    async def _pump(self, ready: asyncio.Event) -> None:
        try:
            async for item in self._items:
                self.pulled += 1
                self._queue.append(item)
                self._held += self._size(item)
                while self._held > self._capacity and len(self._queue) > 1:  # the newest stays, whatever its size
                    dropped = self._size(self._queue.popleft())
                    self._held -= dropped
                    self._lost += dropped
                    self.lost += dropped
                ready.set()
            self._queue.append(_Ended())
        except Exception as exc:  # noqa: BLE001 - handed to the reader in its place
            self._queue.append(_Ended(exc))
        self._finished = True
        ready.set()

    async def __aiter__(self) -> AsyncIterator[Any]:
        ready = asyncio.Event()
        task = asyncio.ensure_future(self._pump(ready))
        try:
            while True:
                await ready.wait()
                ready.clear()
                while self._queue:
                    item = self._queue.popleft()
                    if isinstance(item, _Ended):
                        if item.error is not None:
                            raise item.error
                        return
                    self._held -= self._size(item)
                    if self._lost and self._lost_line is not None:
                        yield self._lost_line(self._lost)
                    self._lost = 0
                    yield item
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            cancel = getattr(self._items, "cancel", None)
            if cancel is not None and not self._finished:
                cancel()


def _records(item: Any) -> int:
    """Records in a feed's item (a list of records, or one line)."""
    return len(item) if isinstance(item, list) else 1


_FEED_DONE = object()  # a worker's feed ended (the worker is closing)
_FEED_AHEAD = 16  # items in flight between a worker's streaming call (records, or the feed's batches) and its reader


@dataclass(frozen=True)
class _WorkerLost:
    name: str
    why: str


class StreamsProxy:
    """The ingress's side of the streams deployment (None as the handle: streams are off). With stream workers
    (`config.workers.count`) a listener follows its stream's records from the worker that holds it."""

    def __init__(self, handle: Any | None, gate: ApiGate, config: StreamsConfig) -> None:
        self._handle = handle
        self._gate = gate  # start, list, get and stop are API requests; a listener is not
        self._workers = bool(config.workers.count)
        # what a listener may lag behind here, as at the streams replica: a stream's records, and every stream's
        self._buffer, self._feed_buffer = config.listener_buffer, config.listener_buffer * config.max_streams

    def _checked(self) -> Any:
        if self._handle is None:
            raise InputError(404, "streams_off", "live streams are off (ingress.streams.enabled: false)")
        return self._handle

    async def call(self, method: str, *args: Any) -> Any:
        try:
            async with self._gate.admit():
                # a client that goes away cancels the streams replica's work too (an open is aborted)
                answer = await awaited(getattr(self._checked(), method).remote(*args))
        except _LOST as exc:
            raise InputError(503, "streams_unavailable",
                             f"the streams deployment is not answering ({type(exc).__name__}); retry shortly") from exc
        if isinstance(answer, StreamRefusal):
            raise answer.error()
        return answer

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any]]:
        """The stream's records; the first item (its description, or why not) is checked before the response
        starts, so an unknown stream is a 404. If the streams replica goes away mid-stream, the records end with a
        summary of state `lost` naming the reason."""
        if self._workers:
            direct = await self._from_worker(stream_id)
            if direct is not None:
                return direct
        generator = self._checked().options(stream=True).events.remote(stream_id)
        first = await _first(generator, "the streams deployment is not answering")
        return self._relay(Bounded(generator, self._buffer), first)

    async def _from_worker(self, stream_id: str) -> AsyncIterator[dict[str, Any]] | None:
        """The records straight from the stream worker that holds the stream: every record crosses one process
        boundary fewer than through the streams replica (a Ray streaming hop costs about 1.5 ms of CPU a record on
        2 cores: bench/stream_hops.py). None where the streams replica does not name a live worker, or the worker does
        not answer before the first item: the streams replica answers then (a 404, a lost stream's summary)."""
        try:  # not through the API's gate: listeners are counted apart from API requests, and do not wait on them
            holder = await awaited(self._checked().holder.remote(stream_id))
        except _LOST:
            return None  # the streams replica's own answer follows (a 503)
        if holder is None:
            return None
        # at most _FEED_AHEAD records in flight: a listener that reads slowly loses the oldest at the worker (its
        # bounded queue), instead of this replica holding every record Ray streamed ahead
        items = _items(holder.events.options(num_returns="streaming",
                                             _generator_backpressure_num_objects=_FEED_AHEAD).remote(stream_id))
        try:
            first = await _first(items, "the stream worker is not answering")
        except InputError as exc:
            await items.aclose()
            if exc.code == "streams_unavailable":  # the worker went away: the streams replica says how it ended
                return None
            raise  # refused there (too many listeners): the client's 4xx
        return self._follow(items, first, stream_id)

    async def _follow(self, items: AsyncIterator[Any], described: dict[str, Any],
                      stream_id: str) -> AsyncIterator[dict[str, Any]]:
        """A worker's records; if it goes away mid-way, the streams replica's account of the stream follows (its
        summary of state `lost`, naming the worker), without a description: this listener had it first."""
        try:
            async for record in items:
                yield record
            return
        except _LOST as exc:
            logger.warning("stream %s: its worker stopped answering (%s)", stream_id, type(exc).__name__)
        finally:
            await items.aclose()
        generator = self._checked().options(stream=True).events.remote(stream_id)
        async for record in self._relay(Bounded(generator, self._buffer), described, skip_first=True):
            yield record

    async def feed(self) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]]]:
        """Every stream's records on one listener: first `{"streams": [...]}` (the running streams), then lists of
        records tagged with their stream's id. Checked before the response starts (a 429 beyond the listener
        limits). With stream workers, each worker's feed is followed from the worker itself; if one goes away,
        its streams' summaries (state `lost`) and an error line end the feed: the others' streams go on, and a
        new listener follows them."""
        holders = None
        if self._workers:
            try:
                holders = await awaited(self._checked().holders.remote())
            except _LOST as exc:
                raise InputError(503, "streams_unavailable", "the streams deployment is not answering "
                                 f"({type(exc).__name__}); retry shortly") from exc
        if holders is None:
            generator = self._checked().options(stream=True).feed.remote()
            first = await _first(generator, "the streams deployment is not answering")
            return self._relay_feed(Bounded(generator, self._feed_buffer, _records, lambda n: [{"lost": n}]), first)
        if not holders:  # every worker lost, none replaced yet: nothing to follow, as a start would be told
            raise InputError(503, "streams_unavailable", "every stream worker has stopped; retry shortly")
        # each worker runs at most _FEED_AHEAD batches ahead of this reader; beyond, its feed drops the oldest
        followed = [(name, _items(handle.feed.options(num_returns="streaming",
                                                      _generator_backpressure_num_objects=_FEED_AHEAD).remote()))
                    for name, handle in holders]
        running: list[dict[str, Any]] = []
        try:
            for name, items in followed:
                running += (await _first(items, f"stream worker {name} is not answering"))["streams"]
        except BaseException:
            await asyncio.gather(*(items.aclose() for _, items in followed), return_exceptions=True)
            raise
        return self._merged(followed, {"streams": running})

    async def _merged(self, followed: list[tuple[str, AsyncIterator[Any]]],
                      first: dict[str, Any]) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]]]:
        yield first
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=_FEED_AHEAD)  # a slow reader holds the workers back

        async def pump(name: str, items: AsyncIterator[Any]) -> None:
            try:
                async for batch in items:
                    await queue.put(batch)
                await queue.put(_FEED_DONE)
            except _LOST as exc:
                await queue.put(_WorkerLost(name, type(exc).__name__))

        pumps = [asyncio.ensure_future(pump(name, items)) for name, items in followed]
        try:
            done = 0
            while done < len(pumps):
                item = await queue.get()
                if item is _FEED_DONE:
                    done += 1
                elif isinstance(item, _WorkerLost):
                    for line in await self._lost_lines(item):
                        yield line
                    return
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*(items.aclose() for _, items in followed), return_exceptions=True)

    async def _lost_lines(self, lost: _WorkerLost) -> list[Any]:
        """The summaries of a lost worker's streams (the streams replica's account), then the feed's error line."""
        try:
            listed = await awaited(self._checked().list.remote())
        except _LOST:
            listed = []
        summaries = [{"stream": s["id"], "summary": s} for s in listed
                     if s.get("state") == "lost" and s.get("worker") == lost.name]
        error = {"error": {"code": "worker_lost", "message": f"stream worker {lost.name} stopped answering "
                           f"({lost.why}); its streams ended. The other workers' streams go on: listen again"}}
        return [summaries, error] if summaries else [error]

    async def _relay_feed(self, relayed: Bounded,
                          first: dict[str, Any]) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]]]:
        yield first
        try:
            async with aclosing(aiter(relayed)) as items:
                async for item in items:
                    yield item
        except _LOST as exc:
            yield {"error": {"code": "streams_unavailable", "message": f"the streams deployment stopped "
                             f"({type(exc).__name__}); its streams ended"}}

    async def _relay(self, relayed: Bounded, described: dict[str, Any],
                     skip_first: bool = False) -> AsyncIterator[dict[str, Any]]:
        try:
            async with aclosing(aiter(relayed)) as records:
                async for record in records:
                    if skip_first and "summary" not in record:  # the description the listener has had
                        skip_first = False
                        continue
                    skip_first = False
                    yield record
        except _LOST as exc:
            logger.warning("stream %s lost with the streams replica: %s", described["id"], type(exc).__name__)
            yield {"summary": {**described, "state": "lost",
                               "error": f"the streams deployment stopped ({type(exc).__name__}); the stream ended"}}
