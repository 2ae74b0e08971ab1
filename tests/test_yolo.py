"""YOLO decoding through the real engine and pipeline, with small ONNX models whose outputs are known."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import yaml

from engines import EngineError, create_engine
from engines.yolo import Yolo, YoloParams, class_aware_nms, decode, infer_layout, letterbox
from tests.conftest import ROOT, deployed, without_streams
from tests.images import encode
from tests.onnx_models import constant_yolo, mean_colour_classifier, v8_rows


def test_letterbox_centres_and_maps_back() -> None:
    frame = np.zeros((960, 1280, 3), np.uint8)
    canvas, box = letterbox(frame, 640, 640)
    assert canvas.shape == (640, 640, 3)
    assert (box.scale, box.pad_x, box.pad_y) == (0.5, 0, 80)
    assert (canvas[:80] == 114).all() and (canvas[80:560] == 0).all() and (canvas[560:] == 114).all()
    np.testing.assert_allclose(box.to_original(np.array([[80, 180, 240, 300]], np.float32)), [[160, 200, 480, 440]])


def test_decode_v8_and_v5_agree_on_the_same_boxes() -> None:
    v8 = v8_rows([(32, 32, 16, 8, 1, 0.9), (10, 10, 4, 4, 0, 0.1)], num_classes=3)
    xyxy, score, cls = decode(v8, "v8", confidence=0.25)
    np.testing.assert_allclose(xyxy, [[24, 28, 40, 36]])
    assert score.tolist() == pytest.approx([0.9]) and cls.tolist() == [1]
    v5 = np.zeros((1, 2, 5 + 3), np.float32)
    v5[0, 0, :5] = (32, 32, 16, 8, 0.5)  # objectness 0.5 x class score 0.9
    v5[0, 0, 5 + 1] = 0.9
    v5[0, 1, :5] = (10, 10, 4, 4, 0.9)
    v5[0, 1, 5 + 2] = 0.2
    xyxy5, score5, cls5 = decode(v5, "v5", confidence=0.25)
    np.testing.assert_allclose(xyxy5, xyxy)
    assert score5.tolist() == pytest.approx([0.45]) and cls5.tolist() == [1]


def test_nms_is_class_aware() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert sorted(class_aware_nms(boxes, scores, np.array([0, 0, 1]), 0.5, 100).tolist()) == [0, 2]
    assert class_aware_nms(boxes, scores, np.array([0, 0, 0]), 0.5, 100).tolist() == [0]
    assert len(class_aware_nms(boxes, scores, np.array([0, 1, 2]), 0.5, 2)) == 2  # max_detections


@pytest.mark.parametrize(
    ("shape", "classes", "layout"),
    [((1, 84, 8400), 80, "v8"), ((1, 25200, 85), 80, "v5"), ((1, 84, 8400), None, "v8"), ((1, 6300, 7), 2, "v5")],
)
def test_layout_is_told_from_the_shape(shape: tuple, classes: int | None, layout: str) -> None:
    assert infer_layout(shape, classes, "m.onnx") == layout


@pytest.mark.parametrize(
    ("shape", "classes", "message"),
    [
        ((1, 84), 80, r"m\.onnx: output shape \[1, 84\] is not a YOLO output; supported: .*v8.*v5"),
        ((1, 90, 8400), 80, r"m\.onnx: output shape \[1, 90, 8400\] does not fit 80 classes"),
        ((1, "a", "b"), None, r"cannot tell the layout of output shape \[1, 'a', 'b'\]"),
    ],
)
def test_unsupported_output_shapes_fail_with_model_shape_and_layouts(shape: tuple, classes: int | None, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        infer_layout(shape, classes, "m.onnx")


def test_yolo_detects_through_onnxruntime_in_original_pixels(tmp_path: Path) -> None:
    rows = v8_rows([(160, 240, 160, 120, 2, 0.9), (165, 240, 160, 120, 2, 0.6), (480, 240, 80, 200, 0, 0.8)], 3)
    engine = create_engine("onnxruntime", constant_yolo(tmp_path / "y.onnx", rows, size=640))
    yolo = Yolo(engine, YoloParams(640, 640, ("person", "bicycle", "car")), "y.onnx")
    assert yolo.layout == "v8"
    dets = yolo.detect(np.zeros((960, 1280, 3), np.uint8))
    assert dets.labels == ["car", "person"]  # the second car box was suppressed
    np.testing.assert_allclose(dets.xyxy, [[160, 200, 480, 440], [880, 120, 1040, 520]], atol=1e-3)
    assert dets.confidence.tolist() == pytest.approx([0.9, 0.8])


def test_yolo_refuses_a_model_whose_output_does_not_fit(tmp_path: Path) -> None:
    engine = create_engine("onnxruntime", constant_yolo(tmp_path / "bad.onnx", np.zeros((1, 10, 10, 2)), size=64))
    with pytest.raises(EngineError, match=r"bad\.onnx: output shape \[1, 10, 10, 2\] is not a YOLO output"):
        Yolo(engine, YoloParams(64, 64, ("a",)), "bad.onnx")
    ok = create_engine("onnxruntime", constant_yolo(tmp_path / "ok.onnx", v8_rows([], 3), size=64))
    with pytest.raises(EngineError, match=r"input 'images' takes shape \[1, 3, 64, 64\], got \[1, 3, 640, 640\]"):
        Yolo(ok, YoloParams(640, 640, ("a", "b", "c")), "ok.onnx")


def vehicles_args(models: Path) -> dict:
    """examples/vehicles.yaml with its three user models replaced by stand-ins built here."""
    args = copy.deepcopy(yaml.safe_load((ROOT / "examples/vehicles.yaml").read_text())["applications"][0]["args"])
    classes = (ROOT / "examples/coco_classes.txt").read_text().split("\n")[:80]
    rows = v8_rows([(160, 240, 160, 120, classes.index("car"), 0.9), (480, 240, 80, 200, 0, 0.8)], 80)
    args["detector"]["yolo"]["model"] = str(constant_yolo(models / "yolo.onnx", rows, size=640))
    colour = str(mean_colour_classifier(models / "colour.onnx", size=224, sharpness=5.0))
    small = {"num_cpus": 0.1, "num_gpus": 0}
    for c in args["classifiers"]:
        c.update(model=colour, deployment=small)
        c.pop("labels_file")
    args["classifiers"][0]["labels"] = ["red", "green", "blue"]
    args["classifiers"][1]["labels"] = ["sedan", "suv", "van"]
    args["detector"]["deployment"] = small
    args["ingress"]["deployment"] = small
    return args


@pytest.fixture(scope="module")
def vehicles_app(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with deployed(serve_url, "vehicles", without_streams(vehicles_args(tmp_path_factory.mktemp("vehicles")))) as url:
        yield url


def test_example_vehicle_pipeline_classifies_only_vehicles(vehicles_app: str) -> None:
    frame = np.full((960, 1280, 3), 90, np.uint8)
    frame[200:440, 160:480] = (0, 0, 255)  # a red car where the detector puts it (BGR)
    frame[120:520, 880:1040] = (255, 0, 0)  # a blue person
    with httpx.Client(base_url=vehicles_app, timeout=60) as client:
        response = client.post("/v1/infer", content=encode(frame), headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        result = response.json()
        pipeline = client.get("/v1/pipeline").json()
    car, person = result["objects"]
    assert (car["label"], person["label"]) == ("car", "person")
    assert car["box"] == pytest.approx([160, 200, 480, 440], abs=0.1)
    assert car["attributes"]["color"]["label"] == "red" and car["attributes"]["color"]["score"] > 0.99
    assert [k["label"] for k in car["attributes"]["color"]["top_k"]] == ["red", "blue", "green"]
    # the stand-in type model is the colour model too: a red crop is its class 0, which the type labels call sedan
    # (its score differs: the example crops for `type` with other settings)
    assert car["attributes"]["type"]["label"] == "sedan"
    assert person["attributes"] == {}  # operate_on_labels keeps the classifiers off people
    assert result["errors"] == {}
    assert pipeline["detector"]["kind"] == "yolo" and pipeline["detector"]["layout"] == "v8"
    assert pipeline["classifiers"][0]["operate_on_labels"] == ["car", "bus", "truck", "motorcycle"]
    assert {c["backend"] for c in pipeline["classifiers"]} == {"onnxruntime"}


def test_example_config_fails_clearly_without_its_models() -> None:
    from pydantic import ValidationError

    from serve_app.config import PipelineConfig

    args = yaml.safe_load((ROOT / "examples/vehicles.yaml").read_text())["applications"][0]["args"]
    with pytest.raises(ValidationError, match="file not found: yolov8n.onnx"):
        PipelineConfig.model_validate(args)


def test_color_crop_letterbox_keeps_aspect() -> None:
    from engines.preprocess import CropSpec, crop_resize

    frame = np.zeros((100, 200, 3), np.uint8)
    frame[40:60, 50:150] = 255  # a 100x20 white bar
    crop = crop_resize(frame, np.array([[50, 40, 150, 60]], np.float32), CropSpec(10, 10, False, 0.0, True))[0]
    assert (crop[:4] == 0).all() and (crop[4:6] == 255).all() and (crop[6:] == 0).all()
    assert cv2.countNonZero(crop[..., 0]) == 20
