"""Stream workers (`ingress.streams.workers`): each holds the models and a share of the streams, the streams
replica places and answers for them, `max_streams` counts once, and a worker that dies ends only its own
streams, whose place a new worker takes. (Workers on two nodes: tests/two_node_check.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import demo_args, deployed, on_the_cpu_device, small
from tests.videos import two_faces

pytest.importorskip("onnx2torch")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media-workers")
    two_faces(folder / "long.mp4", frames=500, enters_at=25)  # 20 s at 25 fps: outlives the module's checks
    return folder


@pytest.fixture(scope="module")
def workers_app(serve_url: str, media: Path) -> Iterator[str]:
    # the workers keep frames on the models' device from the decode on (the torch backend on the CPU device here;
    # CUDA on a GPU): tensors, not numpy frames, go through their muxer, detector, crops and classifiers
    args = on_the_cpu_device(small(demo_args()))
    args["ingress"]["detector_timeout_s"] = 60.0
    # detect_ahead: the workers' streams run with a frame detected ahead, through the real graph and muxer
    args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": 2, "max_listeners_per_stream": 1,
                                  "detect_ahead": 1, "workers": {"count": 2, "num_cpus": 0.1, "num_gpus": 0}}
    with deployed(serve_url, "workers", args) as url:
        yield url


@pytest.fixture()
def client(workers_app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=workers_app, timeout=60) as c:
        yield c


def _until(check: Callable[[], Any], what: str, tries: int = 600) -> Any:
    """Ask `check` until it answers something true (bounded: about a minute at most)."""
    for _ in range(tries):
        answer = check()
        if answer:
            return answer
        time.sleep(0.1)
    pytest.fail(f"never: {what}")


def _classified_frame(client: httpx.Client, stream_id: str, limit: int = 400) -> dict[str, Any]:
    """The first record of the stream whose faces carry every classifier's answer."""
    with client.stream("GET", f"/v1/streams/{stream_id}/events") as response:
        assert response.status_code == 200
        for i, line in enumerate(response.iter_lines()):
            record = json.loads(line)
            assert "summary" not in record and "error" not in record, record
            if any(set(o["attributes"]) == {"age", "gender", "emotion"} for o in record.get("objects", [])):
                return record
            assert i < limit, "no frame with classified faces"
    pytest.fail("the events ended")


def _stop_all(client: httpx.Client) -> None:
    for stream in client.get("/v1/streams").json()["streams"]:
        client.delete(f"/v1/streams/{stream['id']}")


def test_streams_go_to_different_workers_run_there_and_the_limit_counts_once(client: httpx.Client) -> None:
    try:
        first = client.post("/v1/streams", json={"source": "long.mp4"})
        second = client.post("/v1/streams", json={"source": "long.mp4"})
        assert first.status_code == second.status_code == 201, (first.text, second.text)
        a, b = first.json(), second.json()
        assert a["worker"] and b["worker"] and a["worker"] != b["worker"]  # the one with fewer streams takes it
        relayed = client.get("/v1/pipeline").json()["streams"]["relayed"]
        for stream in (a, b):
            face = next(o for o in _classified_frame(client, stream["id"])["objects"] if o["attributes"])
            assert face["label"] == "face" and face["track_id"] is not None
        # the ingress followed each stream from its worker: no record went through the streams replica
        assert client.get("/v1/pipeline").json()["streams"]["relayed"] == relayed
        refused = client.post("/v1/streams", json={"source": "long.mp4"})  # two run, on two workers: the limit is 2
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams", refused.text

        listed = {s["id"]: s for s in client.get("/v1/streams").json()["streams"]}
        assert {listed[a["id"]]["worker"], listed[b["id"]]["worker"]} == {a["worker"], b["worker"]}
        streams = client.get("/v1/pipeline").json()["streams"]
        assert streams["streams"] == 2 and streams["max_streams"] == 2
        workers = {w["name"]: w for w in streams["workers"]}
        assert sorted(workers) == sorted([a["worker"], b["worker"]])
        # each worker's own muxer fed its own detector: the frames were detected where they were decoded, and kept
        # on the models' device from the decode on
        assert all(w["state"] == "running" and w["streams"] == 1 and w["muxer"]["frames"] > 0 and w["frames"] == "cpu"
                   for w in workers.values()), workers

        stopped = client.delete(f"/v1/streams/{b['id']}")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        third = client.post("/v1/streams", json={"source": "long.mp4"})  # the freed slot, on the freed worker
        assert third.status_code == 201 and third.json()["worker"] == b["worker"], third.text
    finally:
        _stop_all(client)


