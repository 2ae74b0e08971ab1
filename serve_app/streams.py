"""Live streams: a source (RTSP/HTTP URL, or a file in the media directory) read continuously, its latest
frame tracked and classified, the per-frame records published to whoever listens.

Nothing queues without bound: the reader keeps only the newest frame, so a source faster than the pipeline
loses frames (counted as `dropped`), and each listener has a bounded queue that loses its oldest records
when the listener reads too slowly, never the stream. A file is played at its own
frame rate, as a camera would deliver it. Streams live in the ingress replica that started them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np

from serve_app.config import StreamsConfig
from serve_app.decoding import InputError

logger = logging.getLogger("ray.serve")

_END = None  # published when a stream ends


def resolve_source(source: str, config: StreamsConfig) -> str:
    """The URL or file path to open for `source`, or a 422 saying why it is refused."""
    scheme = urlparse(source).scheme.lower()
    if scheme:
        if scheme not in config.url_schemes:
            raise InputError(422, "invalid_source",
                             f"source scheme {scheme!r} is not allowed; allowed: {', '.join(config.url_schemes)}, "
                             "or a file name in the media directory")
        return source
    if config.media_dir is None:
        raise InputError(422, "invalid_source", "file sources are off: set ingress.streams.media_dir")
    root = Path(config.media_dir).resolve()
    path = (root / source).resolve()
    if not path.is_relative_to(root):
        raise InputError(422, "invalid_source", f"source {source!r} is outside the media directory")
    if not path.is_file():
        raise InputError(422, "invalid_source", f"no file {source!r} in the media directory")
    return str(path)


@dataclass
class _Frame:
    index: int
    image: np.ndarray


class _Reader:
    """A thread that reads the source continuously and keeps only its newest frame."""

    def __init__(self, capture: cv2.VideoCapture, pace_fps: float | None) -> None:
        self._capture = capture
        self._pace = 1.0 / pace_fps if pace_fps else 0.0
        self._lock = threading.Lock()
        self._latest: _Frame | None = None
        self._stop = threading.Event()
        self.frames = 0
        self.dropped = 0
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.perf_counter()
        try:
            for index in itertools.count():
                if self._stop.is_set():
                    return
                ok, image = self._capture.read()
                if not ok or image is None:
                    return
                with self._lock:
                    if self._latest is not None:
                        self.dropped += 1  # the pipeline had not taken the previous frame
                    self._latest = _Frame(index, image)
                    self.frames += 1
                if self._pace:
                    next_at += self._pace
                    time.sleep(max(0.0, next_at - time.perf_counter()))
        finally:
            self.ended.set()
            self._capture.release()

    def take(self) -> _Frame | None:
        with self._lock:
            frame, self._latest = self._latest, None
            return frame

    def stop(self) -> None:
        self._stop.set()


@dataclass
class LiveStream:
    id: str
    source: str
    state: str = "running"  # running, ended, stopped, failed
    error: str | None = None
    processed: int = 0
    fps: float = 0.0
    tracks: int = 0
    listeners: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    reader: _Reader | None = None

    def describe(self) -> dict[str, Any]:
        reader = self.reader
        return {"id": self.id, "source": self.source, "state": self.state, "fps": round(self.fps, 2),
                "frames_read": reader.frames if reader else 0, "frames_processed": self.processed,
                "dropped_frames": reader.dropped if reader else 0, "tracks": self.tracks,
                **({"error": self.error} if self.error else {})}

    def publish(self, record: dict[str, Any] | None, capacity: int) -> None:
        for queue in self.listeners:
            if queue.qsize() >= capacity:  # a slow listener loses its oldest record, not the stream
                queue.get_nowait()
            queue.put_nowait(record)


class StreamRegistry:
    """The streams of this replica: start, list, listen, stop."""

    def __init__(self, config: StreamsConfig, new_session: Callable[[float], Any],
                 on_frame: Callable[[LiveStream], None] = lambda stream: None) -> None:
        self._config = config
        self._new_session = new_session  # fps (0: unknown) -> an object with `async process_frame(index, frame)`
        self._on_frame = on_frame  # after each processed frame (the metrics)
        self._streams: dict[str, LiveStream] = {}

    async def start(self, source: str) -> LiveStream:
        running = [s for s in self._streams.values() if s.state == "running"]
        if len(running) >= self._config.max_streams:
            raise InputError(429, "too_many_streams", f"{len(running)} streams are running; the limit is "
                             f"{self._config.max_streams} (ingress.streams.max_streams)")
        target = resolve_source(source, self._config)
        capture = await asyncio.to_thread(cv2.VideoCapture, target, cv2.CAP_FFMPEG)
        if not capture.isOpened():
            capture.release()
            raise InputError(422, "source_unavailable", f"cannot open {source!r}: FFmpeg could not read a video from it")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        is_file = not urlparse(source).scheme
        stream = LiveStream(uuid.uuid4().hex[:12], source)
        stream.reader = _Reader(capture, fps if is_file and fps > 0 else None)  # a file plays at its own rate
        stream.task = asyncio.ensure_future(self._run(stream, fps))
        self._streams[stream.id] = stream
        logger.info("stream %s started from %s", stream.id, source)
        return stream

    async def _run(self, stream: LiveStream, fps: float) -> None:
        assert stream.reader is not None
        session = self._new_session(fps)
        started = time.perf_counter()
        try:
            while stream.state == "running":
                frame = stream.reader.take()
                if frame is None:
                    if stream.reader.ended.is_set():
                        stream.state = "ended"
                        break
                    await asyncio.sleep(0.005)
                    continue
                record = await session.process_frame(frame.index, frame.image)
                stream.processed += 1
                stream.tracks = session.track_count
                stream.fps = stream.processed / max(time.perf_counter() - started, 1e-9)
                stream.publish(record, self._config.listener_buffer)
                self._on_frame(stream)
                if "error" in record:
                    stream.state, stream.error = "failed", record["error"]["message"]
        except Exception as exc:  # a broken stream ends with an error, it does not hang its listeners
            stream.state, stream.error = "failed", f"{type(exc).__name__}: {exc}"
            stream.publish({"error": {"code": "stream_failed", "message": stream.error}}, self._config.listener_buffer)
        finally:
            stream.reader.stop()
            stream.publish({"summary": {**stream.describe(), **session.summary()["summary"]}}, self._config.listener_buffer)
            stream.publish(_END, self._config.listener_buffer + 1)

    def list(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._streams.values()]

    def get(self, stream_id: str) -> LiveStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise InputError(404, "unknown_stream", f"no stream {stream_id!r} here")
        return stream

    async def stop(self, stream_id: str) -> dict[str, Any]:
        stream = self.get(stream_id)
        if stream.state == "running":
            stream.state = "stopped"
        if stream.task is not None:
            await asyncio.wait([stream.task], timeout=10)
        del self._streams[stream_id]
        return stream.describe()

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any]]:
        """The stream's records from now on, until it ends (then its summary)."""
        stream = self.get(stream_id)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        stream.listeners.add(queue)
        try:
            if stream.state != "running":
                yield {"summary": stream.describe()}
                return
            while (record := await queue.get()) is not _END:
                yield record
        finally:
            stream.listeners.discard(queue)

    async def close(self) -> None:
        for stream_id in list(self._streams):
            await self.stop(stream_id)
