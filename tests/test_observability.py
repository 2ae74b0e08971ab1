"""Metrics on Ray's Prometheus endpoint, and one request id through the logs of every deployment it touched."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from tests.images import ASTRONAUT

PNG = {"Content-Type": "image/png"}


def _scrape_until(url: str, patterns: list[str], timeout_s: float = 60.0) -> str:
    """Poll the Prometheus endpoint until every pattern appears (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(re.search(p, text, re.MULTILINE) for p in patterns):
            return text
        time.sleep(2)
    missing = [p for p in patterns if not re.search(p, text, re.MULTILINE)]
    raise AssertionError(f"metrics never showed {missing}")


def test_pipeline_metrics_reach_the_prometheus_endpoint(client: httpx.Client, metrics_port: int) -> None:
    for _ in range(3):
        assert client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers=PNG).status_code == 200
    assert client.post("/v1/infer", content=b"", headers=PNG).status_code == 400
    text = _scrape_until(
        f"http://127.0.0.1:{metrics_port}/metrics",
        [
            r'^ray_pipeline_requests_total\{.*route="/v1/infer".*status="200".*\} [1-9]',
            r'^ray_pipeline_requests_total\{.*status="400".*\} [1-9]',
            r'^ray_pipeline_stage_latency_ms_bucket\{.*stage="detector".*\}',
            r'^ray_pipeline_stage_latency_ms_count\{.*stage="emotion".*\} [1-9]',
            r"^ray_pipeline_objects_per_image_count\{.*\} [1-9]",
            r'^ray_pipeline_batch_size_count\{.*stage="gender".*\} [1-9]',
            r'^ray_pipeline_span_ms_count\{.*span="detector.transport".*\} [1-9]',
            r'^ray_pipeline_span_ms_count\{.*span="age.compute".*\} [1-9]',
            r'^ray_pipeline_compute_ms_count\{.*stage="detector".*\} [1-9]',
        ],
    )
    assert 'deployment="ingress"' in text


def test_request_id_is_returned_and_found_in_every_deployment_log(client: httpx.Client) -> None:
    import ray

    response = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers=PNG)
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f-]{16,}", request_id)
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
    wanted = {"ingress", "detector", "age", "gender", "emotion"}
    deadline = time.monotonic() + 20
    found: set[str] = set()
    while time.monotonic() < deadline and found != wanted:
        for path in logs.glob("replica_faces_*.log"):
            deployment = path.name.split("_")[2]
            if deployment in wanted and request_id in path.read_text(errors="replace"):
                found.add(deployment)
        time.sleep(1)
    assert found == wanted
