"""Live streams over the API: start from the media directory, list, listen, stop; refused sources."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import demo_args, deployed, small
from tests.videos import two_faces

@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    two_faces(folder / "two.mp4", frames=250, enters_at=100)  # 10 s at 25 fps
    (folder.parent / "secret.txt").write_text("outside the media directory")
    return folder


@pytest.fixture(scope="module")
def streams_app(serve_url: str, media: Path) -> Iterator[str]:
    args = small(demo_args())
    # the muxer waits (up to 5 s) for a frame of every running stream: two streams' frames go in one detector call
    # (one frame of a stream at a time, the default, said here: with detection ahead a stream's next frame may
    # ride in the same batch, so a batch of three would say nothing about two streams; tests/test_detect_ahead.py
    # and tests/test_stream_workers.py run with it, tests/test_batcher.py has the muxer counting streams)
    args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": 2, "detect_ahead": 0,
                                  "muxer": {"batched_push_timeout_ms": 5000}}
    with deployed(serve_url, "streams", args) as url:
        yield url


@pytest.fixture()
def client(streams_app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=streams_app, timeout=60) as c:
        yield c


def _events(client: httpx.Client, stream_id: str, frames: int) -> list[dict[str, Any]]:
    """The first `frames` frame records of a stream's events."""
    records = []
    with client.stream("GET", f"/v1/streams/{stream_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        for line in response.iter_lines():
            records.append(json.loads(line))
            if sum("objects" in r for r in records) >= frames:
                break
    return records


def test_a_stream_from_the_media_directory_produces_events_and_stops_on_delete(client: httpx.Client) -> None:
    started = client.post("/v1/streams", json={"source": "two.mp4"})
    assert started.status_code == 201, started.text
    stream = started.json()
    assert stream["state"] == "running" and stream["source"] == "two.mp4"
    records = _events(client, stream["id"], frames=10)
    frames = [r for r in records if "objects" in r]
    assert [f["frame"] for f in frames] == sorted(f["frame"] for f in frames)  # in order, maybe with gaps (drops)
    faces = [o for f in frames for o in f["objects"]]
    assert faces and all(o["label"] == "face" for o in faces)
    assert any(o["track_id"] is not None and o["attributes"].get("gender", {}).get("label") == "female" for o in faces)
    listed = client.get("/v1/streams").json()["streams"]
    (mine,) = [s for s in listed if s["id"] == stream["id"]]
    assert mine["state"] == "running" and mine["frames_processed"] >= 10 and mine["fps"] > 0
    assert mine["frames_read"] >= mine["frames_processed"] and mine["dropped_frames"] >= 0
    assert mine["decoder"] == "ffmpeg"  # no GPU share here: FFmpeg on the CPU (NVDEC: tests/test_nvdec_reader.py)

    with client.stream("GET", f"/v1/streams/{stream['id']}/events") as listening:
        stopped = client.delete(f"/v1/streams/{stream['id']}")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        tail = [json.loads(line) for line in listening.iter_lines()]  # ends by itself after the stop
    assert "summary" in tail[-1] and tail[-1]["summary"]["state"] == "stopped"
    after = client.get(f"/v1/streams/{stream['id']}")  # its final state is kept a while (keep_ended_s)
    assert after.status_code == 200 and after.json()["state"] == "stopped"
    again = client.delete(f"/v1/streams/{stream['id']}")  # idempotent
    assert again.status_code == 200 and again.json()["state"] == "stopped"


@pytest.mark.parametrize(("source", "status", "message"), [
    ("../secret.txt", 422, "is outside the media directory"),
    ("/etc/passwd", 422, "is outside the media directory"),
    ("file:///etc/passwd", 422, "source scheme 'file' is not allowed"),
    ("missing.mp4", 422, "no file 'missing.mp4' in the media directory"),
    ("rtsp://127.0.0.1:1/nothing", 422, "resolves to 127.0.0.1, a loopback address"),
])
def test_sources_outside_the_rules_are_refused(client: httpx.Client, source: str, status: int, message: str) -> None:
    response = client.post("/v1/streams", json={"source": source})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_streams_are_bounded_and_unknown_ids_are_404(client: httpx.Client) -> None:
    ids = [client.post("/v1/streams", json={"source": "two.mp4"}).json()["id"] for _ in range(2)]
    try:
        third = client.post("/v1/streams", json={"source": "two.mp4"})
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
    finally:
        for stream_id in ids:
            client.delete(f"/v1/streams/{stream_id}")
    assert client.get("/v1/streams/nope/events").status_code == 404
    assert client.delete("/v1/streams/nope").json()["error"]["code"] == "unknown_stream"


def test_a_stream_that_reaches_its_end_reports_ended(client: httpx.Client, media: Path) -> None:
    two_faces(media / "short.mp4", frames=25, enters_at=10)  # 1 s
    stream = client.post("/v1/streams", json={"source": "short.mp4"}).json()
    deadline = time.monotonic() + 30
    while client.get(f"/v1/streams/{stream['id']}").json()["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    info = client.get(f"/v1/streams/{stream['id']}").json()
    assert info["state"] == "ended" and info["frames_read"] == 25
    assert info["frames_processed"] + info["dropped_frames"] == 25  # every frame processed or counted as dropped
    client.delete(f"/v1/streams/{stream['id']}")


def test_the_frames_of_two_streams_reach_the_detector_in_one_call(client: httpx.Client) -> None:
    """nvstreammux's batch: with two streams running, each detector call carries a frame of each."""
    ids = [client.post("/v1/streams", json={"source": "two.mp4"}).json()["id"] for _ in range(2)]
    try:
        for stream_id in ids:
            records = _events(client, stream_id, frames=4)
            assert all("error" not in r for r in records), records
        muxer = client.get("/v1/pipeline").json()["streams"]["muxer"]
    finally:
        for stream_id in ids:
            client.delete(f"/v1/streams/{stream_id}")
    assert muxer["largest_batch"] == 2 and muxer["frames"] >= 8, muxer


def test_one_listener_follows_every_stream_and_sees_each_end(client: httpx.Client) -> None:
    """GET /v1/events: the running streams, then every stream's records tagged with its id, in frame order
    per stream, and each stream's summary when it stops; the listener's place is given back when it leaves."""
    ids = [client.post("/v1/streams", json={"source": "two.mp4"}).json()["id"] for _ in range(2)]
    lines: list[dict[str, Any]] = []
    try:
        with client.stream("GET", "/v1/events") as response:
            assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
            fed = response.iter_lines()
            for raw in fed:
                lines.append(json.loads(raw))
                seen = {r["stream"] for r in lines[1:] if "objects" in r}
                if seen == set(ids) and sum("objects" in r for r in lines) >= 6:
                    break
            for stream_id in ids:
                client.delete(f"/v1/streams/{stream_id}")
            for raw in fed:  # after the stops: the rest of the records, then both summaries
                lines.append(json.loads(raw))
                if {r["stream"] for r in lines[1:] if "summary" in r} == set(ids):
                    break
    finally:
        for stream_id in ids:
            client.delete(f"/v1/streams/{stream_id}")
    assert sorted(s["id"] for s in lines[0]["streams"]) == sorted(ids)
    for stream_id in ids:
        own = [r for r in lines[1:] if r.get("stream") == stream_id]
        frames = [r["frame"] for r in own if "objects" in r]
        assert frames == sorted(frames) and own[-1]["summary"]["state"] == "stopped", own[-3:]
        assert all("read_at" in r for r in own if "objects" in r)
    assert all(o["label"] == "face" for r in lines[1:] for o in r.get("objects", []))
    # the connection closed: its place among the listeners is free again (max_listeners counts it)
    deadline = time.monotonic() + 30
    while client.get("/v1/pipeline").json()["streams"]["listeners"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/v1/pipeline").json()["streams"]["listeners"] == 0



def test_a_listener_of_every_stream_that_leaves_while_nothing_runs_gives_its_place_back(client: httpx.Client) -> None:
    """With no stream running nothing is written to a /v1/events listener, so no failed write tells the server
    it left: a listener that goes away must still give back its place (max_listeners counts it), or idle clients
    coming and going would fill the limit and every later listener get 429."""
    def listeners() -> int:
        return client.get("/v1/pipeline").json()["streams"]["listeners"]

    assert listeners() == 0
    with client.stream("GET", "/v1/events") as response:
        fed = response.iter_lines()
        assert json.loads(next(fed)) == {"streams": []}
        assert listeners() == 1  # held while it stays, though nothing comes
    deadline = time.monotonic() + 30
    while listeners() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listeners() == 0
