"""A stream that processes nothing says so: a failure injected at each step of a stream's life ends it `failed`
with the reason (never `ended` or `running` with no error), stops reading its source, and shows, while it runs,
how many frames failed and the last error.

The registry tests drive the real StreamRegistry and reader over real sources (files, GStreamer's RTSP server)
with a session that fails where the test says; the app test runs the real service with a detector that fails on
every real frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serve_app.config import StreamsConfig
from serve_app.decoding import InputError
from serve_app.streams import LiveStream, StreamRegistry
from tests.conftest import deployed
from tests.media import SYSTEM_PYTHON, free_port, h264_clip, require_gstreamer
from tests.onnx_models import constant_yolo, v8_rows
from tests.videos import two_faces

SMALL = {"num_cpus": 0.1, "num_gpus": 0}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("failing-media")
    two_faces(folder / "clip.mp4", frames=250, enters_at=100)  # 10 s at 25 fps
    two_faces(folder / "short.mp4", frames=25, enters_at=10)  # 1 s
    return folder


class Session:
    """A video session (the interface StreamRegistry uses) whose frames do what `frame` says."""

    def __init__(self, frame: Callable[[int], Awaitable[dict[str, Any]]]) -> None:
        self._frame, self.track_count, self.frames = frame, 0, 0

    def begin(self, image: np.ndarray, source: str) -> None:
        return None

    async def complete(self, index: int, image: np.ndarray, begun: None) -> dict[str, Any]:
        self.frames += 1
        return await self._frame(index)

    def summary(self) -> dict[str, Any]:
        return {"summary": {"frames": self.frames}}


async def _ok(index: int) -> dict[str, Any]:
    return {"frame": index, "objects": []}


async def _detector_away(index: int) -> dict[str, Any]:
    return {"error": {"code": "detector_unavailable", "message": "the detector failed: Boom", "frame": index}}


async def _raises(index: int) -> dict[str, Any]:
    raise KeyError("tracker state lost")


def _run(registry: StreamRegistry, source: str, watch: Callable[[LiveStream], None] = lambda s: None,
         timeout_s: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]], LiveStream]:
    """Start `source`, listen to it until it ends; `watch` sees the running stream every 50 ms. Returns the final
    description, the records listened to, and the stream."""

    async def play() -> tuple[dict[str, Any], list[dict[str, Any]], LiveStream]:
        stream = await registry.start(source)
        listener = registry.listen(stream.id)
        records: list[dict[str, Any]] = []

        async def listen() -> None:
            async for record in listener.records():
                records.append(record)

        listening = asyncio.ensure_future(listen())
        while not listening.done():
            watch(stream)
            await asyncio.wait([listening], timeout=0.05)
        listener.close()
        final = registry.describe(stream.id)
        await registry.close()
        return final, records, stream

    return asyncio.run(asyncio.wait_for(play(), timeout_s))


def _config(media: Path, **overrides: Any) -> StreamsConfig:
    return StreamsConfig(media_dir=media, keep_ended_s=60, **overrides)


def test_a_session_that_cannot_start_fails_the_stream_and_stops_its_reader(media: Path) -> None:
    """The tracker or the ingress handle not found: the stream used to keep `running` with no error, its reader
    reading the source for ever."""

    def broken(fps: float) -> Session:
        raise ModuleNotFoundError("No module named 'supervision'")

    final, records, stream = _run(StreamRegistry(_config(media), broken), "clip.mp4")
    assert final["state"] == "failed" and "ModuleNotFoundError: No module named 'supervision'" in final["error"]
    assert final["last_error"]["code"] == "stream_failed"
    assert records[-1]["summary"]["state"] == "failed" and "supervision" in records[-1]["summary"]["error"]
    assert stream.reader.join(timeout=10) and stream.reader.frames < 250  # stopped, not read to the end


def test_frames_that_always_fail_end_the_stream_after_the_outage_showing_the_failure_meanwhile(media: Path) -> None:
    seen: list[dict[str, Any]] = []
    registry = StreamRegistry(_config(media, detector_outage_s=1.0), lambda fps: Session(_detector_away))
    final, records, stream = _run(registry, "clip.mp4", watch=lambda s: seen.append(s.describe()))
    running = [d for d in seen if d["state"] == "running" and d["failed_frames"] > 0]
    assert running and running[-1]["last_error"]["message"] == "the detector failed: Boom"  # shown while running
    assert final["state"] == "failed" and final["failed_frames"] > 0 and final["frames_processed"] == 0
    assert "no frame went through for 1 s" in final["error"] and "the detector failed: Boom" in final["error"]
    assert stream.reader.join(timeout=10) and stream.reader.frames < 250


def test_a_source_that_ends_before_any_frame_went_through_fails_saying_why(media: Path) -> None:
    """The 1080p camera of the issue: every frame failed, the clip ended within the outage, and the stream said
    `ended` with no error."""
    registry = StreamRegistry(_config(media, detector_outage_s=30), lambda fps: Session(_detector_away))
    final, _, _ = _run(registry, "short.mp4")
    assert final["state"] == "failed" and final["failed_frames"] + final["dropped_frames"] == 25
    assert "none of its" in final["error"] and "the detector failed: Boom" in final["error"]


def test_processing_that_raises_is_counted_per_frame_and_fails_the_stream(media: Path) -> None:
    registry = StreamRegistry(_config(media, detector_outage_s=1.0), lambda fps: Session(_raises))
    final, records, _ = _run(registry, "clip.mp4")
    assert final["state"] == "failed" and final["last_error"]["code"] == "frame_failed"
    assert "KeyError: 'tracker state lost'" in final["error"]
    assert any(r.get("error", {}).get("code") == "frame_failed" for r in records)


def test_a_stream_whose_bookkeeping_dies_fails(media: Path) -> None:
    """Anything raised outside a frame's processing (here the metrics callback) ends the task: failed, named."""

    def metrics(stream: LiveStream) -> None:
        raise RuntimeError("metrics exporter gone")

    registry = StreamRegistry(_config(media), lambda fps: Session(_ok), on_frame=metrics)
    final, _, stream = _run(registry, "clip.mp4")
    assert final["state"] == "failed" and final["error"] == "RuntimeError: metrics exporter gone"
    assert stream.reader.join(timeout=10)


