"""A failing or slow classifier costs only its own attribute: the caller gets the rest plus an error."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import demo_args, deployed, without_streams
from tests.images import ASTRONAUT
from tests.onnx_models import fails_on_bright_classifier


@pytest.fixture(scope="module")
def faulty_app(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = demo_args()
    small = {"num_cpus": 0.1, "num_gpus": 0}
    gender = next(c for c in args["classifiers"] if c["name"] == "gender")
    broken = {
        **gender,
        "name": "broken",
        "model": str(fails_on_bright_classifier(tmp_path_factory.mktemp("models") / "broken.onnx")),
    }
    hurried = {**gender, "name": "hurried", "timeout_s": 0.001}  # no Serve hop answers within 1 ms
    config = {
        "ingress": {"deployment": small},
        "detector": {**args["detector"], "deployment": small},
        "classifiers": [{**c, "deployment": small} for c in (gender, broken, hurried)],
    }
    with deployed(serve_url, "faulty", without_streams(config)) as url:
        yield url


def test_failing_and_timed_out_classifiers_do_not_lose_the_others(faulty_app: str) -> None:
    from ray import serve

    with httpx.Client(base_url=faulty_app, timeout=60.0) as client:
        for _ in range(2):  # and the failure does not take the replica down
            response = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            result = response.json()
            (face,) = result["objects"]
            assert face["attributes"] == {"gender": {"label": "female", "score": pytest.approx(0.9999, abs=1e-3)}}
            assert result["errors"]["broken"]["code"] == "failed"
            message = result["errors"]["broken"]["message"]
            assert "reshape" in message.lower()
            assert "onnxruntime_src" not in message and "Traceback" not in message  # no source paths leak
            assert result["errors"]["hurried"] == {"code": "timeout", "message": "no answer within 0.001 s"}
            assert set(result["timings_ms"]) >= {"detector", "gender", "broken", "hurried", "total"}
    status = serve.status().applications["faulty"]
    assert status.status == "RUNNING"
    assert status.deployments["broken"].status == "HEALTHY"
