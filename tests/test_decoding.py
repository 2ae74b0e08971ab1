"""Request bytes to frames: header sniffing, pixel limits, and images that must decode, not be refused."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from serve_app.decoding import InputError, decode_image, image_dimensions
from tests.images import ASTRONAUT, NO_FACE, encode


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp"])
def test_header_dimensions_match_the_image(ext: str) -> None:
    image = np.zeros((37, 53, 3), np.uint8)
    assert image_dimensions(encode(image, ext)) == (53, 37)


def test_header_dimensions_of_gif_and_unknown() -> None:
    gif = b"GIF89a" + (300).to_bytes(2, "little") + (200).to_bytes(2, "little") + b"\0" * 8
    assert image_dimensions(gif) == (300, 200)
    assert image_dimensions(b"plain text") is None
    assert image_dimensions(NO_FACE.read_bytes()) == (600, 400)


def test_grey_16_bit_and_alpha_pngs_decode_to_bgr() -> None:
    grey = encode(np.full((4, 6), 200, np.uint8))
    deep = encode(np.full((4, 6, 3), 50000, np.uint16))
    alpha = encode(np.dstack([np.full((4, 6, 3), 9, np.uint8), np.zeros((4, 6), np.uint8)]))
    for data, value in ((grey, 200), (deep, 50000 >> 8), (alpha, 9)):
        frame = decode_image(data, 1000)
        assert frame.shape == (4, 6, 3) and frame.dtype == np.uint8
        assert abs(int(frame[0, 0, 0]) - value) <= 1


def test_the_pixel_limit_is_inclusive() -> None:
    """(That the size is checked before any decoding is shown in test_bounded_inputs.py, on images that only
    declare their size.)"""
    data = ASTRONAUT.read_bytes()
    assert decode_image(data, 512 * 512).shape == (512, 512, 3)
    with pytest.raises(InputError) as info:
        decode_image(data, 512 * 512 - 1)
    assert info.value.status == 413 and info.value.code == "image_too_large"


@pytest.mark.parametrize("data", [b"", b"GIF89a", b"\xff\xd8\xff\xe0garbage", cv2.imencode(".png", np.zeros((2, 2)))[1].tobytes()[:20]])
def test_undecodable_bytes_are_client_errors(data: bytes) -> None:
    with pytest.raises(InputError) as info:
        decode_image(data, 10_000)
    assert info.value.status == 400
