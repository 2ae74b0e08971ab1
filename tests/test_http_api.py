"""The face demo served by Ray Serve on 127.0.0.1, exercised over real HTTP with real models."""

from __future__ import annotations

import time

import cv2
import httpx
import numpy as np

from tests.images import ASTRONAUT, NO_FACE, collage, encode, read

PNG = {"Content-Type": "image/png"}


def infer(client: httpx.Client, body: bytes, headers: dict[str, str] | None = None, **params: str) -> dict:
    response = client.post("/v1/infer", content=body, headers=headers or PNG, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_astronaut_gets_one_face_with_every_attribute(client: httpx.Client) -> None:
    result = infer(client, ASTRONAUT.read_bytes())
    assert result["image"] == {"width": 512, "height": 512}
    assert result["errors"] == {}
    assert len(result["objects"]) == 1
    face = result["objects"][0]
    assert face["label"] == "face"
    assert face["score"] > 0.99
    x1, y1, x2, y2 = face["box"]
    assert 160 < x1 < x2 < 290 and 40 < y1 < y2 < 200  # her face, in original pixels
    assert len(face["landmarks"]) == 5
    attributes = face["attributes"]
    assert attributes["gender"]["label"] == "female" and attributes["gender"]["score"] > 0.9
    assert attributes["emotion"]["label"] == "happy" and attributes["emotion"]["score"] > 0.9
    assert 22 <= attributes["age"]["value"] <= 40  # she was 30-ish; the age model is coarse
    assert list(attributes) == ["age", "gender", "emotion"]  # config order
    assert set(result["timings_ms"]) == {"detector", "age", "gender", "emotion", "total"}
    assert result["mode"] == "parallel"


def test_collage_returns_each_face(client: httpx.Client) -> None:
    result = infer(client, encode(collage(), ".jpg"), {"Content-Type": "image/jpeg"})
    faces = sorted(result["objects"], key=lambda o: o["box"][0])
    assert len(faces) == 3
    for tile, face in enumerate(faces):  # one face per 512-pixel tile
        assert tile * 512 <= face["box"][0] < face["box"][2] <= (tile + 1) * 512
        assert set(face["attributes"]) == {"age", "gender", "emotion"}
    assert [f["attributes"]["gender"]["label"] for f in faces[:2]] == ["female", "female"]
    assert [f["attributes"]["emotion"]["label"] for f in faces[:2]] == ["happy", "happy"]


def test_a_huge_upload_is_answered_in_its_own_pixels_with_the_same_faces(client: httpx.Client) -> None:
    """A 6144x2048 PNG (12.6 Mpx: decoded off the loop, the detector given it at its working side): the same three
    faces as the 1536x512 collage, their boxes in the upload's pixels, their attributes as before."""
    small = collage()
    big = cv2.resize(small, (small.shape[1] * 4, small.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
    reference = sorted(infer(client, encode(small, ".png"))["objects"], key=lambda o: o["box"][0])
    result = infer(client, encode(big, ".png"))
    assert result["image"] == {"width": 6144, "height": 2048} and result["errors"] == {}
    faces = sorted(result["objects"], key=lambda o: o["box"][0])
    assert len(faces) == len(reference) == 3
    for face, ref in zip(faces, reference):
        expected = np.array(ref["box"]) * 4
        side = expected[2] - expected[0]
        assert np.all(np.abs(np.array(face["box"]) - expected) <= 0.1 * side)  # within a tenth of the face
        assert face["attributes"]["gender"]["label"] == ref["attributes"]["gender"]["label"]


def test_photo_without_faces_returns_none(client: httpx.Client) -> None:
    result = infer(client, NO_FACE.read_bytes(), {"Content-Type": "image/jpeg"})
    assert result["objects"] == []
    assert result["errors"] == {}
    assert result["image"] == {"width": 600, "height": 400}


def test_sequential_and_parallel_give_identical_objects(client: httpx.Client) -> None:
    body = encode(collage(), ".png")
    parallel = infer(client, body, mode="parallel")
    sequential = infer(client, body, mode="sequential")
    assert sequential["mode"] == "sequential"
    assert parallel["objects"] == sequential["objects"]


def test_multipart_upload_and_octet_stream(client: httpx.Client) -> None:
    body = ASTRONAUT.read_bytes()
    multipart = client.post("/v1/infer", files={"image": ("astronaut.png", body, "image/png")})
    assert multipart.status_code == 200, multipart.text
    raw = infer(client, body, {"Content-Type": "application/octet-stream"})
    assert multipart.json()["objects"] == raw["objects"]


def test_annotate_returns_a_jpeg_of_the_same_size(client: httpx.Client) -> None:
    response = client.post("/v1/annotate", content=ASTRONAUT.read_bytes(), headers=PNG)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    drawn = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == (512, 512, 3)
    original = read(ASTRONAUT)
    # the box is drawn in green on her face's outline; elsewhere the image is the original (JPEG noise aside)
    assert np.abs(drawn.astype(int) - original.astype(int)).mean() > 0.5
    assert np.abs(drawn[400:, :100].astype(int) - original[400:, :100].astype(int)).mean() < 6


def test_pipeline_describes_four_model_deployments(client: httpx.Client) -> None:
    response = client.get("/v1/pipeline")
    assert response.status_code == 200
    pipeline = response.json()
    assert pipeline["mode"] == "parallel"
    assert pipeline["detector"]["kind"] == "mtcnn"
    assert [c["name"] for c in pipeline["classifiers"]] == ["age", "gender", "emotion"]
    for stage in [pipeline["detector"], *pipeline["classifiers"]]:
        assert stage["backend"] == "onnxruntime"
        assert stage["device"] == "cpu"  # no GPU here: the GPU-fraction config fell back to CPU
    assert pipeline["classifiers"][0]["operate_on_labels"] == ["face"]


def test_serve_status_lists_every_deployment(demo_app: str) -> None:
    from ray import serve

    app = serve.status().applications["faces"]
    assert app.status == "RUNNING"
    assert set(app.deployments) == {"ingress", "detector", "age", "gender", "emotion", "streams"}


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "layout": "separate", "deployments": 6}


def test_trace_says_where_each_request_spent_its_time(client: httpx.Client) -> None:
    """The spans lie on one timeline: the client saw at least what the ingress measured, the classifiers start
    after the detector answered, and the ingress's total holds the detector, the crops and the fan-out in turn;
    each stage's queue and compute fit inside its own time (its round trip minus what the hop cost)."""
    body = ASTRONAUT.read_bytes()
    assert "trace" not in infer(client, body)  # only on request
    started = time.perf_counter()
    trace = infer(client, body, trace="true")["trace"]
    client_ms = (time.perf_counter() - started) * 1e3
    assert client_ms >= trace["total_ms"]
    assert set(trace["classifiers"]) == {"age", "gender", "emotion"}
    detector = trace["detector"]
    for call in (detector, *trace["classifiers"].values()):
        assert call["compute_ms"] > 0 and call["batch_size"] >= 1
        assert call["transport_ms"] >= 0 and call["queue_ms"] >= 0
        handler_ms = call["round_trip_ms"] - call["transport_ms"]  # what the stage itself measured
        assert handler_ms >= call["queue_ms"] + call["compute_ms"] - 0.05  # rounding of each part
        assert call["start_ms"] >= detector["start_ms"]
    for call in trace["classifiers"].values():  # the crops need the detections
        assert call["start_ms"] >= detector["start_ms"] + detector["round_trip_ms"]
    assert trace["total_ms"] >= detector["start_ms"] + detector["round_trip_ms"] + trace["crop_ms"] + trace["classify_ms"]


def _intervals(trace: dict) -> list[tuple[float, float]]:
    return sorted((c["start_ms"], c["start_ms"] + c["round_trip_ms"]) for c in trace["classifiers"].values())


def test_classifier_calls_are_in_flight_together_in_parallel_mode_only(client: httpx.Client) -> None:
    body = encode(collage(), ".jpg")
    parallel = _intervals(infer(client, body, {"Content-Type": "image/jpeg"}, trace="true")["trace"])
    assert len(parallel) == 3
    assert max(start for start, _ in parallel) < min(end for _, end in parallel)  # all three out at once
    sequential = _intervals(infer(client, body, {"Content-Type": "image/jpeg"}, trace="true", mode="sequential")["trace"])
    for (_, end), (next_start, _) in zip(sequential, sequential[1:]):
        assert next_start >= end  # one after another: each waits for the previous answer


def test_openapi_document_describes_the_real_api_and_docs_work_offline(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    infer_body = document["paths"]["/v1/infer"]["post"]["requestBody"]["content"]
    assert {"image/*", "application/octet-stream", "multipart/form-data"} <= set(infer_body)
    assert infer_body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert "requestBody" in document["paths"]["/v1/annotate"]["post"]
    pipeline = document["paths"]["/v1/pipeline"]["get"]
    assert not pipeline.get("parameters"), pipeline.get("parameters")  # no stray `authorization` parameter
    assert pipeline["security"] == [{"bearer": []}, {}]
    assert "503" in document["paths"]["/healthz"]["get"]["responses"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn.jsdelivr.net" not in page.text  # nothing fetched from the internet
    script = next(part.split('"')[0] for part in page.text.split("src=\"")[1:] if "swagger-ui-bundle" in part)
    bundle = client.get(script)
    assert bundle.status_code == 200 and len(bundle.content) > 500_000


def test_unknown_paths_and_methods_get_the_one_error_shape(client: httpx.Client) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/v1/infer")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
