"""Every input bounded before it costs memory: image sizes read from the header of every format the decoder takes
(and nothing decoded before), the detector's working resolution, the replicas' pixel budgets, crops whose cost
follows their output size."""

from __future__ import annotations

import asyncio
import struct
import zlib

import cv2
import numpy as np
import pytest

import engines.image as image_module
from engines.image import ImageRefused, check_size, decode_for_detection, fit_side, image_dimensions
from serve_app.decoding import InputError, decode_image
from tests.images import collage

FORMATS = [".png", ".jpg", ".bmp", ".webp", ".ppm", ".pfm", ".pam", ".tiff", ".hdr", ".ras", ".jp2", ".avif",
           ".gif"]


def _encoded(ext: str, height: int = 37, width: int = 53) -> bytes:
    pixels = (np.random.default_rng(height).random((height, width, 3)) * 255).astype(np.uint8)
    source = pixels.astype(np.float32) / 255 if ext in (".pfm", ".hdr") else pixels
    ok, data = cv2.imencode(ext, source)
    assert ok, ext
    return data.tobytes()


@pytest.mark.parametrize("ext", FORMATS)
def test_the_header_gives_the_size_of_every_format_the_decoder_takes(ext: str) -> None:
    data = _encoded(ext)
    assert image_dimensions(data) == (53, 37)
    assert decode_image(data, 53 * 37).shape == (37, 53, 3)


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _claiming(ext: str, width: int, height: int) -> bytes:
    """A small file whose header declares a width x height image (the rest is a real small image's, or junk)."""
    if ext == ".png":
        return _png_claiming(width, height)
    if ext == ".ppm":
        return f"P6\n{width} {height}\n255\n".encode() + b"\0" * 64
    if ext == ".pfm":
        return f"PF\n{width} {height}\n-1\n".encode() + b"\0" * 64
    if ext == ".pam":
        return f"P7\nWIDTH {width}\nHEIGHT {height}\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n".encode() + b"\0" * 64
    if ext == ".hdr":
        return f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode() + b"\0" * 64
    if ext == ".ras":
        return struct.pack(">8I", 0x59A66A95, width, height, 24, 64, 1, 0, 0) + b"\0" * 64
    if ext == ".bmp":
        data = bytearray(_encoded(".bmp"))
        data[18:26] = struct.pack("<ii", width, height)
        return bytes(data)
    if ext == ".tiff":
        entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
                   (273, 4, 1, 8), (277, 3, 1, 3), (279, 4, 1, 64)]
        ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
        return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 64
    raise AssertionError(ext)


@pytest.mark.parametrize("ext", [".png", ".ppm", ".pfm", ".pam", ".hdr", ".ras", ".bmp", ".tiff"])
def test_an_image_declaring_too_many_pixels_is_refused_without_being_decoded(ext: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """20000 x 20000 declared by a few dozen bytes: 413 from the header, and the decoder is never called (it
    would allocate 1.2 GB, or fail with a 400: both are what the header check exists to avoid)."""
    def no_decoding(*args: object) -> None:
        raise AssertionError("imdecode was called on an image that declares too many pixels")

    monkeypatch.setattr(image_module.cv2, "imdecode", no_decoding)
    data = _claiming(ext, 20000, 20000)
    assert image_dimensions(data) == (20000, 20000)
    with pytest.raises(InputError) as refused:
        decode_image(data, 40_000_000)
    assert (refused.value.status, refused.value.code) == (413, "image_too_large")


def test_bytes_whose_header_cannot_be_read_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_module.cv2, "imdecode", lambda *a: pytest.fail("imdecode called"))
    for data in (b"plain text", b"\x00" * 64, b"GIF89a"):
        with pytest.raises(ImageRefused) as refused:
            check_size(data, 10_000)
        assert refused.value.status == 400


