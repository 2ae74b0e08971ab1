"""One live stream's reader: a thread that opens the source with FFmpeg (PyAV), decodes it, scales each frame to
the detector's working size as it is decoded, and keeps only the newest frame.

PyAV, not OpenCV's capture: OpenCV opens one capture at a time per process (a global lock around FFmpeg's
open), so one silent source held every other stream's start for its whole open timeout; PyAV opens concurrently,
takes FFmpeg's options per source (the egress guard's proxy, the protocols a source may use), reports each
frame's own size, scales while converting (a 4K frame never exists in BGR), and keeps FFmpeg's log quiet.

Memory is bounded: frames over `max_frame_pixels` (declared at the open, or met later) end the stream; decoding
uses two threads; the reader holds one scaled frame; the decoder's buffers go when the stream ends, and the
process gives freed memory back to the system then (glibc's malloc_trim).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from engines.image import Scale
from serve_app.decoding import InputError
from serve_app.stream_sources import redact

if TYPE_CHECKING:
    import av

logger = logging.getLogger("ray.serve")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")
_DECODE_ERRORS_IN_A_ROW = 250  # a source whose packets all fail to decode for this long is broken, not glitching


def redact_text(text: str) -> str:
    """A message with every URL in it redacted (FFmpeg's errors quote the URL they opened, credentials and all)."""
    return _URL.sub(lambda m: redact(m.group()), text)


@dataclass(frozen=True)
class Opened:
    """What the source said at the open."""

    fps: float  # 0: unknown
    width: int
    height: int
    codec: str


@dataclass(frozen=True)
class ReadFrame:
    index: int  # frames decoded before this one
    image: Any  # BGR (H, W, 3) uint8, scaled to the working size: numpy, or a torch tensor on the reader's `device`
    size: tuple[int, int]  # the source frame's (width, height)
    scale: Scale  # pixels of `image` per pixel of the source frame, (x, y)
    read_at: float  # time.time() when it was decoded


# a display matrix's rotation (FFmpeg's counter-clockwise degrees, as PyAV's VideoFrame.rotation gives it) -> the
# turn that shows the frame upright: what OpenCV's capture does for /v1/video (CAP_PROP_ORIENTATION_AUTO)
_UPRIGHT = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


_QUARTER_TURNS = {90: 1, 180: 2, 270: 3}  # the same turns as counter-clockwise quarter turns (torch.rot90)


def upright(image: Any, rotation: float) -> Any:
    """`image` turned as its stream's display matrix says (a phone video stored on its side): a numpy frame by
    OpenCV, a torch one where it is (on its device)."""
    degrees = round(rotation) % 360
    if degrees not in _UPRIGHT:
        return image
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(cv2.rotate(image, _UPRIGHT[degrees]))
    import torch

    return torch.rot90(image, _QUARTER_TURNS[degrees], dims=(0, 1)).contiguous()


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size a frame is scaled to: its longer side at most `max_side` (0: as it is), each side even for the
    scaler and at least 2."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    factor = max_side / max(width, height)
    return max(2, round(width * factor)), max(2, round(height * factor))


class Pacer:
    """A file played at its own rate, as a camera sends it: each frame is let through when as much time has passed
    since the first frame as the source's timestamps say. The clock starts at the first frame, not at the open:
    the first decode (a decoder made, the first captures of a new size) may take a second, and a clock started
    earlier made every stream read a second of frames at once after it, all but the newest dropped. A frame that
    is late (the reader stalled) goes at once: the backlog is caught up, as a camera's buffered frames arrive. A
    frame due more than `max_gap_s` from now either way (a timestamp that jumps: a cut, a wrap, a broken or
    hostile file; a stall that long) restarts the clock at that frame, instead of holding the reader for the gap
    or reading unpaced until the timestamps catch up. `sleep` returns early at a stop (an Event's `wait`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], object] = time.sleep, max_gap_s: float = 2.0) -> None:
        self._clock, self._sleep, self._max_gap = clock, sleep, max_gap_s
        self._first: tuple[float, float] | None = None  # (a frame's time in the source, when it went): the anchor

    def wait(self, at: float) -> None:
        """Block until the frame at `at` seconds in the source is due."""
        now = self._clock()
        if self._first is not None:
            origin, started = self._first
            due = started + at - origin - now
            if -self._max_gap <= due <= self._max_gap:
                self._sleep(max(0.0, due))
                return
        self._first = (at, now)  # the first frame, or one after a jump: the clock starts here


def _trim_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: a 4K stream's buffers stayed for minutes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class StreamReader:
    """Opens `url` on its own thread; `on_opened` gets an `Opened` or the InputError that explains the failure
    (called on that thread, once). Then decodes until the source ends, fails, or `stop()`; `take()` hands out
    the newest frame. `error` says why reading ended if it did not end cleanly."""

    decoder = "ffmpeg"  # where its frames are decoded (GET /v1/streams/{id})

    def __init__(self, url: str, options: dict[str, str], shown: str, *, open_timeout_s: float,
                 read_timeout_s: float, max_frame_pixels: int, max_side: int, pace: bool,
                 on_opened: Callable[[Opened | InputError], None],
                 explain: Callable[[], InputError | None] = lambda: None, device: str | None = None) -> None:
        """`shown`: the source as messages name it; `pace`: play at the source's own rate (a file); `explain`: why
        the open failed, when something else knows better than FFmpeg (the egress guard's refusal); `device`: keep
        each frame there as a torch tensor (the models of this process take frames on it), None: on the host."""
        self._url, self._options, self._shown = url, options, shown
        self._open_timeout, self._read_timeout = open_timeout_s, read_timeout_s
        self._max_pixels, self._max_side, self._pace = max_frame_pixels, max_side, pace
        self._on_opened, self._explain = on_opened, explain
        self._device = device
        self._lock = threading.Lock()
        self._latest: ReadFrame | None = None
        self._stop = threading.Event()
        self.frames = 0
        self.dropped = 0
        self.decode_errors = 0
        self.size: tuple[int, int] | None = None
        self.size_changes = 0
        self.error: InputError | None = None
        self.ended = threading.Event()
        self.last_frame_at = time.monotonic()
        self._fps = 0.0
        self._pacer = Pacer(sleep=self._stop.wait)
        # called on the reader's thread after each frame and once reading has ended: the stream's loop waits on
        # it instead of polling (serve_app/streams.py `_take_frames`)
        self.arrived: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._main, name="stream-reader", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._run()
        finally:
            self.arrived()

    def take(self) -> ReadFrame | None:
        with self._lock:
            frame, self._latest = self._latest, None
            return frame

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _open(self) -> av.container.InputContainer | None:
        began = time.monotonic()
        try:
            import av  # a dependency of the package; imported here so that the service starts without it

            container = av.open(self._url, options=self._options, timeout=(self._open_timeout, self._read_timeout))
        except Exception as exc:  # noqa: BLE001 - every failure becomes the client's answer
            timed_out = time.monotonic() - began >= 0.95 * self._open_timeout
            self._on_opened(self._explain() or self._open_failure(exc, timed_out))
            return None
        videos = container.streams.video
        if not videos:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            container.close()
            self._on_opened(InputError(422, "source_unavailable", f"{self._shown} offers no video stream (it offers: "
                                       f"{', '.join(kinds)})"))
            return None
        context = videos[0].codec_context
        if context.width * context.height > self._max_pixels:
            container.close()
            self._on_opened(InputError(413, "frames_too_large", f"{self._shown} sends {context.width}x{context.height} "
                                       f"frames; the limit is {self._max_pixels} pixels "
                                       "(ingress.streams.max_frame_pixels)"))
            return None
        rate = videos[0].average_rate or videos[0].guessed_rate
        self._fps = float(rate) if rate else 0.0
        self._on_opened(Opened(self._fps, context.width, context.height, context.name))
        return container

    def _open_failure(self, exc: BaseException, timed_out: bool) -> InputError:
        import av

        """What to tell the client. PyAV's open timeout interrupts FFmpeg, which then reports whatever the
        interrupted step says (an RTSP open says "invalid data"): the time taken tells a timeout apart."""
        if timed_out or isinstance(exc, av.error.ExitError):
            why = f"no answer within {self._open_timeout:g} s (ingress.streams.open_timeout_s)"
        elif isinstance(exc, av.error.ConnectionRefusedError):
            why = "the connection was refused"
        elif isinstance(exc, av.error.InvalidDataError):
            why = "FFmpeg found no stream it can read there"
        else:
            why = redact_text(str(exc)) or type(exc).__name__
        return InputError(422, "source_unavailable", f"cannot open {self._shown}: {why}")

    def _run(self) -> None:
        try:
            import av
        except ImportError as exc:  # the GPU machine's trimmed environment, say
            self._on_opened(InputError(503, "streams_unavailable", f"live streams need PyAV (pip install av): {exc}"))
            self.ended.set()
            return
        container = self._open()
        if container is None:
            self.ended.set()
            return
        try:
            self._read(container)
        except InputError as exc:
            self.error = exc
        except av.error.ExitError:
            if not self._stop.is_set():
                self.error = InputError(504, "source_silent", f"no frame from {self._shown} for "
                                        f"{self._read_timeout:g} s (ingress.streams.read_timeout_s: {self._read_timeout:g})")
        except Exception as exc:  # noqa: BLE001 - a source that breaks ends its stream with the reason
            if not self._stop.is_set():
                self.error = self._explain() or InputError(502, "source_failed",
                                                           f"{self._shown}: {redact_text(str(exc))}")
        finally:
            container.close()  # the newest frame stays for the stream to take; `ended` says nothing more comes
            self.ended.set()
            _trim_memory()

    def _read(self, container: av.container.InputContainer) -> None:
        import av

        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 2
        in_a_row = 0
        for packet in container.demux(stream):
            if self._stop.is_set():
                return
            try:
                decoded = packet.decode()
            except av.error.ExitError:
                raise
            except av.FFmpegError:  # a corrupt packet: counted (GET /v1/streams/{id}), never logged per packet
                self.decode_errors += 1
                in_a_row += 1
                if in_a_row >= _DECODE_ERRORS_IN_A_ROW:
                    raise InputError(502, "source_failed", f"{self._shown}: {in_a_row} packets in a row did not "
                                     "decode") from None
                continue
            in_a_row = 0
            for frame in decoded:
                self._keep(frame)

    def _keep(self, frame: Any) -> None:  # av.VideoFrame
        self._keep_image((frame.width, frame.height), lambda target: frame.to_ndarray(
            format="bgr24", width=target[0], height=target[1], interpolation="AREA"), frame.rotation, frame.time)

    def _placed(self, image: Any) -> Any:
        """A rendered frame where the models take it: copied once to `device` if it was rendered on the host."""
        if self._device is None or not isinstance(image, np.ndarray):
            return image
        import torch

        host = torch.from_numpy(image)
        if self._device.startswith("cuda"):
            host = host.pin_memory()
        return host.to(self._device, non_blocking=True)

    def _keep_image(self, stored: tuple[int, int], render: Callable[[tuple[int, int]], np.ndarray], rotation: float,
                    at: float | None) -> None:
        """Keep a decoded frame of `stored` (width, height): `render(target)` gives it as BGR at the working size
        (the decoder scales while it converts), turned upright by `rotation`; `at`: its time in the source (None:
        counted from the frame rate)."""
        if stored[0] * stored[1] > self._max_pixels:
            raise InputError(413, "frames_too_large", f"{self._shown} sent a {stored[0]}x{stored[1]} frame; the limit "
                             f"is {self._max_pixels} pixels (ingress.streams.max_frame_pixels)")
        target = working_size(*stored, self._max_side)
        image = upright(self._placed(render(target)), rotation)
        size, scale = stored, (target[0] / stored[0], target[1] / stored[1])
        if round(rotation) % 180:  # shown on its side: the displayed frame is the stored one turned
            size, scale = (stored[1], stored[0]), (scale[1], scale[0])
        if self.size != size:
            if self.size is not None:
                self.size_changes += 1
                logger.info("stream source %s: frames are now %dx%d", self._shown, *size)
            self.size = size
        if self._pace:  # a file plays at its own rate, as a camera would send it (raw H.264 has no timestamps)
            self._pacer.wait(at if at is not None else self.frames / (self._fps or 25.0))
        kept = ReadFrame(self.frames, image, size, scale, time.time())
        with self._lock:
            if self._latest is not None:
                self.dropped += 1  # the pipeline had not taken the previous frame
            self._latest = kept
            self.frames += 1
            self.last_frame_at = time.monotonic()
        self.arrived()
