"""The GPU-resident MTCNN's pixel and box operations equal the numpy/OpenCV ones they replace, on fresh
random inputs (run here on torch's CPU device; the same code runs on CUDA)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the GPU-resident cascade needs torch: pip install '.[torch]'")

from engines.mtcnn import _patches, nms, nms_min  # noqa: E402
from engines.torch_boxes import (  # noqa: E402
    crop_resize,
    greedy_nms,
    image_resize_weights,
    overlaps,
    resize_image,
    suppression,
)


def _image(rng: np.random.Generator, height: int = 300, width: int = 400) -> np.ndarray:
    return rng.uniform(0, 255, (height, width, 3)).astype(np.float32)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize("size", [(181, 241), (128, 171), (13, 17), (300, 400), (150, 200), (99, 400)])
def test_image_resize_is_opencvs_inter_area(size: tuple[int, int]) -> None:
    image = _image(np.random.default_rng(sum(size)))
    expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
    got = resize_image(_chw(image), image_resize_weights(300, 400, *size, "cpu"))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.parametrize("size", [24, 48])
def test_patches_are_the_numpy_cascades_including_clipped_and_growing_regions(size: int) -> None:
    """Boxes of every size, partly outside the image, thin after clipping: OpenCV's area weights where both
    axes shrink, its linear-area weights where one grows (the case a plain area resize gets wrong)."""
    rng = np.random.default_rng(size)
    image = _image(rng)
    n = 400
    boxes = np.zeros((n, 4), np.float32)
    boxes[:, :2] = rng.uniform(-60, 460, (n, 2))
    side = rng.uniform(1, 320, n).astype(np.float32)
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side * rng.uniform(0.3, 1.5, n).astype(np.float32)
    expected, kept = _patches(image, boxes, size)
    got, got_kept = crop_resize(_chw(image), torch.zeros(n, dtype=torch.int64), torch.from_numpy(boxes), size)
    assert 0 < len(kept) < n  # some regions are empty (boxes wholly outside): both drop the same ones
    np.testing.assert_array_equal(np.flatnonzero(got_kept.numpy()), kept)
    np.testing.assert_allclose(got[kept].permute(0, 2, 3, 1).numpy(), expected, atol=1e-3)
    grows = np.minimum(*(np.minimum(boxes[kept, 2:4], (400, 300)) - np.maximum(boxes[kept, :2], 1)).T) < size
    assert grows.any() and (~grows).any()  # both of OpenCV's resize modes were exercised


def _random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = rng.uniform(0, 100, (n, 4)).astype(np.float32)
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(0.5, 40, (n, 2)).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    scores[::7] = 1.0  # ties, as saturated face probabilities give
    return boxes, scores


@pytest.mark.parametrize("n", [1, 50, 600, 2500])  # 2500: past the matrix limit, on the host
@pytest.mark.parametrize("overlap", ["iou", "min"])
def test_greedy_nms_keeps_what_opencv_and_nms_min_keep_in_their_order(n: int, overlap: str) -> None:
    rng = np.random.default_rng(n)
    boxes, scores = _random_boxes(rng, n)
    groups = rng.integers(0, 3, n)
    select, threshold = (nms, 0.5) if overlap == "iou" else (nms_min, 0.7)
    expected = np.concatenate([np.flatnonzero(groups == g)[select(boxes[groups == g], scores[groups == g], threshold)]
                               for g in range(3)])
    got = greedy_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), threshold, overlap)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_greedy_nms_of_nothing_is_nothing() -> None:
    got = greedy_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert got.shape == (0,)


@pytest.mark.parametrize("overlap", ["iou", "min"])
def test_suppression_in_blocks_of_frames_is_the_whole_matrix(overlap: str) -> None:
    """The fixed-shape cascade's NMS matrix computed a frame or three at a time (a block smaller than one frame's,
    and one of three frames) is the one computed for every frame at once."""
    rng = np.random.default_rng(7)
    boxes = torch.from_numpy(np.stack([_random_boxes(rng, 64)[0] for _ in range(5)]))  # (5 frames, 64, 4)
    whole = overlaps(boxes, overlap) > 0.5
    for block in (10, 3 * 64 * 64):
        blocked = suppression(boxes, overlap, 0.5, block=block)
        assert blocked.dtype == torch.bool and torch.equal(blocked, whole)
    assert whole.any() and not whole.all()  # the boxes overlap some, not all
