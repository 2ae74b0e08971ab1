"""Live streams that a hostile client or a broken camera cannot turn against the service. Every case is a real
server on 127.0.0.1 (GStreamer's RTSP server, tests/servers.py's small ones) against the real service:

- server-side request forgery: an RTSP redirect and an HLS playlist's segments may not reach a refused address;
- header injection: control characters in a source are refused before anything is opened;
- credentials in a source are redacted in every answer, error and log line;
- opens run concurrently, each bounded, and a start whose client went away is aborted without delaying others;
- events listeners are counted apart from the API's capacity: /v1/infer answers whatever listens, and /healthz
  says when the API cannot;
- honest refusals, bounded FFmpeg logs, frames scaled as decoded, and a frame size change reported.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from tests.conftest import demo_args, deployed, small
from tests.images import ASTRONAUT
from tests.media import face_scene, h264_clip, require_gstreamer, rtsp_server
from tests.servers import http_files, rtsp_redirector, silent

PNG = {"Content-Type": "image/png"}
API_SLOTS = 6  # the ingress's own capacity here (max_ongoing_requests)
LOOPBACK_AS_A_NUMBER = "2130706433"  # 127.0.0.1 written as one integer: resolves to loopback, named otherwise


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("attack-media")
    h264_clip(folder / "camera.mp4", 854, 480, 30.0)
    return folder


@pytest.fixture(scope="module")
def camera(media: Path) -> Iterator[str]:
    require_gstreamer()
    with rtsp_server({"cam": media / "camera.mp4"}) as url:
        yield url


@pytest.fixture(scope="module")
def app(serve_url: str, media: Path) -> Iterator[str]:
    args = small(demo_args())
    args["ingress"]["deployment"] = {"num_cpus": 0.1, "num_gpus": 0, "max_ongoing_requests": API_SLOTS}
    args["ingress"]["streams"] = {"allowed_hosts": ["127.0.0.1"], "media_dir": str(media), "max_streams": 4,
                                  "open_timeout_s": 8, "max_listeners": 40, "max_listeners_per_stream": 36}
    with deployed(serve_url, "attacks", args) as url:
        yield url


@pytest.fixture()
def client(app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app, timeout=120) as c:
        yield c


def _streams_replica() -> Any:
    from ray import serve

    return serve.get_deployment_handle("streams", app_name="attacks")


def _wait_for(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


# --- every address a stream touches is checked ---------------------------------------------------------------

def test_an_rtsp_redirect_to_a_refused_address_is_refused_and_never_followed(client: httpx.Client) -> None:
    """The source (allowed) answers DESCRIBE with 302 to 127.0.0.1 written as an integer, which the service refuses
    when named directly; FFmpeg follows RTSP redirects by itself, so the guard refuses them."""
    with rtsp_redirector("rtsp://127.0.0.1:1/never") as (inner_port, inner_seen):
        target = f"rtsp://{LOOPBACK_AS_A_NUMBER}:{inner_port}/normal"
        direct = client.post("/v1/streams", json={"source": target})
        assert direct.status_code == 422 and direct.json()["error"]["code"] == "source_not_allowed"
        with rtsp_redirector(target) as (port, seen):
            answer = client.post("/v1/streams", json={"source": f"rtsp://127.0.0.1:{port}/cam"})
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "source_not_allowed" and "302" in error["message"] and target in error["message"]
        assert any(line.startswith("DESCRIBE") for line in seen)  # the allowed source was asked ...
        assert inner_seen == []  # ... and its redirect target never reached


def _segment(media: Path) -> bytes:
    """One MPEG-TS segment of H.264 (2 s of the camera clip), as HLS serves them."""
    segment = media / "seg.ts"
    if not segment.exists():
        with av.open(str(media / "camera.mp4")) as source, av.open(str(segment), "w", format="mpegts") as out:
            video = source.streams.video[0]
            stream = out.add_stream_from_template(video)
            for packet in source.demux(video):
                if packet.pts is not None and packet.pts * video.time_base > 2:
                    break
                if packet.dts is not None:
                    packet.stream = stream
                    out.mux(packet)
    return segment.read_bytes()


def _playlist(segment_url: str) -> bytes:
    return (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.0,\n"
            f"{segment_url}\n#EXT-X-ENDLIST\n").encode()


def test_hls_segments_on_a_refused_host_are_never_fetched(client: httpx.Client, media: Path) -> None:
    """A playlist on an allowed host whose segment lives on 127.0.0.1 written as an integer: the segment request
    reaches the guard (FFmpeg's proxy), which refuses it; the segment server sees nothing. The same playlist with
    its segment on the allowed host plays: the guard refuses only what it must."""
    with http_files({"/seg0.ts": _segment(media)}) as (segment_port, segment_seen):
        playlists = {"/bad.m3u8": _playlist(f"http://{LOOPBACK_AS_A_NUMBER}:{segment_port}/seg0.ts"),
                     "/good.m3u8": _playlist(f"http://127.0.0.1:{segment_port}/seg0.ts")}
        with http_files(playlists) as (port, seen):
            refused = client.post("/v1/streams", json={"source": f"http://127.0.0.1:{port}/bad.m3u8"})
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "source_not_allowed"
            assert f"{LOOPBACK_AS_A_NUMBER}:{segment_port}" in refused.json()["error"]["message"]
            assert seen == [f"/bad.m3u8 Host: 127.0.0.1:{port}"] and segment_seen == []
            played = client.post("/v1/streams", json={"source": f"http://127.0.0.1:{port}/good.m3u8"})
            assert played.status_code == 201, played.text
            _wait_for(lambda: client.get(f"/v1/streams/{played.json()['id']}").json()["frames_read"] > 0,
                      "a frame of the allowed segment")
            client.delete(f"/v1/streams/{played.json()['id']}")
            assert segment_seen and segment_seen[0].startswith("/seg0.ts")


@pytest.mark.parametrize("injected", ["\r\nAuthorization: Basic SU5KRUNURUQ=\r\nX-A: b", "\tx", " x", "\x00"])
def test_control_characters_in_a_source_are_refused_before_anything_is_opened(client: httpx.Client,
                                                                              injected: str) -> None:
    with silent() as server:
        answer = client.post("/v1/streams", json={"source": f"rtsp://127.0.0.1:{server.port}/stall{injected}"})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_source", answer.text
        assert "control character or white space" in answer.json()["error"]["message"]
        assert server.accepted == 0


# --- credentials are secrets ---------------------------------------------------------------------------------

def test_a_cameras_password_never_leaves_the_service(client: httpx.Client, camera: str) -> None:
    secret = "S3cretPass"
    url = camera.replace("rtsp://", f"rtsp://admin:{secret}@") + "/cam?channel=1&token=T0kenValue"
    started = client.post("/v1/streams", json={"source": url})
    assert started.status_code == 201, started.text
    stream_id = started.json()["id"]
    _wait_for(lambda: client.get(f"/v1/streams/{stream_id}").json()["frames_processed"] > 0, "a processed frame")
    answers = [started.text, client.get("/v1/streams").text, client.get(f"/v1/streams/{stream_id}").text]
    with client.stream("GET", f"/v1/streams/{stream_id}/events") as events:
        first = next(events.iter_lines())
    answers += [first, client.delete(f"/v1/streams/{stream_id}").text, client.get(f"/v1/streams/{stream_id}").text]
    refused = client.post("/v1/streams", json={"source": f"rtsp://admin:{secret}@10.0.0.1/x?password={secret}"})
    answers.append(refused.text)
    assert refused.status_code == 422
    assert started.json()["source"] == camera.replace("rtsp://", "rtsp://admin:***@") + "/cam?channel=1&token=***"
    for text in answers:
        assert secret not in text and "T0kenValue" not in text, text
    _assert_not_in_the_logs(secret, "attacks")


def _assert_not_in_the_logs(secret: str, app: str) -> None:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    texts = [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert any(f"_{app}_streams" in t or "stream" in t for t in texts)
    assert not [t for t in texts if secret in t]


# --- opens cannot block others -------------------------------------------------------------------------------

def test_a_start_is_not_held_up_by_opens_that_hang(client: httpx.Client, camera: str) -> None:
    """Three starts at a source that accepts and never answers are open at once (OpenCV's capture opened one at
    a time: a normal camera waited behind each hanging open's whole timeout), and a real camera starts while all
    three still hang."""
    with silent() as server, ThreadPoolExecutor(3) as pool:
        url = f"rtsp://127.0.0.1:{server.port}/stall"
        hanging = [pool.submit(client.post, "/v1/streams", json={"source": url}) for _ in range(3)]
        _wait_for(lambda: server.still_open() == 3, "three opens connected at once")
        started = client.post("/v1/streams", json={"source": f"{camera}/cam"})
        assert started.status_code == 201, started.text
        assert server.still_open() == 3 and not any(h.done() for h in hanging)  # they were still hanging
        client.delete(f"/v1/streams/{started.json()['id']}")
        answers = [h.result() for h in hanging]  # each ends at its own open timeout
    assert [a.status_code for a in answers] == [422] * 3
    assert all(a.json()["error"]["message"].endswith("no answer within 8 s (ingress.streams.open_timeout_s)")
               for a in answers), answers[0].text
    _wait_for(lambda: _streams_replica().describe.remote().result()["opening"] == 0, "every slot back")


def test_an_abandoned_start_is_aborted_and_its_slot_comes_back(camera: str) -> None:
    """The start's caller goes away (Serve cancels the streams replica's call when the HTTP client hangs up): its
    open is aborted at once, its connection closed, its slot given back when the open has returned, long
    before its 60 s open timeout."""
    import asyncio

    from serve_app.config import StreamsConfig
    from serve_app.streams import StreamRegistry

    async def abandon(server: Any) -> tuple[int, int]:
        registry = StreamRegistry(StreamsConfig(allowed_hosts=["127.0.0.1"], open_timeout_s=60), lambda fps: None)
        start = asyncio.ensure_future(registry.start(f"rtsp://127.0.0.1:{server.port}/stall"))
        while server.still_open() == 0:
            await asyncio.sleep(0.05)
        held = registry.opening
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        while registry.opening or server.still_open():
            await asyncio.sleep(0.05)
        started = await registry.start(f"{camera}/cam")  # the slot is free again
        await registry.stop(started.id)
        await registry.close()
        return held, registry.opening

    with silent() as server:
        assert asyncio.run(asyncio.wait_for(abandon(server), 30)) == (1, 0)


# --- listeners cannot starve the API ---------------------------------------------------------------------------

def test_listeners_do_not_take_the_apis_capacity_and_are_bounded(client: httpx.Client, app: str, camera: str) -> None:
    """36 listeners on one stream, six times the API's capacity: /v1/infer and the stream routes answer; the 37th
    listener of the stream gets 429; /healthz stays 200."""
    started = client.post("/v1/streams", json={"source": f"{camera}/cam"})
    assert started.status_code == 201, started.text
    stream_id = started.json()["id"]
    stop = threading.Event()
    opened = []

    def listen() -> None:
        with httpx.Client(base_url=app, timeout=120) as own, own.stream("GET", f"/v1/streams/{stream_id}/events") as r:
            opened.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=listen, daemon=True) for _ in range(36)]
    try:
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(opened) == 36, "36 listeners")
        assert opened == [200] * 36
        assert _streams_replica().describe.remote().result()["listeners"] == 36
        answer = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers=PNG)
        assert answer.status_code == 200 and len(answer.json()["objects"]) == 1
        assert client.get(f"/v1/streams/{stream_id}").json()["state"] == "running"
        assert client.get("/healthz").status_code == 200
        extra = client.get(f"/v1/streams/{stream_id}/events")
        assert extra.status_code == 429 and extra.json()["error"]["code"] == "too_many_listeners"
    finally:
        stop.set()
        client.delete(f"/v1/streams/{stream_id}")
        for thread in threads:
            thread.join(timeout=30)
    _wait_for(lambda: _streams_replica().describe.remote().result()["listeners"] == 0, "the listeners counted out")


def test_healthz_says_so_when_the_api_cannot_answer(app: str, client: httpx.Client) -> None:
    """Every API slot held by a client that sends its body slowly: /healthz answers 503 `saturated` (it used to
    say 200 while /v1/infer hung); once they finish, 200 again."""
    host, port = app.split("//")[1].split("/")[0].split(":")
    prefix = "/" + app.split("//")[1].split("/", 1)[1]
    body = ASTRONAUT.read_bytes()
    slow = []
    try:
        for _ in range(API_SLOTS):
            connection = socket.create_connection((host, int(port)))
            connection.sendall(f"POST {prefix}/v1/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
            slow.append(connection)
        health: list[httpx.Response] = []
        _wait_for(lambda: health.append(client.get("/healthz")) or health[-1].status_code == 503, "503 from /healthz")
        assert health[-1].json()["error"]["code"] == "saturated"
        assert f"its {API_SLOTS} request slots stayed busy" in health[-1].json()["error"]["message"]
        for connection in slow:
            connection.sendall(body[1000:])
        for connection in slow:
            assert connection.recv(12).startswith(b"HTTP/1.1 200")
    finally:
        for connection in slow:
            connection.close()
    assert client.get("/healthz").status_code == 200


# --- honest refusals, bounded logs, frame sizes -------------------------------------------------------------------

def test_an_audio_only_source_is_refused_saying_so(client: httpx.Client, media: Path) -> None:
    path = media / "audio.mka"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    answer = client.post("/v1/streams", json={"source": "audio.mka"})
    assert answer.status_code == 422
    assert answer.json()["error"]["message"] == "audio.mka offers no video stream (it offers: audio)"


def _raw_h264(path: Path, width: int, height: int, frames: int) -> bytes:
    """An H.264 Annex B byte stream (what a camera sends) of the face scene."""
    mp4 = h264_clip(path.with_suffix(".mp4"), width, height, frames / 25, frames=face_scene(width, height, frames))
    with av.open(str(mp4)) as source, av.open(str(path), "w", format="h264") as out:
        video = source.streams.video[0]
        stream = out.add_stream_from_template(video)
        for packet in source.demux(video):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return path.read_bytes()


def test_a_resolution_change_mid_stream_is_reported_with_each_frames_own_size(client: httpx.Client,
                                                                             media: Path) -> None:
    require_gstreamer()
    first = _raw_h264(media / "first.h264", 854, 480, 50)
    second = _raw_h264(media / "second.h264", 1280, 720, 50)
    (media / "changes.h264").write_bytes(first + second)
    stream_id = client.post("/v1/streams", json={"source": "changes.h264"}).json()["id"]
    with client.stream("GET", f"/v1/streams/{stream_id}/events") as events:
        records = [json.loads(line) for line in events.iter_lines()]
    sizes = [r["image"] for r in records if "objects" in r]
    assert {"width": 854, "height": 480} in sizes and {"width": 1280, "height": 720} in sizes
    assert sizes.index({"width": 1280, "height": 720}) > sizes.index({"width": 854, "height": 480})
    for record in records:
        for obj in record.get("objects", []):
            assert obj["box"][2] <= record["image"]["width"] and obj["box"][3] <= record["image"]["height"]
    final = records[-1]["summary"]
    assert final["size_changes"] == 1 and final["image"] == {"width": 1280, "height": 720}


def test_a_corrupt_stream_is_counted_not_logged_per_packet(media: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Garbage in the middle of the H.264: decode errors are counted (GET /v1/streams/{id}) while FFmpeg's own
    log stays quiet (it wrote about 1,400 lines in 35 s of one such stream)."""
    from serve_app.stream_reader import StreamReader

    require_gstreamer()
    good = _raw_h264(media / "clean.h264", 854, 480, 100)
    rng = np.random.default_rng(1)
    middle = len(good) // 2
    broken = good[:middle] + rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes() + good[middle:]
    (media / "corrupt.h264").write_bytes(broken)
    opened = []
    reader = StreamReader(str(media / "corrupt.h264"), {"protocol_whitelist": "file"}, "corrupt.h264",
                          open_timeout_s=10, read_timeout_s=10, max_frame_pixels=10**8, max_side=0, pace=False,
                          on_opened=opened.append)
    frames = 0
    while not (reader.ended.is_set() and reader.take() is None):
        frames += reader.take() is not None
        time.sleep(0.001)
    assert reader.error is None and reader.frames > 50
    logged = capfd.readouterr()
    assert len((logged.out + logged.err).splitlines()) < 20


def test_frames_are_scaled_to_the_working_side_as_they_are_decoded(media: Path, camera: str) -> None:
    """A 4K camera's frames reach the pipeline at the detector's 1280 pixels (a 4K BGR frame, 24.9 MB, is never
    made), their scale recorded; an 8K source is refused from its declared size."""
    from serve_app.stream_reader import StreamReader

    require_gstreamer()
    clip = h264_clip(media / "uhd.mp4", 3840, 2160, 1.0, fps=5)
    opened = []
    reader = StreamReader(str(clip), {"protocol_whitelist": "file"}, "uhd.mp4", open_timeout_s=10,
                          read_timeout_s=10, max_frame_pixels=3840 * 2160, max_side=1280, pace=False,
                          on_opened=opened.append)
    _wait_for(lambda: reader.ended.is_set(), "the clip read")
    frame = reader.take()
    assert frame is not None and frame.image.shape == (720, 1280, 3) and frame.size == (3840, 2160)
    assert frame.scale == (1280 / 3840, 720 / 2160)
    refused = []
    StreamReader(str(clip), {"protocol_whitelist": "file"}, "uhd.mp4", open_timeout_s=10, read_timeout_s=10,
                 max_frame_pixels=1920 * 1080, max_side=1280, pace=False, on_opened=refused.append).join(30)
    assert refused[0].status == 413 and "3840x2160" in refused[0].message


def test_a_file_in_the_media_folder_may_not_fetch_urls(client: httpx.Client, media: Path) -> None:
    """An HLS playlist dropped in the media folder names a URL: file sources may open files only."""
    with http_files({"/seg0.ts": b"x"}) as (port, seen):
        (media / "list.m3u8").write_bytes(_playlist(f"http://127.0.0.1:{port}/seg0.ts"))
        answer = client.post("/v1/streams", json={"source": "list.m3u8"})
    assert answer.status_code == 422 and seen == []


def test_a_phone_video_stored_on_its_side_streams_as_displayed_like_v1_video(client: httpx.Client,
                                                                           media: Path) -> None:
    """An MP4 whose display matrix turns it 90 degrees (as phones record): the stream's frames are turned upright,
    `image` is the displayed size and the boxes are /v1/video's for the same file (OpenCV's capture, which
    /v1/video uses, turns it too; PyAV alone would not)."""
    from tests.videos import turned_display, write

    import cv2

    # displayed upright at 360x640; stored turned a quarter anticlockwise, the display matrix turning it back
    path = write(media / "stored.mp4", [cv2.rotate(f, cv2.ROTATE_90_COUNTERCLOCKWISE) for f in face_scene(360, 640, 25)])
    data = turned_display(path, media / "phone.mp4").read_bytes()
    video = client.post("/v1/video", content=data, headers={"Content-Type": "video/mp4"})
    by_file = {r["frame"]: r for r in map(json.loads, video.text.splitlines()) if "objects" in r}
    stream_id = client.post("/v1/streams", json={"source": "phone.mp4"}).json()["id"]
    with client.stream("GET", f"/v1/streams/{stream_id}/events") as events:
        records = [json.loads(line) for line in events.iter_lines()]
    frames = [r for r in records if "objects" in r and r["objects"]]
    assert frames and all(r["image"] == {"width": 360, "height": 640} for r in frames)
    for record in frames:
        boxes = [o["box"] for o in record["objects"]]
        expected = [o["box"] for o in by_file[record["frame"]]["objects"]]
        assert len(boxes) == len(expected) and np.allclose(boxes, expected, atol=2), (boxes, expected)
