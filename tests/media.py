"""Camera-like media for the stream tests: H.264 clips at camera resolutions (built here with GStreamer's x264
encoder from the committed photo) and GStreamer's RTSP server serving them on 127.0.0.1 (tests/rtsp_server.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.images import ASTRONAUT, read
from tests.system_packages import INSTALL, SYSTEM_PYTHON, missing

HERE = Path(__file__).resolve().parent


def require_gstreamer() -> None:
    """Skip (fail under CI=true) where GStreamer's RTSP server and encoder are not installed."""
    why = missing()
    if why is not None:
        message = f"GStreamer's RTSP server is not installed ({why}); run `python -m tests.system_packages` or {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def face_scene(width: int, height: int, frames: int, travel: float = 1.0) -> Iterator[np.ndarray]:
    """A grey canvas of `width` x `height` with the astronaut's face, a third of the height tall, moving from the
    left to the right over `frames` frames: across the whole width, or `travel` of it."""
    side = height // 3
    face = cv2.resize(read(ASTRONAUT), (side, side), interpolation=cv2.INTER_AREA)
    span = max(int((width - side - 20) * travel), 1)
    for i in range(frames):
        canvas = np.full((height, width, 3), 90, np.uint8)
        x = 10 + span * i // max(frames - 1, 1)
        y = (height - side) // 2
        canvas[y : y + side, x : x + side] = face
        yield canvas


def h264_clip(path: Path, width: int, height: int, seconds: float, fps: int = 25,
              frames: Iterator[np.ndarray] | None = None) -> Path:
    """An MP4 of H.264 (constrained baseline, a key frame every second, as cameras send) of `face_scene`: the
    frames are written as MJPEG with OpenCV, then encoded by GStreamer's x264enc (OpenCV's FFmpeg build has no
    H.264 encoder)."""
    count = max(int(seconds * fps), 1)
    mjpeg = path.with_suffix(".mjpeg.avi")
    writer = cv2.VideoWriter(str(mjpeg), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for frame in frames if frames is not None else face_scene(width, height, count):
        writer.write(frame)
    writer.release()
    pipeline = (f"filesrc location={mjpeg} ! avidemux ! jpegdec ! videoconvert ! video/x-raw,format=I420 ! "
                f"x264enc speed-preset=ultrafast tune=zerolatency key-int-max={fps} bframes=0 threads=2 ! "
                f"video/x-h264,profile=constrained-baseline ! h264parse ! mp4mux ! filesink location={path}")
    done = subprocess.run(["gst-launch-1.0", "-q", *pipeline.split()], capture_output=True, text=True, timeout=300)
    mjpeg.unlink(missing_ok=True)
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"gst-launch-1.0 could not encode {path.name}: {done.stderr.strip()[-500:]}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def rtsp_server(mounts: Mapping[str, Path]) -> Iterator[str]:
    """GStreamer's RTSP server on 127.0.0.1 serving each file at /<mount>; yields rtsp://127.0.0.1:PORT. Stopped
    (and waited for) when the block ends; its standard input closing stops it too, should this process die."""
    port = free_port()
    args = [SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), str(port), *(f"{m}={p}" for m, p in mounts.items())]
    server = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the RTSP server did not start: {line!r}")
        yield f"rtsp://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdin is not None:
            server.stdin.close()
        if server.stdout is not None:
            server.stdout.close()
