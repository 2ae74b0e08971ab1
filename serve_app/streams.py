"""Live streams: a source (RTSP/HTTP URL, or a file in the media directory) read continuously, its latest frame
tracked and classified, the per-frame records published to whoever listens. The registry lives in the
`streams` deployment (serve_app/stream_service.py).

Nothing queues without bound: the reader keeps only the newest frame, so a source faster than the pipeline
loses frames (counted as `dropped`), and each listener has a bounded queue that loses its oldest records when
the listener reads too slowly, never the stream. Listeners are counted, per stream and in all.

A stream says what happens to it: frames that fail (the detector away, anything raised while processing one)
are counted with the last error, and the stream fails, with the reason, once none has succeeded for
`detector_outage_s`, when its source ends before any frame was processed, when the source goes silent for
`read_timeout_s`, breaks, or sends frames over `max_frame_pixels`, and when anything else ends its task.

Opening is bounded and cannot hold others up: a start takes a slot under `max_streams` before anything is
awaited, opens run concurrently (each on its reader's thread, with its open timeout), and a slot is given back
only when its open has returned, whatever happened to the client who asked; a client that goes away aborts its
open. Sources are contained: see serve_app/stream_sources.py and serve_app/egress.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import StreamsConfig
from serve_app.decoding import InputError
from serve_app.egress import FILE_OPTIONS, EgressLoop, Guard, guard_for
from serve_app.nvdec_reader import nvdec_refusal, nvdec_unavailable, reader_class
from serve_app.stream_feed import Feed
from serve_app.stream_reader import Opened, ReadFrame, StreamReader, redact_text
from serve_app.stream_sources import AddressPolicy, Source, parse_source

logger = logging.getLogger("ray.serve")

_END = None  # published when a stream ends


@dataclass(frozen=True)
class StreamRefusal:
    """Why the streams deployment refused a call: it crosses the handle as a value and becomes the HTTP error."""

    status: int
    code: str
    message: str

    @classmethod
    def of(cls, exc: InputError) -> StreamRefusal:
        return cls(exc.status, exc.code, exc.message)

    def error(self) -> InputError:
        return InputError(self.status, self.code, self.message)


def _error(code: str, message: str, frame: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, **({"frame": frame} if frame is not None else {})}


@dataclass
class LiveStream:
    id: str
    source: Source
    reader: StreamReader
    guard: Guard | None
    opened: Opened
    state: str = "running"  # running, ended, stopped, failed
    error: str | None = None  # why it failed
    processed: int = 0
    failed: int = 0  # frames whose processing failed (the detector away, or anything raised)
    last_error: dict[str, Any] | None = None  # the last frame failure, or what ended the stream
    fps: float = 0.0
    tracks: int = 0
    started_at: float = field(default_factory=time.monotonic)
    listeners: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)
    feeds: set[Feed] = field(default_factory=set)  # the process's listeners of every stream (the registry's set)
    task: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        reader = self.reader
        size = reader.size or (self.opened.width, self.opened.height)
        return {"id": self.id, "source": self.source.shown, "state": self.state, "fps": round(self.fps, 2),
                "frames_read": reader.frames, "frames_processed": self.processed, "dropped_frames": reader.dropped,
                "failed_frames": self.failed, "decode_errors": reader.decode_errors, "decoder": reader.decoder,
                "tracks": self.tracks,
                "image": {"width": size[0], "height": size[1]}, "size_changes": reader.size_changes,
                **({"last_error": self.last_error} if self.last_error else {}),
                **({"error": self.error} if self.error else {})}

    def fail(self, code: str, message: str) -> None:
        self.state, self.error, self.last_error = "failed", message, _error(code, message)

    def publish(self, record: dict[str, Any] | None, capacity: int) -> None:
        for queue in self.listeners:
            if queue.qsize() >= capacity:  # a slow listener loses its oldest record, not the stream
                queue.get_nowait()
            queue.put_nowait(record)
        if record is not _END:
            for feed in self.feeds:
                feed.put(self.id, record)


def in_source_pixels(record: dict[str, Any], frame: ReadFrame) -> dict[str, Any]:
    """A record of a frame processed at its working size, with the boxes in the source frame's pixels and that
    frame's own size (a source may change its resolution mid-stream)."""
    sx, sy = frame.scale
    if (sx, sy) != (1.0, 1.0):
        for obj in record.get("objects", []):
            x1, y1, x2, y2 = obj["box"]
            obj["box"] = [round(x1 / sx, 1), round(y1 / sy, 1), round(x2 / sx, 1), round(y2 / sy, 1)]
    return {**record, "image": {"width": frame.size[0], "height": frame.size[1]}, "read_at": round(frame.read_at, 3)}


