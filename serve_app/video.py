"""Read a video out of an HTTP request and iterate its frames, within the configured limits.

Decoding goes through OpenCV's FFmpeg backend (in the opencv-python-headless wheel): MP4, MOV, AVI and
MKV with the codecs that FFmpeg build carries. The upload is written to a temporary file, because
FFmpeg needs to seek; the file is removed when the video is closed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from fastapi import Request

from serve_app.config import VideoConfig
from serve_app.decoding import InputError
from serve_app.http_input import MULTIPART, file_bytes, media_type_of, parse_form, read_limited

logger = logging.getLogger("ray.serve")

VIDEO_TYPES = ("video/mp4", "video/quicktime", "video/x-msvideo", "video/x-matroska", "application/octet-stream")


async def video_bytes(request: Request, limit: int) -> bytes:
    """The body (a video type or octet-stream), or the multipart field `video`."""
    media = media_type_of(request)
    if media not in VIDEO_TYPES and media != MULTIPART:
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type {media!r} is not accepted; send {', '.join(VIDEO_TYPES)} bytes, "
                         "or multipart/form-data with the file in field 'video'")
    body = await read_limited(request, limit)
    if media == MULTIPART and body:
        item = (await parse_form(request, body, max_files=2)).get("video")
        if item is None:
            raise InputError(422, "missing_video_field", "multipart body has no field named 'video'")
        body = await file_bytes(item, "video")
    if not body:
        raise InputError(400, "empty_body", "the request body is empty; send the video file")
    return body


_PLAUSIBLE_FRAMES = 10_000_000  # a declared count beyond this (or below 0) is no count: read frames are counted
_FALLBACK_FPS = 60.0  # frame budget per second of max_duration_s when the container's frame rate is unusable


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # as the container declares it (0 when it does not say, or says something impossible)
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


class VideoFile:
    """An uploaded video, opened and checked: `with VideoFile(data, limits) as video: for i, frame in video.frames(every)`.

    The temporary file is removed by `close`, and, should nothing call it (a response that never started), when
    the object is collected. The duration limit also holds for the frames actually read: a container that
    declares no frame count, or an impossible one, stops after `max_duration_s` worth of frames
    (`cut_short` then says why)."""

    def __init__(self, data: bytes, limits: VideoConfig) -> None:
        fd, self._path = tempfile.mkstemp(suffix=".video")
        self._finalizer = weakref.finalize(self, _remove, self._path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        self._capture = cv2.VideoCapture(self._path, cv2.CAP_FFMPEG)
        self._limits = limits
        try:
            self.info = self._check(limits)
        except BaseException:
            self.close()
            raise
        self.frames_read = 0
        self.cut_short: str | None = None

    def _check(self, limits: VideoConfig) -> VideoInfo:
        if not self._capture.isOpened():
            raise InputError(400, "undecodable_video", "the body is not a video FFmpeg can open (MP4, MOV, AVI, MKV)")
        c = self._capture
        declared = c.get(cv2.CAP_PROP_FRAME_COUNT)
        frames = int(declared) if 0 < declared <= _PLAUSIBLE_FRAMES else 0
        fps = float(c.get(cv2.CAP_PROP_FPS) or 0.0)
        info = VideoInfo(frames, fps if 0 < fps <= 1000 else 0.0,
                         int(c.get(cv2.CAP_PROP_FRAME_WIDTH)), int(c.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if info.width <= 0 or info.height <= 0:
            raise InputError(400, "undecodable_video", "the video has no decodable picture stream")
        if info.width * info.height > limits.max_frame_pixels:
            raise InputError(413, "video_too_large",
                             f"frames of {info.width}x{info.height} exceed the limit of {limits.max_frame_pixels} pixels")
        if info.duration_s > limits.max_duration_s:
            raise InputError(413, "video_too_long",
                             f"the video lasts {info.duration_s:.1f} s; the limit is {limits.max_duration_s:g} s")
        return info

    @property
    def max_frames(self) -> int:
        """Frames `max_duration_s` allows at this video's frame rate (or at 60 fps when it has none)."""
        return int(self._limits.max_duration_s * (self.info.fps or _FALLBACK_FPS))

    def frames(self, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(index, BGR frame) of every `every`-th frame, from 0, up to `max_frames`."""

        def retrieved() -> np.ndarray | None:
            ok, frame = self._capture.retrieve()
            return frame if ok else None

        def grabbed() -> Iterator[Callable[[], np.ndarray | None]]:
            while self._capture.grab():
                yield retrieved

        return self._counted(grabbed(), every)

    def _counted(self, decoded: Iterator[Callable[[], np.ndarray | None]],
                 every: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) of every `every`-th of the `decoded` frames, each converted (its callable called) only if
        it is kept, before the next is decoded; counts `frames_read` and stops at `max_frames` (`cut_short`)."""
        index = 0
        while True:
            if index >= self.max_frames:
                self.cut_short = (f"the video lasts longer than {self._limits.max_duration_s:g} s: it was cut after "
                                  f"{index} frames")
                return
            convert = next(decoded, None)
            if convert is None:
                return
            if index % every == 0:
                frame = convert()
                if frame is None:
                    return
                self.frames_read = index + 1
                yield index, frame
            else:
                self.frames_read = index + 1
            index += 1

    def close(self) -> None:
        self._capture.release()
        self._finalizer()  # removes the file, once

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NVDEC_FOURCCS = {"avc1", "h264", "H264", "hvc1", "hev1", "hevc"}  # H.264 and HEVC: what the NVDEC path takes


class NvdecVideoFile(VideoFile):
    """`VideoFile` whose frames are decoded on the GPU's NVDEC (PyNvVideoCodec): the same checks (OpenCV opens the
    file to read its size, rate and length), the same limits and counts; H.264 and HEVC go to NVDEC, demuxed by
    PyNvVideoCodec from the temporary file (nothing but that file is opened), each processed frame turned upright
    as OpenCV's capture turns it, as BGR: on `device` (a torch tensor there, where the models of this process take
    frames: `ingress.frames_on_device`), else copied to the host. Other codecs are read by OpenCV as before."""

    def __init__(self, data: bytes, limits: VideoConfig, device: str | None = None) -> None:
        super().__init__(data, limits)
        self._device = device

    @property
    def on_nvdec(self) -> bool:
        fourcc = int(self._capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1")
        return fourcc in _NVDEC_FOURCCS

    def frames(self, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        if not self.on_nvdec:
            yield from super().frames(every)
            return
        import PyNvVideoCodec as nvc
        import torch

        from serve_app.nvdec_reader import to_working_bgr, working_bgr
        from serve_app.stream_reader import upright

        # OpenCV gives the display rotation clockwise; upright() takes FFmpeg's (counter-clockwise) degrees
        rotation = -float(self._capture.get(cv2.CAP_PROP_ORIENTATION_META) or 0.0)
        try:
            demuxer = nvc.CreateDemuxer(filename=self._path)
            decoder = nvc.CreateDecoder(gpuid=0, codec=demuxer.GetNvCodecId(), usedevicememory=True,
                                        outputColorType=nvc.OutputColorType.RGB)
        except Exception as exc:  # noqa: BLE001 - a stream this card will not decode: OpenCV reads it instead
            logger.warning("video: NVDEC cannot decode it (%s); OpenCV on the CPU does", str(exc).splitlines()[0][:200])
            yield from super().frames(every)
            return

        # the decoder's surface at full size: kept on the device the models take frames on, or copied to the host
        bgr = (lambda rgb, size: working_bgr(rgb, size).to(self._device)) if self._device else to_working_bgr

        def kept(frame: Any) -> Any:
            rgb = torch.from_dlpack(frame)
            return upright(bgr(rgb, (int(rgb.shape[1]), int(rgb.shape[0]))), rotation)

        def decoded() -> Iterator[Callable[[], Any]]:
            for packet in itertools.chain(demuxer, [nvc.PacketData()]):  # the empty packet flushes the decoder
                for frame in decoder.Decode(packet):  # each surface is converted, if kept, before the next Decode
                    yield lambda frame=frame: kept(frame)

        yield from self._counted(decoded(), every)


class Mp4Writer:
    """Frames in, an MP4 (MPEG-4 part 2, which OpenCV's FFmpeg build encodes) out, through a temporary file."""

    def __init__(self, fps: float, width: int, height: int) -> None:
        fd, self._path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
        self._writer = cv2.VideoWriter(self._path, cv2.VideoWriter_fourcc(*"mp4v"), fps if fps > 0 else 25.0,
                                       (width, height))

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def finish(self) -> bytes:
        """The MP4's bytes; the temporary file is gone afterwards."""
        self._writer.release()
        try:
            with open(self._path, "rb") as handle:
                return handle.read()
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the video (safe to call after `finish`, and more than once)."""
        self._writer.release()
        _remove(self._path)


def _remove(path: str) -> None:
    """Delete a temporary file; gone already (or not removable) is not an error here."""
    with contextlib.suppress(OSError):
        os.unlink(path)