def test_frames_are_fitted_to_the_detectors_side_and_large_jpegs_decoded_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = cv2.resize(collage(), (6144, 2048), interpolation=cv2.INTER_LINEAR)
    fitted, scale = fit_side(frame, 1280)
    assert fitted.shape == (427, 1280, 3) and scale == (1280 / 6144, 427 / 2048)  # each side rounded on its own
    assert fit_side(frame[:100, :100], 1280)[1] == (1.0, 1.0)
    flags = []
    real = cv2.imdecode
    monkeypatch.setattr(image_module.cv2, "imdecode", lambda buf, flag: flags.append(flag) or real(buf, flag))
    data = cv2.imencode(".jpg", frame)[1].tobytes()
    decoded, scale = decode_for_detection(data, 40_000_000, 1280)
    # 6144 / 4 = 1536 >= 1280: never the full 12.6 Mpx frame (the orientation is applied by the project, not OpenCV)
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION]
    assert decoded.shape[1] == 1280 and scale == (1280 / 6144, decoded.shape[0] / 2048)


def test_a_detector_finds_the_faces_of_a_huge_photo_in_its_own_pixels() -> None:
    """A 6144x2048 upload is detected at 1280 pixels wide; the boxes come back in the upload's pixels."""
    from deployments.config import DetectorConfig
    from deployments.stages import DetectorStage

    small = collage()  # 512 x 1536, three faces
    big = cv2.resize(small, (small.shape[1] * 4, small.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
    stage = DetectorStage(DetectorConfig(), "cpu")
    reference = asyncio.run(DetectorStage(DetectorConfig(max_detect_side=0), "cpu").detect(small)).detections
    for image in (big, cv2.imencode(".jpg", big)[1].tobytes()):
        result = asyncio.run(stage.detect(image))
        assert result.refused is None and len(result.detections) == 3
        boxes = result.detections.xyxy[np.argsort(result.detections.xyxy[:, 0])]
        expected = reference.xyxy[np.argsort(reference.xyxy[:, 0])] * 4
        sides = expected[:, 2] - expected[:, 0]
        assert np.all(np.abs(boxes - expected) <= 0.1 * sides[:, None])  # within a tenth of the face


def test_the_detector_answers_bytes_it_will_not_decode_instead_of_raising() -> None:
    from deployments.config import DetectorConfig
    from deployments.stages import DetectorStage

    stage = DetectorStage(DetectorConfig(max_image_pixels=100 * 100, max_inflight_pixels=100 * 100), "cpu")
    for data, code in ((b"not an image", "undecodable_image"), (_png_claiming(101, 100), "image_too_large")):
        result = asyncio.run(stage.detect(data))
        assert result.refused is not None and result.refused[1] == code and len(result.detections) == 0


def test_a_pixel_budget_never_holds_more_than_its_capacity() -> None:
    from deployments.budget import PixelBudget

    budget = PixelBudget(80)
    high_water = []

    async def use(pixels: int) -> None:
        async with budget.hold(pixels):
            high_water.append(budget.used)
            await asyncio.sleep(0)

    async def burst() -> None:
        await asyncio.gather(*(use(p) for p in (60, 60, 30, 50, 80, 200)))

    asyncio.run(burst())
    assert len(high_water) == 6 and max(high_water) <= 80 and budget.used == 0


def test_a_padded_crop_of_a_large_box_costs_only_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """With padding 2.0 a box covers 5x its side: every array the crop makes or resizes stays within the frame
    and the output (before, the padded full-resolution region was built first: (5 x side)^2 pixels)."""
    import engines.preprocess as preprocess
    from engines.preprocess import CropSpec, crop_resize

    frame = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    seen: list[int] = []
    real_resize = cv2.resize

    class SpyCv2:
        def __getattr__(self, name: str) -> object:
            attr = getattr(cv2, name)
            if not callable(attr) or name.isupper():
                return attr

            def spied(*args: object, **kwargs: object) -> object:
                out = (real_resize if name == "resize" else attr)(*args, **kwargs)
                seen.extend(a.size for a in (*args, out) if isinstance(a, np.ndarray))
                return out
            return spied

    monkeypatch.setattr(preprocess, "cv2", SpyCv2())
    crops = crop_resize(frame, np.array([[300, 300, 700, 700]], np.float32), CropSpec(64, 64, padding=2.0))
    assert crops.shape == (1, 64, 64, 3) and seen and max(seen) <= frame.size
    inside = crops[0, 25:38, 25:38]  # the box's own pixels land in the middle fifth
    assert inside.mean() > 50 and crops[0, :5].max() == 0  # outside the frame: black