def test_a_clean_end_is_ended_and_every_frame_is_accounted_for(media: Path) -> None:
    final, _, _ = _run(StreamRegistry(_config(media), lambda fps: Session(_ok)), "short.mp4")
    assert final["state"] == "ended" and "error" not in final
    assert final["frames_processed"] + final["dropped_frames"] == final["frames_read"] == 25


@pytest.fixture(scope="module")
def camera(media: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """GStreamer's RTSP server with one 480p camera (20 s); yields the camera's URL and the server process."""
    require_gstreamer()
    clip = h264_clip(media / "camera.mp4", 854, 480, 20.0)
    port = free_port()
    server = subprocess.Popen([SYSTEM_PYTHON, str(Path(__file__).parent / "rtsp_server.py"), str(port),
                               f"cam={clip}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield f"rtsp://127.0.0.1:{port}/cam", server
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(timeout=10)


def test_a_camera_that_goes_silent_fails_after_the_read_timeout_naming_it(
        media: Path, camera: tuple[str, subprocess.Popen[str]]) -> None:
    """The camera stops sending without closing (its process stopped): `failed`, `source_silent`, once
    `read_timeout_s` (2 s here) has passed without a frame (it used to end `ended` after three of FFmpeg's)."""
    url, server = camera
    config = _config(media, allowed_hosts=["127.0.0.1"], read_timeout_s=2.0)
    stopped_at: list[float] = []

    def silence(stream: LiveStream) -> None:
        if stream.processed >= 5 and not stopped_at:
            os.kill(server.pid, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

    try:
        final, _, _ = _run(StreamRegistry(config, lambda fps: Session(_ok)), url, watch=silence)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert final["state"] == "failed" and final["last_error"]["code"] == "source_silent", final
    assert "no frame from rtsp://127.0.0.1" in final["error"] and "read_timeout_s: 2" in final["error"]


def test_a_camera_over_the_frame_pixel_limit_is_refused_at_the_start(
        media: Path, camera: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = camera
    registry = StreamRegistry(_config(media, allowed_hosts=["127.0.0.1"], max_frame_pixels=640 * 360),
                              lambda fps: Session(_ok))
    async def start() -> None:
        try:
            await registry.start(url)
        finally:
            await registry.close()

    with pytest.raises(InputError) as refused:
        asyncio.run(start())
    assert refused.value.status == 413 and refused.value.code == "frames_too_large"
    assert "854x480" in refused.value.message and registry.opening == 0


@pytest.fixture(scope="module")
def failing_detector_app(serve_url: str, media: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real service with a detector that fails on every real frame (class 4 of one class name: the blank
    health probe passes)."""
    models = tmp_path_factory.mktemp("stream-detector")
    rows = v8_rows([(3, 3, 1.6, 1.6, 4, 0.9)], num_classes=5)
    args = {
        "ingress": {"deployment": SMALL, "detector_timeout_s": 5,
                    "streams": {"media_dir": str(media), "detector_outage_s": 3}},
        "detector": {"kind": "yolo", "deployment": SMALL,
                     "yolo": {"model": str(constant_yolo(models / "y.onnx", rows, only_when_bright=True)),
                              "input_width": 64, "input_height": 64, "layout": "v8", "class_names": ["thing"]}},
        "classifiers": [],
    }
    with deployed(serve_url, "faildet", args) as url:
        yield url


def test_a_stream_whose_detector_always_fails_ends_failed_with_its_reason(failing_detector_app: str,
                                                                         metrics_port: int) -> None:
    from tests.test_observability import _scrape_until

    with httpx.Client(base_url=failing_detector_app, timeout=60) as client:
        started = client.post("/v1/streams", json={"source": "clip.mp4"})
        assert started.status_code == 201, started.text
        stream_id = started.json()["id"]
        with client.stream("GET", f"/v1/streams/{stream_id}/events") as events:
            records = [json.loads(line) for line in events.iter_lines()]  # until the stream ends
        final = client.get(f"/v1/streams/{stream_id}").json()
    assert final["state"] == "failed" and final["frames_processed"] == 0 and final["failed_frames"] > 0
    assert "model gave class 4, but only 1 class names are set" in final["error"], final
    assert records[-1]["summary"]["state"] == "failed" and records[-2]["error"]["code"] == "detector_unavailable"
    _scrape_until(f"http://127.0.0.1:{metrics_port}/metrics",
                  [r'^ray_pipeline_stream_frames_total\{.*application="faildet".*outcome="failed".*\} [1-9]'])


_WITHOUT_TRACKER = """
import asyncio, sys
sys.modules["supervision"] = None  # the tracker's library cannot be imported, as in a trimmed environment
from serve_app.config import PipelineConfig
from serve_app.stream_service import Streams
from tests.conftest import demo_args
streams = Streams.func_or_class(PipelineConfig.model_validate(demo_args()))
refusal = asyncio.run(streams.start("clip.mp4"))
print(refusal.status, refusal.code, refusal.message)
"""


def test_a_streams_replica_without_the_tracker_library_starts_and_refuses_streams_saying_why() -> None:
    """A missing tracker library must not fail the whole application's deployment (it did: the replica imported
    it at start and raised); the replica starts, and each stream start is refused with the reason."""
    import sys

    done = subprocess.run([sys.executable, "-c", _WITHOUT_TRACKER], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    status, code, message = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (status, code) == ("503", "streams_unavailable") and "supervision" in message, done.stdout
