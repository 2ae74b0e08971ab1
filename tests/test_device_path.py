"""The GPU-resident image path through the HTTP API: layout `ingress` with the torch backend, images decoded into
the detector's device memory, detected, cropped and classified there (`ingress.frames_on_device`), against the
shipped service, which keeps frames on the host (ONNX Runtime, the numpy cascade). Here the device is the CPU (the
same code as on CUDA); the answers must be the host path's: the same faces, boxes within a pixel, the same
labels."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import demo_args, deployed, on_the_cpu_device, small
from tests.images import ASTRONAUT, collage, encode, many_faces, phone_photo

pytest.importorskip("onnx2torch")


def _on_the_device() -> dict[str, Any]:
    """The demo on the torch backend (the CPU device), layout ingress, frames kept on the device."""
    args = on_the_cpu_device(small(demo_args()))
    # as examples/faces_gpu.yaml runs it: the ingress's code on the replica's own event loop
    args["ingress"]["deployment"]["env_vars"] = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    args["ingress"]["detector_timeout_s"] = 60.0  # the torch cascade on 2 busy CPU cores, a batch of requests
    args["ingress"]["streams"] = {"enabled": False}
    return args


@pytest.fixture(scope="module")
def apps(serve_url: str, demo_app: str) -> Iterator[tuple[str, str]]:
    """The device path, and the shipped service (frames on the host) as the reference."""
    with deployed(serve_url, "ondevice", _on_the_device()) as device:
        yield device, demo_app


def _infer(base: str, body: bytes, content_type: str) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=120) as client:
        answer = client.post("/v1/infer", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_pipeline_says_where_frames_are(apps: tuple[str, str]) -> None:
    device, host = apps
    assert httpx.get(f"{device}/v1/pipeline", timeout=60).json()["frames"] == "cpu"
    assert httpx.get(f"{host}/v1/pipeline", timeout=60).json()["frames"] == "host"


@pytest.mark.parametrize("name", ["astronaut", "collage", "eight-faces", "phone-jpeg-6", "phone-png-8"])
def test_frames_on_the_device_give_the_host_paths_answer(apps: tuple[str, str], name: str) -> None:
    image = {"astronaut": ASTRONAUT.read_bytes(), "collage": encode(collage(), ".jpg"),
             "eight-faces": encode(many_faces(), ".jpg"), "phone-jpeg-6": phone_photo(collage(), 6),
             "phone-png-8": phone_photo(collage(), 8, "PNG")}[name]
    kind = "image/png" if name in ("astronaut", "phone-png-8") else "image/jpeg"
    device, host = (_infer(base, image, kind) for base in apps)
    assert device["image"] == host["image"] and device["errors"] == host["errors"] == {}
    assert len(device["objects"]) == len(host["objects"]) >= 1
    for ours, theirs in zip(device["objects"], host["objects"]):
        assert np.allclose(ours["box"], theirs["box"], atol=1.0), (ours["box"], theirs["box"])
        for attribute in ("gender", "emotion"):
            assert ours["attributes"][attribute]["label"] == theirs["attributes"][attribute]["label"]
        assert abs(ours["attributes"]["age"]["value"] - theirs["attributes"]["age"]["value"]) < 1.0


def test_annotate_copies_the_frame_back_once_and_draws_it(apps: tuple[str, str]) -> None:
    import cv2

    with httpx.Client(base_url=apps[0], timeout=120) as client:
        drawn = client.post("/v1/annotate", content=encode(collage(), ".jpg"), headers={"Content-Type": "image/jpeg"})
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(drawn.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == collage().shape


def test_undecodable_bytes_with_a_good_header_are_a_400(apps: tuple[str, str]) -> None:
    header_only = encode(collage(), ".png")[:200]
    with httpx.Client(base_url=apps[0], timeout=60) as client:
        answer = client.post("/v1/infer", content=header_only, headers={"Content-Type": "image/png"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "undecodable_image"
        assert client.post("/v1/infer", content=ASTRONAUT.read_bytes(),
                           headers={"Content-Type": "image/png"}).status_code == 200


def test_concurrent_requests_batched_on_the_device_each_get_their_own_answer(apps: tuple[str, str]) -> None:
    """Four requests at once (their JPEGs decoded together, their crops cut together): each answer is the one its
    image gets alone."""
    import asyncio

    images = [encode(collage(), ".jpg"), phone_photo(collage(), 6)]
    alone = [_infer(apps[0], image, "image/jpeg") for image in images]

    async def at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=apps[0], timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/infer", content=images[i % 2],
                                                      headers={"Content-Type": "image/jpeg"}) for i in range(4)))

    for i, response in enumerate(asyncio.run(at_once())):
        assert response.status_code == 200, response.text
        got, expected = response.json(), alone[i % 2]
        assert got["image"] == expected["image"] and len(got["objects"]) == len(expected["objects"])
        for ours, theirs in zip(got["objects"], expected["objects"]):
            assert ours["box"] == theirs["box"] and ours["attributes"] == theirs["attributes"]


def test_the_stage_by_stage_path_gives_the_whole_pass_answer(serve_url: str, apps: tuple[str, str]) -> None:
    """`ingress.device_pass: stages` (decodes and crops batched on their own, the detector and classifiers in their
    stages) through HTTP: a JPEG and an EXIF-8 PNG (decoded by OpenCV, then uploaded) give the whole pass's answer."""
    args = _on_the_device()
    args["ingress"]["device_pass"] = "stages"
    images = [(encode(collage(), ".jpg"), "image/jpeg"), (phone_photo(collage(), 8, "PNG"), "image/png")]
    with deployed(serve_url, "stagewise", args) as stages:
        for body, kind in images:
            ours, whole = _infer(stages, body, kind), _infer(apps[0], body, kind)
            assert ours["image"] == whole["image"] and len(ours["objects"]) == len(whole["objects"]) == 3
            for a, b in zip(ours["objects"], whole["objects"]):
                assert np.allclose(a["box"], b["box"], atol=0.1)
                assert a["attributes"]["gender"]["label"] == b["attributes"]["gender"]["label"]
                assert abs(a["attributes"]["age"]["value"] - b["attributes"]["age"]["value"]) < 0.1