def test_a_listener_that_leaves_gives_back_its_place_on_the_worker(workers_app: str, client: httpx.Client) -> None:
    """One listener a stream (max_listeners_per_stream: 1): a client that reads a line and goes away must free its
    place on the worker while the stream runs, or every later listener gets 429 until the stream ends."""
    stream_id = client.post("/v1/streams", json={"source": "long.mp4"}).json()["id"]
    try:
        def listen_once() -> bool:
            with httpx.Client(base_url=workers_app, timeout=60) as own, own.stream(
                    "GET", f"/v1/streams/{stream_id}/events") as events:
                return events.status_code == 200 and "objects" in json.loads(next(events.iter_lines()))

        assert listen_once()
        for _ in range(3):  # each time, once the worker has let the last one go
            _until(listen_once, "the worker frees a listener's place after it left", tries=100)
        assert client.get(f"/v1/streams/{stream_id}").json()["state"] == "running"
    finally:
        _stop_all(client)


def test_an_uploaded_video_runs_on_a_worker_and_a_bad_one_is_refused_before_the_stream(
        client: httpx.Client, tmp_path: Path) -> None:
    """/v1/video goes to a stream worker (its own models; the ingress's stay idle): the same lines as the ingress
    gives, tracked and classified, and a body that is not a video is still a 400 before any line."""
    video = two_faces(tmp_path / "short.mp4", frames=30, enters_at=8).read_bytes()
    mp4 = {"Content-Type": "video/mp4"}
    with client.stream("POST", "/v1/video", content=video, headers=mp4) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *frames, last = lines
    assert [f["frame"] for f in frames] == list(range(30)) and last["summary"]["frames"] == 30
    assert last["summary"]["tracks"] >= 2
    faces = [o for f in frames for o in f["objects"]]
    assert any(o["attributes"].get("gender", {}).get("label") == "female" for o in faces)
    workers = client.get("/v1/pipeline").json()["streams"]["workers"]
    assert sum(w["videos_done"] for w in workers) == 1 and all(w["videos"] == 0 for w in workers), workers

    garbage = client.post("/v1/video", content=b"\0\1\2 not a video" * 100, headers=mp4)
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "undecodable_video", garbage.text


def test_a_dead_worker_ends_only_its_own_streams(client: httpx.Client) -> None:
    import ray

    a = client.post("/v1/streams", json={"source": "long.mp4"}).json()
    b = client.post("/v1/streams", json={"source": "long.mp4"}).json()
    assert a["worker"] != b["worker"]
    with client.stream("GET", "/v1/events") as feed:  # one listener of both workers' streams
        fed = feed.iter_lines()
        assert sorted(s["id"] for s in json.loads(next(fed))["streams"]) == sorted([a["id"], b["id"]])
        before_kill: list[dict[str, Any]] = []
        while {r["stream"] for r in before_kill if "objects" in r} != {a["id"], b["id"]}:
            before_kill.append(json.loads(next(fed)))
        lines = []
        with client.stream("GET", f"/v1/streams/{a['id']}/events") as events:
            for raw in events.iter_lines():
                lines.append(json.loads(raw))
                if len(lines) == 3:
                    (victim,) = [n for n in ray.util.list_named_actors(all_namespaces=True) if n["name"] == a["worker"]]
                    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        after_kill = [json.loads(raw) for raw in fed]  # ends by itself: the lost stream's summary, then why
    last = lines[-1]["summary"]
    assert last["state"] == "lost" and a["worker"] in last["error"], last
    assert all("frame" in line for line in lines[:-1])  # records, then the summary: no description in between
    *_, summary, error = after_kill
    assert summary["stream"] == a["id"] and summary["summary"]["state"] == "lost", summary
    assert error["error"]["code"] == "worker_lost" and a["worker"] in error["error"]["message"], error
    gone = client.get(f"/v1/streams/{a['id']}").json()
    assert gone["state"] == "lost" and gone["worker"] == a["worker"], gone

    before = client.get(f"/v1/streams/{b['id']}").json()["frames_processed"]
    _until(lambda: client.get(f"/v1/streams/{b['id']}").json()["frames_processed"] > before,
           "the other worker's stream goes on")

    def replaced() -> dict[str, Any] | None:  # a new worker in the lost one's place, holding its models
        rows = client.get("/v1/pipeline").json()["streams"]["workers"]
        assert {r["name"]: r["state"] for r in rows}[a["worker"]] == "lost"
        return next((r for r in rows if r["name"].startswith(a["worker"] + ".") and r["state"] == "running"), None)

    new = _until(replaced, "a new worker takes the lost one's place")
    again = client.post("/v1/streams", json={"source": "long.mp4"})  # the lost slot is free: the new worker, idle, takes it
    assert again.status_code == 201 and again.json()["worker"] == new["name"], again.text
    _classified_frame(client, again.json()["id"])  # and runs it through its own models
    assert client.get(f"/v1/streams/{a['id']}").json()["state"] == "lost"  # the lost stream stays lost
    _stop_all(client)
