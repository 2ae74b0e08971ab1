"""The same pipeline in the other two layouts: every classifier in one shared deployment (`colocated`),
and every model inside the ingress replica (`ingress`). Same answers as the default `separate` layout."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import demo_args, deployed
from tests.images import ASTRONAUT, collage, encode
from tests.onnx_models import fails_on_bright_classifier

SMALL = {"num_cpus": 0.1, "num_gpus": 0}
JPEG = {"Content-Type": "image/jpeg"}


def _small(args: dict) -> dict:
    args["ingress"]["deployment"] = SMALL
    args["detector"]["deployment"] = SMALL
    args["classifiers"] = [{**c, "deployment": SMALL} for c in args["classifiers"]]
    return args


@pytest.fixture(scope="module")
def colocated_app(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Face demo, classifiers in one deployment, plus one classifier that fails on every real photo."""
    args = _small({**demo_args(), "layout": "colocated"})
    gender = next(c for c in args["classifiers"] if c["name"] == "gender")
    model = fails_on_bright_classifier(tmp_path_factory.mktemp("colocated") / "broken.onnx")
    args["classifiers"].append({**gender, "name": "broken", "model": str(model)})
    with deployed(serve_url, "colocated", args) as url:
        yield url


@pytest.fixture(scope="module")
def ingress_app(serve_url: str) -> Iterator[str]:
    args = _small({**demo_args(), "layout": "ingress"})
    args["ingress"]["cpu_work"] = "threads"  # every other app here runs its CPU work on the loop (the default)
    with deployed(serve_url, "inproc", args) as url:
        yield url


def _infer(base: str, body: bytes, **params: str) -> dict:
    with httpx.Client(base_url=base, timeout=60) as client:
        response = client.post("/v1/infer", content=body, headers=JPEG, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_colocated_gives_the_same_objects_and_isolates_a_failing_classifier(
    demo_app: str, colocated_app: str
) -> None:
    body = encode(collage(), ".jpg")
    reference = _infer(demo_app, body)["objects"]
    result = _infer(colocated_app, body)
    assert len(result["objects"]) == len(reference) == 3
    for got, want in zip(result["objects"], reference):
        assert got == want  # same boxes and attributes; "broken" adds none
    assert result["errors"]["broken"]["code"] == "failed"
    # the error the stage raised, by its own type name, as the separate layout reports it
    assert result["errors"]["broken"]["message"].startswith("EngineError: model returned 3 classes")
    with httpx.Client(base_url=colocated_app, timeout=60) as client:
        pipeline = client.get("/v1/pipeline").json()
        assert pipeline["layout"] == "colocated"
        assert [c["name"] for c in pipeline["classifiers"]] == ["age", "gender", "emotion", "broken"]
        assert {c["execution"] for c in pipeline["classifiers"]} == {"thread"}  # stages sharing a process overlap
        assert client.get("/healthz").json() == {"status": "ok", "layout": "colocated", "deployments": 4}


def test_colocated_sends_one_request_s_classifier_calls_as_one_hop(colocated_app: str) -> None:
    import ray

    with httpx.Client(base_url=colocated_app, timeout=60) as client:
        response = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers={"Content-Type": "image/png"})
    request_id = response.headers["x-request-id"]
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
    calls: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not calls:
        for path in logs.glob("replica_colocated_classifiers_*.log"):
            calls = [line for line in path.read_text(errors="replace").splitlines() if request_id in line
                     and re.search(r"CALL \w+ ", line)]
        time.sleep(0.5)
    assert len(calls) == 1 and "CALL classify_many " in calls[0], calls  # four classifiers, one call


def test_ingress_layout_gives_the_same_objects_with_no_inner_hop(demo_app: str, ingress_app: str) -> None:
    body = encode(collage(), ".jpg")
    reference = _infer(demo_app, body)["objects"]
    result = _infer(ingress_app, body, trace="true")
    assert result["objects"] == reference
    assert result["errors"] == {}
    trace = result["trace"]
    assert set(trace["classifiers"]) == {"age", "gender", "emotion"}
    with httpx.Client(base_url=ingress_app, timeout=60) as client:
        pipeline = client.get("/v1/pipeline").json()
        assert pipeline["layout"] == "ingress"
        assert pipeline["detector"]["execution"] == "thread"
        assert client.get("/healthz").json() == {"status": "ok", "layout": "ingress", "deployments": 2}
    from ray import serve

    assert set(serve.status().applications["inproc"].deployments) == {"ingress", "streams"}
