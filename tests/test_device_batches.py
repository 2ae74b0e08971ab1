"""The device path's cross-request batches (serve_app/device_frames.py), on the CPU device: the JPEGs of requests
that arrive together are decoded in one call and their crops cut in one pass per crop geometry, and each request
gets exactly what it would have got alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.device_image import DeviceDecoder  # noqa: E402
from engines.preprocess import CropSpec  # noqa: E402
from serve_app.device_frames import DeviceBatches  # noqa: E402
from serve_app.graph import ClassifierRoute, cut_each_spec_once, cut_each_spec_once_many  # noqa: E402
from tests.images import collage, encode, many_faces, phone_photo  # noqa: E402


def _route(name: str, spec: CropSpec) -> ClassifierRoute:
    return ClassifierRoute(name, None, spec, None, 0.0, 0.0, 1.0)


AGE, EMOTION, GENDER = _route("age", CropSpec(64, 64)), _route("emotion", CropSpec(64, 64)), \
    _route("gender", CropSpec(96, 96, padding=0.2))


class _Counting(DeviceDecoder):
    """The real decoder, counting its batched calls."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.calls: list[int] = []

    def decode_many(self, images):  # type: ignore[no-untyped-def]
        self.calls.append(len(images))
        return super().decode_many(images)


def _frames_and_boxes() -> tuple[list[object], list[np.ndarray]]:
    frames = [torch.from_numpy(collage()), torch.from_numpy(many_faces()), torch.from_numpy(collage()[:300])]
    rng = np.random.default_rng(5)
    boxes = []
    for frame in frames:
        h, w = frame.shape[:2]
        corners = rng.uniform(0, 1, (6, 2)) * [w, h]
        boxes.append(np.concatenate([corners, corners + rng.uniform(8, 200, (6, 2))], 1).astype(np.float32))
    return frames, boxes


def test_crops_of_many_requests_cut_together_are_each_requests_own() -> None:
    """Routes of two geometries, some on a subset of the objects, one request wanting nothing: each request's
    crops are exactly those it gets alone."""
    frames, boxes = _frames_and_boxes()
    wanteds = [[(AGE, np.arange(6)), (EMOTION, np.array([1, 4])), (GENDER, np.array([0, 5]))],
               [(GENDER, np.arange(6))],
               []]
    together = cut_each_spec_once_many(frames, boxes, wanteds)
    for frame, xyxy, wanted, mine in zip(frames, boxes, wanteds, together):
        alone = cut_each_spec_once(frame, xyxy, wanted)
        assert len(mine) == len(alone) == len(wanted)
        for a, b, (_, indices) in zip(mine, alone, wanted):
            assert tuple(a.shape)[0] == len(indices) and torch.equal(a, b)


def test_requests_that_arrive_together_share_one_decode_and_one_cut() -> None:
    decoder = _Counting()
    batches = DeviceBatches(decoder, max_batch=4)
    bodies = [encode(collage(), ".jpg"), phone_photo(collage(), 6), encode(many_faces(), ".jpg"),
              b"\xff\xd8\xff\xe0 not a jpeg", encode(collage()[:200], ".jpg"), encode(many_faces()[:, :400], ".jpg")]
    frames, boxes = _frames_and_boxes()
    wanteds = [[(AGE, np.arange(6)), (GENDER, np.array([2]))]] * 3

    async def together() -> tuple[list[object], list[list[object]]]:
        decoded = await asyncio.gather(*(batches.decode(b) for b in bodies))
        cut = await asyncio.gather(*(batches.cut(f, b, w) for f, b, w in zip(frames, boxes, wanteds)))
        return decoded, cut

    try:
        decoded, cut = asyncio.run(together())
    finally:
        batches.close()
    # six requests at once, four to a batch: two calls, not six
    assert decoder.calls == [4, 2]
    assert decoded[3] is None  # the undecodable one fails alone
    for body, frame in zip(bodies, decoded):
        if frame is not None:
            assert torch.equal(frame, DeviceDecoder("cpu").decode(body))
    for frame, xyxy, wanted, mine in zip(frames, boxes, wanteds, cut):
        for a, b in zip(mine, cut_each_spec_once(frame, xyxy, wanted)):
            assert torch.equal(a, b)


def test_a_lone_request_waits_for_no_company() -> None:
    decoder = _Counting()
    batches = DeviceBatches(decoder, max_batch=16)

    async def one_by_one() -> None:
        for _ in range(3):
            assert await batches.decode(encode(collage(), ".jpg")) is not None

    try:
        asyncio.run(one_by_one())
    finally:
        batches.close()
    assert decoder.calls == [1, 1, 1]
