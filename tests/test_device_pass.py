"""Layout ingress's whole pass on the device (serve_app/device_pass.py), on the CPU device with the real models
through the torch backend: the requests that arrive together go through decode, detect, crop and classify as one
batch, and each gets what the stage-by-stage graph gives it alone; a classifier that fails or is late costs only
its attribute (and its dependents', which say why)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2torch")

from deployments.stages import ClassifierStage, DetectorStage  # noqa: E402
from engines.device_image import DeviceDecoder  # noqa: E402
from serve_app.config import PipelineConfig  # noqa: E402
from serve_app.decoding import InputError  # noqa: E402
from serve_app.device_frames import device_pass  # noqa: E402
from serve_app.device_pass import DevicePass  # noqa: E402
from serve_app.graph import ClassifierRoute, DetectorUnavailable, GraphResult, InferenceGraph  # noqa: E402
from tests.conftest import ROOT, on_the_cpu_device  # noqa: E402
from tests.images import ASTRONAUT, collage, encode, many_faces, phone_photo  # noqa: E402


def _chain_on_the_device(timeouts: dict[str, float] | None = None, **extra_classifiers: dict[str, Any]
                         ) -> PipelineConfig:
    """examples/chain.yaml (age and gender on every face, emotion on the faces gender calls female) in layout
    ingress, every model on the torch backend on the CPU device, frames kept there; `timeouts` by classifier,
    `extra_classifiers` after them (gender's settings with labels a and b, and these)."""
    args = on_the_cpu_device(yaml.safe_load((ROOT / "examples/chain.yaml").read_text())["applications"][0]["args"])
    for classifier in args["classifiers"]:
        classifier["timeout_s"] = (timeouts or {}).get(classifier["name"], 60.0)  # 60 s: 2 busy CPU cores
    args.setdefault("ingress", {})["detector_timeout_s"] = 60.0
    for name, classifier in extra_classifiers.items():
        args["classifiers"].append({**copy.deepcopy(args["classifiers"][1]), "labels": ["a", "b"], "name": name,
                                    **classifier})
        args["classifiers"][-1].pop("labels_file")
    return PipelineConfig.model_validate(args)


class _Counted:
    """Each stage's engine batches, in items, as the deployments' metrics see them."""

    def __init__(self) -> None:
        self.batches: dict[str, list[int]] = {}

    def of(self, name: str) -> Any:
        return lambda size, _ms: self.batches.setdefault(name, []).append(size)


class _Pipeline:
    """The stages of one config, the whole pass over them and the stage-by-stage graph over the same stages."""

    def __init__(self, config: PipelineConfig) -> None:
        self.counted = _Counted()
        self.detector = DetectorStage(config.detector, "cpu", shared=True, on_batch=self.counted.of("detector"))
        self.classifiers = {c.name: ClassifierStage(c, "cpu", shared=True, on_batch=self.counted.of(c.name))
                            for c in config.classifiers}
        self.decodes: list[int] = []
        decoder = DeviceDecoder("cpu")
        decode_many = decoder.decode_many
        decoder.decode_many = lambda images: (self.decodes.append(len(images)), decode_many(images))[1]  # type: ignore[method-assign]
        # built as the ingress builds it, from the config, over these stages
        whole = device_pass(config, SimpleNamespace(detector=self.detector, classifiers=self.classifiers), decoder)
        assert isinstance(whole, DevicePass)
        self.whole = whole
        self.graph = InferenceGraph(self.detector, [ClassifierRoute.from_config(c, self.classifiers[c.name])
                                                    for c in config.classifiers], 60.0)

    def alone(self, image: bytes) -> GraphResult:
        """The stage-by-stage graph's answer for one image (decoded by itself on the same device)."""
        frame = DeviceDecoder("cpu").decode(image)
        return asyncio.run(self.graph.run(frame, "parallel"))

    def close(self) -> None:
        self.whole.close()
        for stage in (self.detector, *self.classifiers.values()):
            stage.close()


@pytest.fixture(scope="module")
def chain() -> Iterator[_Pipeline]:
    pipeline = _Pipeline(_chain_on_the_device())
    yield pipeline
    pipeline.close()


def _same(ours: GraphResult, theirs: GraphResult) -> None:
    """The same faces (batched arithmetic may differ in the last float bits) and the same attributes."""
    assert np.allclose(ours.detections.xyxy, theirs.detections.xyxy, atol=0.01)
    assert ours.errors == theirs.errors == {}
    assert list(ours.outputs) == list(theirs.outputs)
    for name, (indices, result) in ours.outputs.items():
        their_indices, their_result = theirs.outputs[name]
        assert np.array_equal(indices, their_indices), name
        for row in range(len(indices)):
            mine, expected = result.attribute(row), their_result.attribute(row)
            assert (mine is None) == (expected is None), name
            if mine is not None and "value" in mine:
                assert mine["value"] == pytest.approx(expected["value"], abs=1e-3)
            elif mine is not None:
                assert mine["label"] == expected["label"] and mine["score"] == pytest.approx(expected["score"], abs=1e-4)


def test_requests_that_arrive_together_go_through_one_pass_each_with_its_own_answer(chain: _Pipeline) -> None:
    images = [encode(collage(), ".jpg"), phone_photo(collage(), 6), encode(many_faces(), ".jpg"),
              encode(collage()[:300], ".jpg"), phone_photo(many_faces(), 8)]

    async def together() -> list[GraphResult]:
        return list(await asyncio.gather(*(chain.whole.run(image) for image in images)))

    chain.decodes.clear()
    chain.counted.batches.clear()
    results = asyncio.run(together())
    # five requests at once: one nvJPEG call and one detector batch for all of them, one engine batch per classifier
    assert chain.decodes == [5] and chain.counted.batches["detector"] == [5]
    faces = sum(len(r.detections) for r in results)
    assert chain.counted.batches["age"] == chain.counted.batches["gender"] == [faces]
    females = sum(1 for r in results for row in range(len(r.outputs["gender"][0]))
                  if (r.outputs["gender"][1].attribute(row) or {}).get("label") == "female")
    assert chain.counted.batches["emotion"] == [females] and 0 < females < faces  # only the faces gender chose
    for image, result in zip(images, results):
        _same(result, chain.alone(image))
        assert result.calls["detector"].timing.batch_size == 5


def test_a_png_decoded_beforehand_joins_the_pass_as_a_device_frame(chain: _Pipeline) -> None:
    frame = DeviceDecoder("cpu").decode(ASTRONAUT.read_bytes())
    _same(asyncio.run(chain.whole.run(frame)), chain.alone(ASTRONAUT.read_bytes()))


def test_only_the_chosen_classifiers_and_their_parents_run(chain: _Pipeline) -> None:
    result = asyncio.run(chain.whole.run(encode(collage(), ".jpg"), only={"gender", "emotion"}))
    assert list(result.outputs) == ["gender", "emotion"] and "age" not in result.timings_ms


def test_bytes_that_will_not_decode_are_the_clients_error_and_the_others_of_the_batch_are_answered(
        chain: _Pipeline) -> None:
    async def together() -> list[Any]:
        return list(await asyncio.gather(chain.whole.run(b"\xff\xd8\xff\xe0 not a jpeg"),
                                         chain.whole.run(encode(collage(), ".jpg")), return_exceptions=True))

    refused, answered = asyncio.run(together())
    assert isinstance(refused, InputError) and refused.code == "undecodable_image"
    assert isinstance(answered, GraphResult) and len(answered.detections) == 3


@pytest.mark.parametrize("when", ["launch", "wait"])
def test_a_failing_classifier_costs_its_attribute_and_its_dependents_say_why(when: str, monkeypatch: Any) -> None:
    """`broken` (gender's model) fails as an engine fails, when its batch is handed over or when it is read
    (a CUDA error surfaces at the next sync); `orphan` is chained on it."""
    pipeline = _Pipeline(_chain_on_the_device(broken={}, orphan={"operate_on_classifiers": {"broken": ["a"]}}))
    model = pipeline.classifiers["broken"].model

    class Failing:
        def wait(self) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def launch(crops: Any) -> Any:
        if when == "launch":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return Failing()

    monkeypatch.setattr(model, "launch", launch)
    try:
        result = asyncio.run(pipeline.whole.run(encode(collage(), ".jpg")))
    finally:
        pipeline.close()
    assert result.errors["broken"].code == "failed" and "illegal memory access" in result.errors["broken"].message
    assert result.errors["orphan"].code == "skipped" and "its parent broken failed" in result.errors["orphan"].message
    assert list(result.outputs) == ["age", "gender", "emotion"] and len(result.outputs["age"][0]) == 3


def test_a_classifier_later_than_its_timeout_answers_timeout_and_the_others_answer() -> None:
    # age: no engine run on a CPU answers within a microsecond
    pipeline = _Pipeline(_chain_on_the_device(timeouts={"age": 1e-6}))
    try:
        result = asyncio.run(pipeline.whole.run(encode(collage(), ".jpg")))
    finally:
        pipeline.close()
    assert result.errors["age"].code == "timeout" and "age" not in result.outputs
    assert list(result.outputs) == ["gender", "emotion"] and len(result.outputs["gender"][0]) == 3


def test_a_failing_detector_fails_the_batch_and_the_pass_lives_on(chain: _Pipeline, monkeypatch: Any) -> None:
    def broken(frames: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(chain.detector.model, "detect_batch", broken)
        with pytest.raises(DetectorUnavailable, match="illegal memory access"):
            asyncio.run(chain.whole.run(encode(collage(), ".jpg")))
    assert len(asyncio.run(chain.whole.run(encode(collage(), ".jpg"))).detections) == 3


def _second_while_first_is_held(pipeline: _Pipeline, entered: Any, release: Any, went: Any
                                ) -> tuple[bool, GraphResult, GraphResult]:
    """The three-face collage sent, and held in a step (`entered` set there, waiting for `release`); then the
    eight-face photo sent: whether `went` (the step before, done for the second request) was set while the first
    was held, and both answers. The pipeline is closed after."""
    async def scenario() -> tuple[bool, GraphResult, GraphResult]:
        first = asyncio.ensure_future(pipeline.whole.run(encode(collage(), ".jpg")))
        assert await asyncio.to_thread(entered.wait, 60)  # the first request is in the held step
        second = asyncio.ensure_future(pipeline.whole.run(encode(many_faces(), ".jpg")))
        overlapped = await asyncio.to_thread(went.wait, 60)
        release.set()
        return overlapped, await first, await second

    try:
        return asyncio.run(scenario())
    finally:
        release.set()
        pipeline.close()


def test_the_next_batch_is_detected_while_the_last_one_is_classified(monkeypatch: Any) -> None:
    """The two halves overlap: with the first request held in classification (its age run blocked), a second
    request is decoded and detected; one thread for the whole pipeline would detect it only after the first."""
    import threading

    pipeline = _Pipeline(_chain_on_the_device())
    entered, release, detected_twice = threading.Event(), threading.Event(), threading.Event()
    detections: list[int] = []

    def counted(size: int, _ms: float) -> None:
        detections.append(size)
        if len(detections) >= 2:
            detected_twice.set()

    pipeline.detector.on_batch = counted
    age = pipeline.classifiers["age"].model
    launch = age.launch

    def held(crops: Any) -> Any:
        entered.set()
        release.wait(60)
        return launch(crops)

    monkeypatch.setattr(age, "launch", held)

    overlapped, first, second = _second_while_first_is_held(pipeline, entered, release, detected_twice)
    assert overlapped and detections == [1, 1]
    assert len(first.outputs["age"][0]) == 3 and len(second.outputs["age"][0]) == 8


def test_the_next_images_are_decoded_while_the_detector_works_on_the_batch_before(monkeypatch: Any) -> None:
    """`ingress.decode_apart`: with the first request held in the detector, a second request's image is decoded meanwhile;
    decoding on the detector's thread would decode it only after the first's detection. Both are answered."""
    import threading

    config = _chain_on_the_device()
    pipeline = _Pipeline(config.model_copy(update={"ingress": config.ingress.model_copy(update={"decode_apart": True})}))
    entered, release, decoded_twice = threading.Event(), threading.Event(), threading.Event()
    decoder = pipeline.whole.decoder
    decode_many = decoder.decode_many

    def counted(images: Any) -> Any:
        frames = decode_many(images)
        if len(pipeline.decodes) >= 2:
            decoded_twice.set()
        return frames

    monkeypatch.setattr(decoder, "decode_many", counted)
    detect_batch = pipeline.detector.model.detect_batch

    def held(frames: Any) -> Any:
        entered.set()
        release.wait(60)
        return detect_batch(frames)

    monkeypatch.setattr(pipeline.detector.model, "detect_batch", held)

    overlapped, first, second = _second_while_first_is_held(pipeline, entered, release, decoded_twice)
    assert overlapped and pipeline.decodes == [1, 1]
    assert len(first.outputs["age"][0]) == 3 and len(second.outputs["age"][0]) == 8
