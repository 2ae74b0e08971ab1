"""Faults: a replica killed under load, a failing detector, broken engines, and auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import demo_args
from tests.images import ASTRONAUT
from tests.onnx_models import broken_classifier, constant_yolo, v8_rows

PNG = {"Content-Type": "image/png"}
SMALL = {"num_cpus": 0.1, "num_gpus": 0}


@pytest.fixture(scope="module")
def fault_app(serve_url: str) -> Iterator[str]:
    from ray import serve

    from serve_app.app import build_app

    args = demo_args()
    args["ingress"]["deployment"] = {**SMALL, "env_vars": {"PIPELINE_API_TOKEN": "s3cret-token"}}
    args["detector"]["deployment"] = SMALL
    args["classifiers"] = [{**c, "deployment": SMALL} for c in args["classifiers"] if c["name"] in ("gender", "emotion")]
    serve.run(build_app(args), name="faults", route_prefix="/faults")
    yield f"{serve_url}/faults"
    serve.delete("faults")


AUTH = {"Authorization": "Bearer s3cret-token"}


def _replica_actor_names(app: str, deployment: str) -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")
    ]


def test_bearer_token_guards_the_inference_endpoints(fault_app: str) -> None:
    with httpx.Client(base_url=fault_app, timeout=60) as client:
        missing = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers=PNG)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        wrong = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers={**PNG, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert client.get("/v1/pipeline").status_code == 401
        assert client.get("/healthz").status_code == 200  # probes stay open
        good = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers={**PNG, **AUTH})
        assert good.status_code == 200
        assert good.headers.get("x-request-id")


def test_killing_a_classifier_replica_under_load_loses_no_request(fault_app: str) -> None:
    import ray
    from ray import serve

    (victim,) = _replica_actor_names("faults", "gender")
    body = ASTRONAUT.read_bytes()

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=fault_app, timeout=60) as client:
            async def one() -> httpx.Response:
                return await client.post("/v1/infer", content=body, headers={**PNG, **AUTH})

            first = await asyncio.gather(*(one() for _ in range(4)))
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            rest = await asyncio.gather(*(one() for _ in range(12)))
            return [*first, *rest]

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * len(responses)
    for r in responses:
        result = r.json()
        (face,) = result["objects"]
        assert face["attributes"]["emotion"]["label"] == "happy"  # the other classifier never suffers
        assert "gender" in face["attributes"] or result["errors"]["gender"]["code"] in ("failed", "timeout")

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve brings a new replica up
        names = _replica_actor_names("faults", "gender")
        if names and names != [victim] and serve.status().applications["faults"].deployments["gender"].status == "HEALTHY":
            break
        time.sleep(1)
    with httpx.Client(base_url=fault_app, timeout=60) as client:
        after = client.post("/v1/infer", content=body, headers={**PNG, **AUTH}).json()
    assert after["objects"][0]["attributes"]["gender"]["label"] == "female"
    assert after["errors"] == {}


@pytest.fixture(scope="module")
def failing_detector_app(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.app import build_app

    models = tmp_path_factory.mktemp("faulty-detector")
    # class 4, but only one class name: every real photo fails, while the blank health probe sees nothing
    rows = v8_rows([(3, 3, 1.6, 1.6, 4, 0.9)], num_classes=5)
    args = {
        "ingress": {"deployment": SMALL, "detector_timeout_s": 5},
        "detector": {
            "kind": "yolo",
            "yolo": {"model": str(constant_yolo(models / "y.onnx", rows, only_when_bright=True)), "input_width": 64, "input_height": 64,
                     "layout": "v8", "class_names": ["thing"]},
            "deployment": SMALL,
        },
        "classifiers": [],
    }
    serve.run(build_app(args), name="baddet", route_prefix="/baddet")
    yield f"{serve_url}/baddet"
    serve.delete("baddet")


def test_detector_failure_is_a_503_with_a_clear_message(failing_detector_app: str) -> None:
    with httpx.Client(base_url=failing_detector_app, timeout=60) as client:
        for _ in range(2):
            response = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers=PNG)
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "detector_unavailable"
            assert "model gave class 4, but only 1 class names are set" in error["message"]
        assert client.get("/healthz").status_code == 200  # the replica is alive; only its answers fail


def test_health_checks_fail_when_an_engine_is_broken(tmp_path: Path) -> None:
    from deployments.classifier import Classifier
    from engines import create_engine
    from serve_app.config import PipelineConfig

    config = PipelineConfig.model_validate(demo_args()).classifiers[1]  # gender
    replica = Classifier.func_or_class(config, "cpu")
    asyncio.run(replica.check_health())  # a working engine passes
    replica._stage._model.engine = create_engine("onnxruntime", broken_classifier(tmp_path / "b.onnx"))
    with pytest.raises(RuntimeError, match="gender: health probe failed"):
        asyncio.run(replica.check_health())


def test_detector_health_probe_runs_the_real_cascade(tmp_path: Path) -> None:
    from deployments.detector import Detector
    from engines import create_engine
    from serve_app.config import PipelineConfig

    replica = Detector.func_or_class(PipelineConfig.model_validate(demo_args()).detector, "cpu")
    asyncio.run(replica.check_health())
    replica._stage._model.pnet = create_engine("onnxruntime", broken_classifier(tmp_path / "b.onnx"))
    with pytest.raises(RuntimeError, match="detector: health probe failed"):
        asyncio.run(replica.check_health())
