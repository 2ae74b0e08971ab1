"""The engines in one process: MTCNN on real photos, classifier post-processing and batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines import Classifications, Detections, EngineError, create_engine
from engines.classifier import ClassifierModel, OutputSpec, postprocess
from engines.mtcnn import Mtcnn, nms, nms_min, pyramid_scales
from engines.preprocess import CropSpec, Normalization, crop_resize
from tests.images import ASTRONAUT, NO_FACE, collage, read

MODELS = Path(__file__).resolve().parent.parent / "models"
MEANS = (122.782, 117.001, 104.298)


@pytest.fixture(scope="module")
def mtcnn() -> Mtcnn:
    return Mtcnn(*(create_engine("onnxruntime", MODELS / f"mtcnn_{n}.onnx") for n in ("pnet", "rnet", "onet")))


def test_mtcnn_finds_the_astronaut_and_her_landmarks(mtcnn: Mtcnn) -> None:
    faces = mtcnn.detect(read(ASTRONAUT))
    assert len(faces) == 1 and faces.labels == ["face"]
    x1, y1, x2, y2 = faces.xyxy[0]
    assert 170 < x1 < 190 and 50 < y1 < 70 and 260 < x2 < 280 and 165 < y2 < 185
    eyes, nose, mouth = faces.landmarks[0, :2], faces.landmarks[0, 2], faces.landmarks[0, 3:]
    assert eyes[0, 0] < eyes[1, 0]  # left eye left of right eye
    assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()  # eyes above nose above mouth


def test_mtcnn_on_collage_and_on_no_face(mtcnn: Mtcnn) -> None:
    assert len(mtcnn.detect(collage())) == 3
    empty = mtcnn.detect(read(NO_FACE))
    assert len(empty) == 0 and empty.landmarks is not None and empty.landmarks.shape == (0, 5, 2)


def test_mtcnn_batch_of_frames_gives_each_frame_its_own_faces(mtcnn: Mtcnn) -> None:
    frames = [read(ASTRONAUT), read(NO_FACE), collage(), read(ASTRONAUT)[:, ::-1].copy()]
    batched = mtcnn.detect_batch(frames)  # R-Net and O-Net see every frame's candidates at once
    assert [len(d) for d in batched] == [1, 0, 3, 1]
    for alone, together in zip([mtcnn.detect(f) for f in frames], batched, strict=True):
        np.testing.assert_allclose(together.xyxy, alone.xyxy, atol=1e-3)
        np.testing.assert_allclose(together.confidence, alone.confidence, atol=1e-5)
        np.testing.assert_allclose(together.landmarks, alone.landmarks, atol=1e-3)


def test_pyramid_and_nms() -> None:
    scales = pyramid_scales(100, 200, min_face_size=20, factor=0.5)
    assert scales == pytest.approx([0.6, 0.3, 0.15])  # 12/20, halved while 100 * scale >= 12
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    inner = np.array([[0, 0, 100, 100], [10, 10, 30, 30]], np.float32)  # IoU small, but fully inside
    assert nms(inner, scores[:2], 0.5).tolist() == [0, 1]
    assert nms_min(inner, scores[:2], 0.7).tolist() == [0]


def test_postprocess_softmax_threshold_and_expected_value() -> None:
    probs = np.array([[0.1, 0.9], [0.6, 0.4]], np.float32)
    result = postprocess(probs, OutputSpec("softmax", labels=("a", "b"), threshold=0.7))
    assert result.class_id.tolist() == [1, 0]
    assert result.attribute(0) == {"label": "b", "score": 0.9}
    assert result.attribute(1) is None  # 0.6 < threshold: no attribute
    ev = postprocess(probs, OutputSpec("expected_value", values=(10.0, 20.0)))
    assert ev.attribute(0) == {"value": 19.0} and ev.attribute(1) == {"value": 14.0}
    logits = postprocess(np.array([[0.0, np.log(3.0)]], np.float32), OutputSpec("softmax", ("a", "b"), apply_softmax=True))
    assert logits.score[0] == pytest.approx(0.75)
    with pytest.raises(EngineError, match="returned 2 classes, config names 3"):
        postprocess(probs, OutputSpec("softmax", labels=("a", "b", "c")))


def test_classifier_batches_in_chunks_with_identical_results(mtcnn: Mtcnn) -> None:
    image = collage()
    faces = mtcnn.detect(image)
    crops = crop_resize(image, faces.xyxy, CropSpec(32, 32)).repeat(3, axis=0)  # 9 crops

    def model(max_batch: int) -> ClassifierModel:
        return ClassifierModel(
            create_engine("onnxruntime", MODELS / "gender.onnx"),
            Normalization("RGB", 1 / 256, MEANS),
            OutputSpec("softmax", labels=("female", "male")),
            max_batch,
        )

    whole, chunked = model(32).predict(crops), model(2).predict(crops)
    assert len(whole) == 9
    np.testing.assert_array_equal(whole.class_id, chunked.class_id)
    np.testing.assert_allclose(whole.score, chunked.score, rtol=1e-5)
    assert whole.labels == ("female", "male") and whole.class_id[:2].tolist() == [0, 0]
    assert len(model(4).predict(crops[:0])) == 0


def test_classifier_refuses_a_geometry_its_model_cannot_take() -> None:
    model = ClassifierModel(
        create_engine("onnxruntime", MODELS / "emotion.onnx"),
        Normalization("RGB", 1.0, (0.0, 0.0, 0.0)),  # emotion wants 1 grey channel
        OutputSpec("softmax", labels=tuple("abcdefg")),
        8,
    )
    with pytest.raises(EngineError, match=r"takes shape \['batch', 1, 64, 64\], got \[1, 3, 64, 64\]"):
        model.check_geometry(64, 64)


def test_detections_select_filters_by_label_and_size() -> None:
    dets = Detections(
        np.array([[0, 0, 10, 10], [0, 0, 50, 40], [0, 0, 60, 60]], np.float32),
        np.array([0.9, 0.8, 0.7], np.float32),
        np.array([0, 1, 0], np.int32),
        ("face", "car"),
    )
    assert dets.select().tolist() == [0, 1, 2]
    assert dets.select(frozenset({"face"})).tolist() == [0, 2]
    assert dets.select(None, min_width=20, min_height=50).tolist() == [2]
    assert dets[dets.select(frozenset({"car"}))].labels == ["car"]


def test_classifications_split_and_concatenate_round_trip() -> None:
    c = Classifications(
        "expected_value",
        np.arange(5, dtype=np.int32),
        np.linspace(0, 1, 5, dtype=np.float32),
        np.ones(5, bool),
        np.arange(5, dtype=np.float32) * 2,
    )
    parts = c.split([2, 0, 3])
    assert [len(p) for p in parts] == [2, 0, 3]
    again = Classifications.concatenate(parts)
    np.testing.assert_array_equal(again.value, c.value)
    np.testing.assert_array_equal(again.class_id, c.class_id)


def test_missing_model_and_unknown_backend_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="model file not found"):
        create_engine("onnxruntime", tmp_path / "none.onnx")
    with pytest.raises(EngineError, match="unknown backend 'openvino'"):
        create_engine("openvino", MODELS / "gender.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="cannot load ONNX model bad.onnx"):
        create_engine("onnxruntime", bad)


def test_vector_and_top_k_outputs() -> None:
    raw = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    vectors = postprocess(raw, OutputSpec("vector", normalize=True))
    np.testing.assert_allclose(vectors.vector, [[0.6, 0.8], [0.0, 1.0]])
    assert vectors.attribute(0) == {"vector": [0.6, 0.8]}
    probs = np.array([[0.2, 0.5, 0.3]], np.float32)
    top = postprocess(probs, OutputSpec("softmax", labels=("a", "b", "c"), top_k=2))
    assert top.attribute(0) == {
        "label": "b",
        "score": 0.5,
        "top_k": [{"label": "b", "score": 0.5}, {"label": "c", "score": 0.3}],
    }
    again = Classifications.concatenate(top.split([1, 0]))
    np.testing.assert_array_equal(again.top_class_id, top.top_class_id)


def test_batch_buckets_pad_and_results_are_unchanged() -> None:
    from engines.batching import bucket, buckets, pad_batch

    assert [bucket(n, 32) for n in (1, 2, 3, 5, 17, 32, 40)] == [1, 2, 4, 8, 32, 32, 40]
    assert buckets(32) == [1, 2, 4, 8, 16, 32] and buckets(24) == [1, 2, 4, 8, 16, 24]
    assert pad_batch(np.ones((3, 2), np.float32), 32).shape == (4, 2)
    engine = create_engine("onnxruntime", MODELS / "gender.onnx")
    crops = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)

    def model(pad: bool) -> ClassifierModel:
        return ClassifierModel(engine, Normalization("RGB", 1 / 256, MEANS), OutputSpec("softmax", ("f", "m")), 8, pad)

    padded, plain = model(True), model(False)
    padded.warm_up(32, 32)
    np.testing.assert_allclose(padded.predict(crops).score, plain.predict(crops).score, rtol=1e-5)
    detector = Mtcnn(*(create_engine("onnxruntime", MODELS / f"mtcnn_{n}.onnx") for n in ("pnet", "rnet", "onet")),
                     pad_batches=True)
    np.testing.assert_allclose(detector.detect(read(ASTRONAUT)).xyxy, mtcnn_plain_boxes(), atol=1e-3)


def mtcnn_plain_boxes() -> np.ndarray:
    plain = Mtcnn(*(create_engine("onnxruntime", MODELS / f"mtcnn_{n}.onnx") for n in ("pnet", "rnet", "onet")))
    return plain.detect(read(ASTRONAUT)).xyxy


def test_tracker_keeps_ids_per_object_and_counts_from_one_per_video() -> None:
    from engines.tracking import Tracker

    def frame(f: int) -> Detections:
        boxes = np.array([[10 + 5 * f, 10, 60 + 5 * f, 60], [200, 200, 250, 250]], np.float32)[: 1 if f < 2 else 2]
        return Detections(boxes[::-1].copy(), np.full(len(boxes), 0.99, np.float32), np.zeros(len(boxes), np.int32),
                          ("face",))

    for _ in range(2):  # a second tracker in the same process starts at 1 again
        tracker = Tracker()
        ids = [tracker.update(frame(f)).tolist() for f in range(5)]
        assert ids == [[1], [1], [-1, 1], [2, 1], [2, 1]]  # the newcomer is confirmed on its second frame


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_closed_engine_has_let_go_and_refuses_to_run(backend: str) -> None:
    """load, run, close: after close the engine holds no session or module and says so when called."""
    pytest.importorskip("onnx2torch") if backend == "torch" else None
    from engines import EngineError, create_engine

    engine = create_engine(backend, MODELS / "gender.onnx", "cpu")
    x = np.zeros((1, 3, 32, 32), np.float32)
    engine.run_single(x)
    engine.close()
    engine.close()  # idempotent
    assert getattr(engine, "_session", None) is None and getattr(engine, "_module", None) is None
    with pytest.raises(EngineError, match="closed"):
        engine.run_single(x)


def test_a_stopping_replica_closes_its_stage_and_engines() -> None:
    """Serve calls a replica's __del__ when it stops; the model deployments close their stage there."""
    from deployments.classifier import Classifier
    from deployments.config import ClassifierConfig
    from tests.conftest import demo_args

    config = ClassifierConfig.model_validate(next(c for c in demo_args()["classifiers"] if c["name"] == "gender"))
    replica = Classifier.func_or_class(config, "cpu")
    engine = replica._stage._model.engine
    assert engine._session is not None
    replica.__del__()
    assert engine._session is None
