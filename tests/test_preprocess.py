"""Classifier pre-processing: crop geometry and DeepStream-style normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from engines.preprocess import CropSpec, Normalization, crop_resize, to_tensor


def test_square_crop_box_grows_the_short_side_around_the_centre() -> None:
    boxes = CropSpec(8, 8, square=True).boxes(np.array([[10, 20, 30, 60]], np.float32))
    np.testing.assert_allclose(boxes, [[0, 20, 40, 60]])
    padded = CropSpec(8, 8, square=False, padding=0.5).boxes(np.array([[10, 20, 30, 60]], np.float32))
    np.testing.assert_allclose(padded, [[0, 0, 40, 80]])


def test_crop_resize_cuts_the_right_pixels_and_blacks_out_the_outside() -> None:
    frame = np.zeros((100, 100, 3), np.uint8)
    frame[20:40, 30:50] = (10, 20, 30)
    crops = crop_resize(frame, np.array([[30, 20, 50, 40]], np.float32), CropSpec(10, 10, square=True))
    assert crops.shape == (1, 10, 10, 3) and crops.dtype == np.uint8
    assert (crops == np.array([10, 20, 30], np.uint8)).all()
    edge = crop_resize(frame + 255, np.array([[-10, -10, 10, 10]], np.float32), CropSpec(4, 4, square=True))
    assert (edge[0, :2, :2] == 0).all() and (edge[0, 2:, 2:] == 255).all()


def test_degenerate_box_still_gives_a_crop() -> None:
    frame = np.full((10, 10, 3), 7, np.uint8)
    crops = crop_resize(frame, np.array([[5, 5, 5, 5], [50, 50, 60, 60]], np.float32), CropSpec(4, 4))
    assert crops.shape == (2, 4, 4, 3)
    assert (crops[0] == 7).all() and (crops[1] == 0).all()


def test_to_tensor_rgb_applies_scale_times_x_minus_mean() -> None:
    crops = np.zeros((2, 2, 3, 3), np.uint8)
    crops[..., 0], crops[..., 1], crops[..., 2] = 10, 20, 30  # B, G, R
    x = to_tensor(crops, Normalization("RGB", 0.5, (1.0, 2.0, 3.0)))
    assert x.shape == (2, 3, 2, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], 0.5 * (30 - 1))  # R first
    np.testing.assert_allclose(x[:, 2], 0.5 * (10 - 3))
    bgr = to_tensor(crops, Normalization("BGR", 1.0, (0.0,)))
    np.testing.assert_allclose(bgr[:, 0], 10)


def test_to_tensor_gray_uses_luma() -> None:
    crops = np.zeros((1, 2, 2, 3), np.uint8)
    crops[..., 2] = 255  # pure red
    x = to_tensor(crops, Normalization("GRAY", 1.0, (0.0,)))
    assert x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(x, 76, atol=1)  # 0.299 * 255


def test_normalization_rejects_wrong_mean_length() -> None:
    with pytest.raises(ValueError, match="mean needs 1 or 3"):
        Normalization("RGB", 1.0, (1.0, 2.0))


def test_to_tensor_divides_by_per_channel_std() -> None:
    crops = np.full((1, 1, 1, 3), 255, np.uint8)
    x = to_tensor(crops, Normalization("RGB", 1 / 255, (0.0,), (0.5, 0.25, 1.0)))
    np.testing.assert_allclose(x.reshape(3), [2.0, 4.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="std values must be non-zero"):
        Normalization("RGB", 1.0, (0.0,), (0.0,))


@pytest.mark.parametrize("spec", [
    Normalization("RGB", 0.00390625, (122.782, 117.001, 104.298)),
    Normalization("BGR", 1 / 255, (123.675, 116.28, 103.53), (0.229, 0.224, 0.225)),
    Normalization("GRAY", 0.00784313725, (127.5,)),
])
def test_normalising_on_the_device_gives_the_hosts_tensor(spec: Normalization) -> None:
    """`DeviceNormalization` (what a GPU engine fuses into its forward) is `to_tensor`, value for value."""
    torch = pytest.importorskip("torch")
    from engines.preprocess import DeviceNormalization

    crops = np.random.default_rng(7).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    on_device = DeviceNormalization(spec, "cpu")
    np.testing.assert_array_equal(on_device(torch.from_numpy(crops)).numpy(), to_tensor(crops, spec))


def test_grey_on_the_device_is_opencvs_grey_for_every_colour() -> None:
    """The fixed-point weights reproduce cv2.cvtColor(BGR2GRAY) on all 2^24 colours."""
    torch = pytest.importorskip("torch")
    from engines.preprocess import DeviceNormalization

    colours = np.arange(1 << 24, dtype=np.int64)
    crops = np.stack([colours % 256, colours // 256 % 256, colours // 65536], -1).astype(np.uint8).reshape(256, 256, 256, 3)
    spec = Normalization("GRAY", 1.0, (0.0,))
    on_device = DeviceNormalization(spec, "cpu")
    np.testing.assert_array_equal(on_device(torch.from_numpy(crops)).numpy(), to_tensor(crops, spec))