@dataclass
class _Begun:
    """A frame taken from its reader, and its detection in flight (None: a frame the detector skips)."""

    frame: ReadFrame
    detecting: Any


class Listener:
    """One follower of a stream: its bounded queue, counted by the registry until `close()`."""

    def __init__(self, registry: StreamRegistry, stream: LiveStream | None, fixed: list[dict[str, Any]]) -> None:
        self._registry, self._stream, self._fixed = registry, stream, fixed
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        if stream is not None:
            stream.listeners.add(self._queue)

    async def records(self) -> AsyncIterator[dict[str, Any]]:
        for record in self._fixed:  # an ended stream: its summary
            yield record
        if self._stream is None:
            return
        while (record := await self._queue.get()) is not _END:
            yield record

    def close(self) -> None:
        if self._stream is not None and self._queue in self._stream.listeners:
            self._stream.listeners.discard(self._queue)
            self._registry._unlisten()


class _Opening:
    """A start in progress: what it made so far, so that a client who goes away can abort it."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.guard: Guard | None = None
        self.reader: StreamReader | None = None
        self.abandoned = False


class StreamRegistry:
    """Every stream of the deployment: start, list, listen, stop; ended ones are kept `keep_ended_s`."""

    def __init__(self, config: StreamsConfig, new_session: Callable[[float], Any], max_side: int = 0,
                 on_frame: Callable[[LiveStream], None] = lambda stream: None,
                 on_end: Callable[[LiveStream], None] = lambda stream: None,
                 policy: AddressPolicy | None = None, gpu_share: float | None = None,
                 frames_device: str | None = None) -> None:
        """`new_session`: fps (0: unknown) -> a session (serve_app/video_session.py `VideoSession`): `begin(frame,
        stream_id)` (a frame's detection started, frames in order), `async complete(index, frame, begun)` (its record),
        `track_count` and `summary()`; `max_side`: frames are scaled to it as they are decoded (the detector's working side);
        `gpu_share`: this process's share of a GPU, for NVDEC (default: the streams deployment's); `frames_device`:
        where the frames are kept as they are decoded (the device of the models in this process), None: the host."""
        self._config = config
        self._new_session = new_session
        self._max_side = max_side
        self._on_frame = on_frame  # after each processed frame (the metrics)
        self._on_end = on_end  # once a stream has ended and published its summary (drop its metrics)
        self._policy = policy or AddressPolicy(config.allowed_hosts)
        self._egress: EgressLoop | None = None  # started with the first network source
        self._streams: dict[str, LiveStream] = {}
        self._ended: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()  # id -> (when, description)
        self._opening = 0  # slots held by opens that have not returned
        self._listening = 0
        self._feeds: set[Feed] = set()  # listeners of every stream (GET /v1/events)
        self.frames_device = frames_device
        self._nvdec_unavailable = nvdec_refusal(config.decoder, "ingress.streams.decoder",
                                                lambda: nvdec_unavailable(config.deployment.num_gpus
                                                                          if gpu_share is None else gpu_share))

    @property
    def decoder(self) -> str:
        """Where this replica decodes streams' frames: `nvdec` or `ffmpeg`."""
        return "ffmpeg" if self._nvdec_unavailable else "nvdec"

    def running(self) -> int:
        """Streams running now (also the muxer's full batch)."""
        return sum(s.state == "running" for s in self._streams.values())

    @property
    def opening(self) -> int:
        return self._opening

    def held(self) -> list[str]:
        """The streams not yet retired (running, or stopping): each holds its slot under max_streams."""
        return list(self._streams)

    async def start(self, text: str) -> LiveStream:
        source = parse_source(text, self._config)
        # the slot is taken before anything is awaited: concurrent starts cannot pass the limit together
        if self.running() + self._opening >= self._config.max_streams:
            raise InputError(429, "too_many_streams", f"{self.running() + self._opening} streams are running or "
                             f"starting; the limit is {self._config.max_streams} (ingress.streams.max_streams)")
        self._opening += 1
        opening = _Opening(source)
        task = asyncio.ensure_future(self._open(opening))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read, should the client have gone
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            opening.abandoned = True  # the open goes on holding its slot until it returns; make it return now
            self._abort(opening)
            raise

    def _abort(self, opening: _Opening) -> None:
        """Make an open return now: stop its reader, close its guard (which fails the connection FFmpeg waits on).
        Not awaited: a caller being cancelled (a client gone) must not cancel the abort with it."""
        if opening.reader is not None:
            opening.reader.stop()
        if opening.guard is not None and self._egress is not None:
            self._egress.submit(opening.guard.close())

    async def _open(self, opening: _Opening) -> LiveStream:
        """Check, open, and register the stream; the slot is given back when this returns, however it ends."""
        source = opening.source
        try:
            if not source.is_file:  # an early, clear 422; the guard checks again at every connection
                await asyncio.to_thread(self._policy.addresses, source.host, source.port, f"source {source.shown}")
                self._egress = self._egress or EgressLoop()
                opening.guard = guard_for(source, self._policy, self._config.open_timeout_s)
                assert opening.guard is not None
                await self._egress.run(opening.guard.start())
            if opening.abandoned:
                raise asyncio.CancelledError
            loop = asyncio.get_running_loop()
            answered: asyncio.Future[Opened | InputError] = loop.create_future()

            def on_opened(result: Opened | InputError) -> None:  # on the reader's thread
                loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(result))

            guard = opening.guard
            reader = reader_class(self._config.decoder, self._nvdec_unavailable, source.is_file)
            opening.reader = reader(
                guard.reader_url() if guard else source.target, guard.reader_options() if guard else dict(FILE_OPTIONS),
                source.shown, open_timeout_s=self._config.open_timeout_s, read_timeout_s=self._config.read_timeout_s,
                max_frame_pixels=self._config.max_frame_pixels, max_side=self._max_side, pace=source.is_file,
                on_opened=on_opened, explain=lambda: guard.refusals[-1] if guard and guard.refusals else None,
                device=self.frames_device)
            result = await answered
            if isinstance(result, InputError):
                raise result
            if opening.abandoned:
                raise asyncio.CancelledError
            stream = LiveStream(uuid.uuid4().hex[:12], source, opening.reader, guard, result, feeds=self._feeds)
            self._streams[stream.id] = stream
            stream.task = asyncio.ensure_future(self._run(stream))
            logger.info("stream %s started from %s (%dx%d %s, %.3g fps)", stream.id, source.shown, result.width,
                        result.height, result.codec, result.fps)
            return stream
        except BaseException:
            self._abort(opening)
            raise
        finally:
            self._opening -= 1

    async def _run(self, stream: LiveStream) -> None:
        """Each frame the intake began (`_intake`: its detection in flight), in order: tracked, classified and
        published; until the intake's end (the source ended or went silent, the stream stopped) or a failure."""
        session = None
        begun: asyncio.Queue[_Begun | Callable[[], None]] = asyncio.Queue()
        intake: asyncio.Task[None] | None = None
        started = time.perf_counter()
        succeeded_at = time.monotonic()  # the last frame that went through (or the start)
        cfg = self._config
        try:
            session = self._new_session(stream.opened.fps)
            slots = asyncio.Semaphore(cfg.detect_ahead + 1)  # frames begun and not yet published
            intake = asyncio.ensure_future(self._intake(stream, session, begun, slots))
            while stream.state == "running":
                item = await begun.get()
                if not isinstance(item, _Begun):
                    item()  # how the stream ends, once the frames before it are through
                    break
                frame = item.frame
                try:
                    record = await session.complete(frame.index, frame.image, item.detecting)
                except Exception as exc:  # noqa: BLE001 - a frame that fails is counted; failing ones end the stream
                    record = {"error": _error("frame_failed", f"{type(exc).__name__}: {redact_text(str(exc))}",
                                              frame.index)}
                finally:
                    slots.release()
                if "error" in record:
                    stream.failed += 1
                    stream.last_error = record["error"]
                    stream.publish(record, cfg.listener_buffer)
                    if time.monotonic() - succeeded_at > cfg.detector_outage_s:
                        stream.fail(record["error"]["code"], f"no frame went through for {cfg.detector_outage_s:g} s "
                                    f"(ingress.streams.detector_outage_s); the last failure: "
                                    f"{record['error']['message']}")
                    continue
                succeeded_at = time.monotonic()
                stream.processed += 1
                stream.tracks = session.track_count
                stream.fps = stream.processed / max(time.perf_counter() - started, 1e-9)
                stream.publish(in_source_pixels(record, frame), cfg.listener_buffer)
                self._on_frame(stream)
        except Exception as exc:  # noqa: BLE001 - a broken stream ends with an error, it does not hang its listeners
            stream.fail("stream_failed", f"{type(exc).__name__}: {redact_text(str(exc))}")
            logger.warning("stream %s failed: %s", stream.id, stream.error)
        finally:
            if intake is not None:
                intake.cancel()
            while not begun.empty():  # begun, never to be completed: their detections are not waited for
                if isinstance(item := begun.get_nowait(), _Begun) and item.detecting is not None:
                    item.detecting.cancel()
            await self._release(stream)
            if stream.state == "failed":
                stream.publish({"error": stream.last_error}, cfg.listener_buffer)
            summary = session.summary()["summary"] if session is not None else {}
            stream.publish({"summary": {**stream.describe(), **summary}}, cfg.listener_buffer)
            stream.publish(_END, cfg.listener_buffer + 2)
            self._retire(stream)

    async def _intake(self, stream: LiveStream, session: Any, begun: asyncio.Queue[_Begun | Callable[[], None]],
                      slots: asyncio.Semaphore) -> None:
        """The stream's frames into the pipeline: the newest frame read, its detection begun at once
        (`session.begin`), up to `detect_ahead` frames ahead of the one being tracked and classified (DeepStream's
        elements run concurrently too), so that a stream's frames meet other streams' at the detector while its
        earlier frame is classified. Last, what ends the stream: the source ended or went silent, or it stopped."""
        try:
            await self._take_frames(stream, session, begun, slots)
        except Exception as exc:  # noqa: BLE001 - the stream ends saying why; its listeners are not left waiting
            message = f"{type(exc).__name__}: {redact_text(str(exc))}"
            begun.put_nowait(lambda: stream.fail("stream_failed", message))

    async def _take_frames(self, stream: LiveStream, session: Any, begun: asyncio.Queue[_Begun | Callable[[], None]],
                           slots: asyncio.Semaphore) -> None:
        cfg = self._config
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()  # the reader's signal: a frame, or the end (no polling: it cost a wake-up per 5 ms)

        def wake() -> None:  # on the reader's thread
            with contextlib.suppress(RuntimeError):  # the loop has closed (the process is stopping)
                loop.call_soon_threadsafe(arrived.set)

        stream.reader.arrived = wake
        while stream.state == "running":
            await slots.acquire()
            while True:
                arrived.clear()  # before the take: a frame kept after it sets it again
                if (frame := stream.reader.take()) is not None:
                    break
                if stream.state != "running":
                    begun.put_nowait(lambda: None)
                    return
                if stream.reader.ended.is_set():
                    begun.put_nowait(lambda: self._ended_reading(stream))
                    return
                silent = time.monotonic() - max(stream.reader.last_frame_at, stream.started_at)
                if silent > cfg.read_timeout_s:
                    begun.put_nowait(lambda: stream.fail(
                        "source_silent", f"no frame from {stream.source.shown} for {silent:.1f} s "
                        f"(ingress.streams.read_timeout_s: {cfg.read_timeout_s:g})"))
                    return
                with contextlib.suppress(TimeoutError):  # a stop, or the source's silence, is seen within 0.1 s
                    async with asyncio.timeout(0.1):
                        await arrived.wait()
            begun.put_nowait(_Begun(frame, session.begin(frame.image, stream.id)))
        begun.put_nowait(lambda: None)

    def _ended_reading(self, stream: LiveStream) -> None:
        """The reader stopped on its own: the stream ends, or fails saying why."""
        reader = stream.reader
        if reader.error is not None:
            stream.fail(reader.error.code, reader.error.message)
        elif reader.frames == 0:
            stream.fail("no_frame", f"{stream.source.shown} gave no frame")
        elif stream.processed == 0 and stream.failed:
            assert stream.last_error is not None
            stream.fail(stream.last_error["code"],
                        f"the source ended and none of its {stream.failed} frames went through; the last failure: "
                        f"{stream.last_error['message']}")
        else:
            stream.state = "ended"

    async def _release(self, stream: LiveStream) -> None:
        """Stop reading the source: the reader, and the guard (which ends a read the reader is blocked in)."""
        stream.reader.stop()
        if stream.guard is not None and self._egress is not None:
            await self._egress.run(stream.guard.close())

    def _retire(self, stream: LiveStream) -> None:
        """An ended stream leaves the registry; its final description answers GET and DELETE a while."""
        if self._streams.pop(stream.id, None) is not None:
            self._ended[stream.id] = (time.monotonic(), stream.describe())
            self._on_end(stream)
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self._config.keep_ended_s
        while self._ended and (next(iter(self._ended.values()))[0] < horizon or len(self._ended) > 256):
            self._ended.popitem(last=False)

    def list(self) -> list[dict[str, Any]]:
        self._forget_old()
        return [s.describe() for s in self._streams.values()] + [d for _, d in self._ended.values()]

    def get(self, stream_id: str) -> LiveStream:
        """A running stream (404 for any other id)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise InputError(404, "unknown_stream", f"no stream {stream_id!r} is running")
        return stream

    def describe(self, stream_id: str) -> dict[str, Any]:
        """A running stream's description, or an ended one's final description while it is kept."""
        self._forget_old()
        if stream_id in self._ended:
            return self._ended[stream_id][1]
        stream = self._streams.get(stream_id)
        if stream is None:
            raise InputError(404, "unknown_stream", f"no stream {stream_id!r} here")
        return stream.describe()

    async def stop(self, stream_id: str) -> dict[str, Any]:
        """Stop a stream and give its final description; idempotent (a stream already stopped or ended answers
        with its final description while it is kept)."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.state == "running":
                stream.state = "stopped"
            await self._release(stream)
            if stream.task is not None:
                await asyncio.wait([stream.task], timeout=10)
        return self.describe(stream_id)

    def listen(self, stream_id: str) -> Listener:
        """A listener of the stream's records from now on, until it ends (then its summary); a 429 beyond the
        listener limits. The caller closes it (`Listener.close`), whether or not it read anything."""
        self._forget_old()
        if stream_id in self._ended:
            return Listener(self, None, [{"summary": self._ended[stream_id][1]}])
        stream = self.get(stream_id)
        cfg = self._config
        self._check_listening()
        if len(stream.listeners) >= cfg.max_listeners_per_stream:
            raise InputError(429, "too_many_listeners", f"stream {stream_id} has {len(stream.listeners)} listeners; "
                             f"the limit is {cfg.max_listeners_per_stream} (ingress.streams.max_listeners_per_stream)")
        self._listening += 1
        return Listener(self, stream, [])

    def feed(self) -> Feed:
        """A listener of every stream's records from now on (serve_app/stream_feed.py), counted under
        `max_listeners` like any listener; a 429 beyond it. The caller closes it."""
        cfg = self._config
        self._check_listening()
        self._listening += 1
        feed = Feed(cfg.listener_buffer * cfg.max_streams, on_close=lambda: self._unfeed(feed))
        self._feeds.add(feed)
        return feed

    def _check_listening(self) -> None:
        """A 429 where listeners of all streams, per-stream ones and feeds alike, are at `max_listeners`."""
        if self._listening >= self._config.max_listeners:
            raise InputError(429, "too_many_listeners", f"{self._listening} listeners are following streams; the "
                             f"limit is {self._config.max_listeners} (ingress.streams.max_listeners)")

    def _unfeed(self, feed: Feed) -> None:
        self._feeds.discard(feed)
        self._unlisten()

    def _unlisten(self) -> None:
        self._listening -= 1

    @property
    def listening(self) -> int:
        return self._listening

    async def close(self) -> None:
        for stream_id in list(self._streams):
            await self.stop(stream_id)
        for feed in list(self._feeds):  # after the streams' summaries
            feed.end()
        if self._egress is not None:
            self._egress.close()
