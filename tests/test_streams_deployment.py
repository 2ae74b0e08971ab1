"""Live streams are held by the `streams` deployment: any ingress replica answers for any stream, the limit
counts once, and a streams replica that dies ends its streams' listeners with a summary naming the reason."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import demo_args, deployed, small
from tests.videos import two_faces


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media2")
    two_faces(folder / "long.mp4", frames=250, enters_at=100)  # 10 s at 25 fps
    return folder


@pytest.fixture(scope="module")
def two_ingresses(serve_url: str, media: Path) -> Iterator[str]:
    args = small(demo_args())
    args["ingress"]["deployment"] = {"num_cpus": 0.1, "num_gpus": 0, "num_replicas": 2}
    args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": 2,
                                  "deployment": {"num_cpus": 0.1, "num_gpus": 0}}
    with deployed(serve_url, "twoingress", args) as url:
        yield url


def _fresh(url: str, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on a connection of its own, so that HAProxy may send it to either ingress replica."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.request(method, path, headers={"Connection": "close"}, **kwargs)


def _through_each_replica(url: str, method: str, path: str, tries: int = 40,
                          **kwargs: object) -> dict[str, httpx.Response]:
    """The same request answered by each of the two ingress replicas (bounded tries)."""
    answers: dict[str, httpx.Response] = {}
    for _ in range(tries):
        response = _fresh(url, method, path, **kwargs)
        answers.setdefault(response.headers["x-served-by"], response)
        if len(answers) == 2:
            break
    assert len(answers) == 2, f"only replica {list(answers)} answered in {tries} tries"
    return answers


def test_any_ingress_replica_answers_for_any_stream_and_the_limit_counts_once(two_ingresses: str) -> None:
    started = _fresh(two_ingresses, "POST", "/v1/streams", json={"source": "long.mp4"})
    assert started.status_code == 201, started.text
    stream_id, first_replica = started.json()["id"], started.headers["x-served-by"]
    try:
        for replica, answer in _through_each_replica(two_ingresses, "GET", f"/v1/streams/{stream_id}").items():
            assert answer.status_code == 200 and answer.json()["state"] == "running", (replica, answer.text)
        for replica, answer in _through_each_replica(two_ingresses, "GET", "/v1/streams").items():
            assert [s["id"] for s in answer.json()["streams"]] == [stream_id], replica
        for _ in range(10):  # events from whichever replica a fresh connection reaches
            with httpx.Client(base_url=two_ingresses, timeout=30) as client, client.stream(
                    "GET", f"/v1/streams/{stream_id}/events", headers={"Connection": "close"}) as events:
                assert events.status_code == 200
                line = json.loads(next(events.iter_lines()))
                assert "objects" in line or "error" in line
                if events.headers["x-served-by"] != first_replica:
                    break
        else:
            pytest.fail("every events request reached the replica that started the stream")
        second = _fresh(two_ingresses, "POST", "/v1/streams", json={"source": "long.mp4"})
        assert second.status_code == 201
        # a third stream is refused through either replica: two run in all, whichever replica started them
        for replica, refused in _through_each_replica(two_ingresses, "POST", "/v1/streams",
                                                       json={"source": "long.mp4"}).items():
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams", replica
        stop = _fresh(two_ingresses, "DELETE", f"/v1/streams/{second.json()['id']}")
        assert stop.status_code == 200 and stop.json()["state"] == "stopped"
    finally:
        for stream in _fresh(two_ingresses, "GET", "/v1/streams").json()["streams"]:
            _fresh(two_ingresses, "DELETE", f"/v1/streams/{stream['id']}")


def test_a_dead_streams_replica_ends_its_listeners_with_a_lost_summary(two_ingresses: str) -> None:
    import ray

    stream_id = _fresh(two_ingresses, "POST", "/v1/streams", json={"source": "long.mp4"}).json()["id"]
    (victim,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::twoingress#streams#")]
    lines = []
    with httpx.Client(base_url=two_ingresses, timeout=60) as client, client.stream(
            "GET", f"/v1/streams/{stream_id}/events") as events:
        for raw in events.iter_lines():
            lines.append(json.loads(raw))
            if len(lines) == 3:
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    last = lines[-1]
    assert "summary" in last and last["summary"]["state"] == "lost", last
    assert "the streams deployment stopped" in last["summary"]["error"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Serve brings a new streams replica up; it holds no stream
        answer = _fresh(two_ingresses, "GET", f"/v1/streams/{stream_id}")
        if answer.status_code == 404:
            break
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "streams_unavailable", answer.text
        time.sleep(0.5)
    else:
        pytest.fail("no new streams replica within 60 s")
    again = _fresh(two_ingresses, "POST", "/v1/streams", json={"source": "long.mp4"})
    assert again.status_code == 201
    _fresh(two_ingresses, "DELETE", f"/v1/streams/{again.json()['id']}")


def test_the_pipeline_description_says_which_ingress_replica_gave_it(two_ingresses: str) -> None:
    """GET /v1/pipeline names its replica (`x-served-by`): in layout ingress each replica's counts are its own
    engines', and bench.run sums them over the replicas that answered."""
    answers = _through_each_replica(two_ingresses, "GET", "/v1/pipeline")
    assert all(answer.status_code == 200 and "detector" in answer.json() for answer in answers.values())
