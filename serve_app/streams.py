"""Live streams: a source (RTSP/HTTP URL, or a file in the media directory) read continuously, its latest
frame tracked and classified, the per-frame records published to whoever listens.

Nothing queues without bound: the reader keeps only the newest frame, so a source faster than the pipeline
loses frames (counted as `dropped`), and each listener has a bounded queue that loses its oldest records
when the listener reads too slowly, never the stream. A file is played at its own frame rate, as a camera
would deliver it. The registry lives in the `streams` deployment (serve_app/stream_service.py).

Sources are contained (`check_url`): a URL's host is resolved and every address it has must be public
(not loopback, private, link-local, multicast, reserved, or one of this host's own) unless the operator
lists it in `allowed_hosts`; FFmpeg is told not to follow HTTP redirects. Opening a source and reading from
it happen on the reader's own thread with FFmpeg's open and read timeouts, never on the event loop, and a
stream's slot under `max_streams` is taken before the open starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np

from serve_app.config import StreamsConfig
from serve_app.decoding import InputError

logger = logging.getLogger("ray.serve")

_END = None  # published when a stream ends
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
# FFmpeg options for network sources: no redirects (a public URL must not bounce to an internal one)
FFMPEG_OPTIONS = "max_redirects;0"


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


def own_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this host's interfaces."""
    import psutil

    found = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(address.address.split("%")[0]))
                except ValueError:
                    continue
    return found


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
              own: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str | None:
    """Why `address` is internal, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if address in own:
        return "one of this host's own"
    return None


def check_url(url: str, allowed_hosts: list[str], resolve: Callable[..., list[Any]] = socket.getaddrinfo) -> None:
    """Refuse (422) a URL whose host resolves to any internal address, unless the host or a network holding that
    address is in `allowed_hosts`. Blocking (name resolution): call it off the event loop."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise InputError(422, "invalid_source", f"source {url!r} names no host")
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError as exc:
        raise InputError(422, "invalid_source", f"source {url!r} has a bad port") from exc
    if host.lower() in {h.lower() for h in allowed_hosts if "/" not in h}:
        return
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(422, "source_unavailable", f"cannot resolve the host of {url!r}: {exc}") from exc
    networks = [ipaddress.ip_network(h, strict=False) for h in allowed_hosts if "/" in h]
    own = own_addresses()
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if any(address in network for network in networks):
            continue
        why = _internal(address, own)
        if why is not None:
            raise InputError(422, "source_not_allowed",
                             f"source {url!r} resolves to {address}, a {why} address; stream sources may only reach "
                             "public addresses unless ingress.streams.allowed_hosts lists the host or its network")


def resolve_source(source: str, config: StreamsConfig) -> tuple[str, bool]:
    """The URL or file path to open for `source` and whether it is a file, or a 422 saying why it is refused.
    URLs are checked for their scheme here; their addresses by `check_url`, off the event loop."""
    scheme = urlsplit(source).scheme.lower()
    if scheme:
        if scheme not in config.url_schemes:
            raise InputError(422, "invalid_source",
                             f"source scheme {scheme!r} is not allowed; allowed: {', '.join(config.url_schemes)}, "
                             "or a file name in the media directory")
        return source, False
    if config.media_dir is None:
        raise InputError(422, "invalid_source", "file sources are off: set ingress.streams.media_dir")
    root = Path(config.media_dir).resolve()
    path = (root / source).resolve()
    if not path.is_relative_to(root):
        raise InputError(422, "invalid_source", f"source {source!r} is outside the media directory")
    if not path.is_file():
        raise InputError(422, "invalid_source", f"no file {source!r} in the media directory")
    return str(path), True


def open_capture(target: str, is_file: bool, config: StreamsConfig) -> cv2.VideoCapture:
    """OpenCV's FFmpeg capture of `target`, with the open and read timeouts (blocking: off the event loop)."""
    timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(config.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(config.read_timeout_s * 1000)]
    if not is_file:
        # read by OpenCV when the capture is opened; this process is the streams replica's own
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_OPTIONS)
    return cv2.VideoCapture(target, cv2.CAP_FFMPEG, timeouts)


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
                ok, image = self._capture.read()  # returns within the read timeout
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
    skipped: int = 0  # frames the detector did not answer
    fps: float = 0.0
    tracks: int = 0
    listeners: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    reader: _Reader | None = None

    def describe(self) -> dict[str, Any]:
        reader = self.reader
        return {"id": self.id, "source": self.source, "state": self.state, "fps": round(self.fps, 2),
                "frames_read": reader.frames if reader else 0, "frames_processed": self.processed,
                "dropped_frames": reader.dropped if reader else 0, "skipped_frames": self.skipped,
                "tracks": self.tracks, **({"error": self.error} if self.error else {})}

    def publish(self, record: dict[str, Any] | None, capacity: int) -> None:
        for queue in self.listeners:
            if queue.qsize() >= capacity:  # a slow listener loses its oldest record, not the stream
                queue.get_nowait()
            queue.put_nowait(record)


class StreamRegistry:
    """Every stream of the deployment: start, list, listen, stop; ended ones are kept `keep_ended_s`."""

    def __init__(self, config: StreamsConfig, new_session: Callable[[float], Any],
                 on_frame: Callable[[LiveStream], None] = lambda stream: None,
                 on_end: Callable[[LiveStream], None] = lambda stream: None) -> None:
        self._config = config
        self._new_session = new_session  # fps (0: unknown) -> an object with `async process_frame(index, frame)`
        self._on_frame = on_frame  # after each processed frame (the metrics)
        self._on_end = on_end  # once a stream has ended and published its summary (drop its metrics)
        self._streams: dict[str, LiveStream] = {}
        self._ended: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()  # id -> (when, description)
        self._opening = 0  # slots taken by streams whose source is being opened

    def _running(self) -> int:
        return sum(s.state == "running" for s in self._streams.values())

    async def start(self, source: str) -> LiveStream:
        # the slot is taken before anything is awaited: concurrent starts cannot pass the limit together
        if self._running() + self._opening >= self._config.max_streams:
            raise InputError(429, "too_many_streams", f"{self._running() + self._opening} streams are running or "
                             f"starting; the limit is {self._config.max_streams} (ingress.streams.max_streams)")
        target, is_file = resolve_source(source, self._config)
        self._opening += 1
        try:
            capture = await asyncio.to_thread(self._open, target, is_file, source)
        finally:
            self._opening -= 1
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        stream = LiveStream(uuid.uuid4().hex[:12], source)
        stream.reader = _Reader(capture, fps if is_file and fps > 0 else None)  # a file plays at its own rate
        stream.task = asyncio.ensure_future(self._run(stream, fps))
        self._streams[stream.id] = stream
        logger.info("stream %s started from %s", stream.id, source)
        return stream

    def _open(self, target: str, is_file: bool, source: str) -> cv2.VideoCapture:
        """Check a URL's addresses, then open it (on a worker thread: both block)."""
        if not is_file:
            check_url(target, self._config.allowed_hosts)
        capture = open_capture(target, is_file, self._config)
        if not capture.isOpened():
            capture.release()
            raise InputError(422, "source_unavailable", f"cannot open {source!r}: FFmpeg could not read a video "
                             f"from it within {self._config.open_timeout_s:g} s")
        return capture

    async def _run(self, stream: LiveStream, fps: float) -> None:
        assert stream.reader is not None
        session = self._new_session(fps)
        started = time.perf_counter()
        answered_at = started  # the detector's last answer
        try:
            while stream.state == "running":
                frame = stream.reader.take()
                if frame is None:
                    if stream.reader.ended.is_set():
                        if stream.reader.frames == 0:
                            stream.state, stream.error = "failed", "the source gave no frame"
                        else:
                            stream.state = "ended"
                        break
                    await asyncio.sleep(0.005)
                    continue
                record = await session.process_frame(frame.index, frame.image)
                if "error" in record and record["error"]["code"] == "detector_unavailable":
                    stream.skipped += 1  # skip the frame; the next may find the detector back
                    stream.publish(record, self._config.listener_buffer)
                    if time.perf_counter() - answered_at > self._config.detector_outage_s:
                        stream.state, stream.error = "failed", record["error"]["message"]
                    continue
                answered_at = time.perf_counter()
                stream.processed += 1
                stream.tracks = session.track_count
                stream.fps = stream.processed / max(time.perf_counter() - started, 1e-9)
                stream.publish(record, self._config.listener_buffer)
                self._on_frame(stream)
        except Exception as exc:  # a broken stream ends with an error, it does not hang its listeners
            stream.state, stream.error = "failed", f"{type(exc).__name__}: {exc}"
            stream.publish({"error": {"code": "stream_failed", "message": stream.error}}, self._config.listener_buffer)
        finally:
            stream.reader.stop()
            stream.publish({"summary": {**stream.describe(), **session.summary()["summary"]}}, self._config.listener_buffer)
            stream.publish(_END, self._config.listener_buffer + 1)
            self._retire(stream)

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
            if stream.task is not None:
                await asyncio.wait([stream.task], timeout=10)
        return self.describe(stream_id)

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any]]:
        """The stream's records from now on, until it ends (then its summary)."""
        self._forget_old()
        if stream_id in self._ended:
            yield {"summary": self._ended[stream_id][1]}
            return
        stream = self.get(stream_id)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        stream.listeners.add(queue)
        try:
            while (record := await queue.get()) is not _END:
                yield record
        finally:
            stream.listeners.discard(queue)

    async def close(self) -> None:
        for stream_id in list(self._streams):
            await self.stop(stream_id)
