"""Compressed image bytes -> BGR uint8 frame: the one decoder every stage uses, so a frame decoded in
the ingress (for the crops) and in the detector (from the same bytes) are identical.

Nothing is decoded before its size is known: `image_dimensions` reads the width and height from the header of
every format OpenCV decodes here (PNG, JPEG, GIF, BMP, WebP, PBM/PGM/PPM, PAM, PFM, TIFF, Radiance HDR, Sun
raster, JPEG 2000, AVIF), and `decode_bgr` refuses bytes whose header it cannot read, or that declare more
pixels than allowed, without allocating the image (a small file can declare an enormous one).
"""

from __future__ import annotations

import re
import struct

import cv2
import numpy as np


class ImageRefused(ValueError):
    """Bytes that are not decoded: `status` and `code` are what an HTTP caller answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*(\d+)")


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    """P1-P6: magic, then width and height as decimal tokens (comments allowed between them)."""
    pos, values = 2, []
    for _ in range(2):
        match = _PNM_TOKEN.match(data, pos)
        if match is None:
            return None
        values.append(int(match.group(1)))
        pos = match.end()
    return values[0], values[1]


def _pam_size(data: bytes) -> tuple[int, int] | None:
    header = data[: data.find(b"ENDHDR")] if b"ENDHDR" in data[:4096] else data[:4096]
    width = re.search(rb"\nWIDTH\s+(\d+)", header)
    height = re.search(rb"\nHEIGHT\s+(\d+)", header)
    return (int(width.group(1)), int(height.group(1))) if width and height else None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """The first image file directory's ImageWidth (256) and ImageLength (257), classic or BigTIFF."""
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    big = version == 43
    try:
        if big:
            (offset,) = struct.unpack(order + "Q", data[8:16])
            (count,) = struct.unpack(order + "Q", data[offset : offset + 8])
            entry, start, value_at = 20, offset + 8, 12
        else:
            (offset,) = struct.unpack(order + "I", data[4:8])
            (count,) = struct.unpack(order + "H", data[offset : offset + 2])
            entry, start, value_at = 12, offset + 2, 8
        found: dict[int, int] = {}
        for i in range(min(count, 4096)):
            at = start + i * entry
            tag, kind = struct.unpack(order + "HH", data[at : at + 4])
            if tag in (256, 257):
                code = {3: "H", 4: "I", 16: "Q"}.get(kind)
                if code is None:
                    return None
                (found[tag],) = struct.unpack(order + code, data[at + value_at : at + value_at + struct.calcsize(code)])
        return (found[256], found[257]) if len(found) == 2 else None
    except struct.error:
        return None


_HDR_RESOLUTION = re.compile(rb"\n\n([-+])([XY]) (\d+) ([-+])([XY]) (\d+)\n")


def _hdr_size(data: bytes) -> tuple[int, int] | None:
    match = _HDR_RESOLUTION.search(data[:65536])
    if match is None:
        return None
    axes = {match.group(2): int(match.group(3)), match.group(5): int(match.group(6))}
    return (axes[b"X"], axes[b"Y"]) if set(axes) == {b"X", b"Y"} else None


def _box_sizes(data: bytes, box: bytes, height_first: bool) -> tuple[int, int] | None:
    """The largest (width, height) of every `box` in an ISO base-media file (AVIF `ispe`, JPEG 2000 `ihdr`)."""
    sizes = []
    start = data.find(box)
    while start != -1 and start + 12 <= len(data):
        body = start + 4 + (4 if box == b"ispe" else 0)  # ispe is a full box: version and flags first
        a, b = struct.unpack(">II", data[body : body + 8]) if body + 8 <= len(data) else (0, 0)
        sizes.append((b, a) if height_first else (a, b))
        start = data.find(box, start + 4)
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header, for every format OpenCV decodes here; None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:1] == b"P" and data[1:2] in b"123456" and len(data) > 2:
        return _pnm_size(data)
    if data[:2] == b"P7":
        return _pam_size(data)
    if data[:2] in (b"PF", b"Pf"):
        return _pnm_size(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") and len(data) >= 16:
        return _tiff_size(data)
    if data[:10] == b"#?RADIANCE" or data[:6] == b"#?RGBE":
        return _hdr_size(data)
    if data[:4] == b"\x59\xa6\x6a\x95" and len(data) >= 12:
        return struct.unpack(">II", data[4:12])
    if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return _box_sizes(data, b"ihdr", height_first=True)
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:  # a raw JPEG 2000 codestream: SIZ
        x, y, x0, y0 = struct.unpack(">IIII", data[8:24])
        return x - x0, y - y0
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"mif1"):
        return _box_sizes(data, b"ispe", height_first=False)
    return None


def check_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) from its header, or ImageRefused: empty body (400), a header this decoder
    cannot read (400), a zero side (400), more than `max_pixels` (413)."""
    if not data:
        raise ImageRefused(400, "empty_body", "the request body is empty; send image bytes")
    size = image_dimensions(data)
    if size is None:
        raise ImageRefused(400, "undecodable_image",
                           "the body is no image whose size this service can read before decoding it (PNG, JPEG, "
                           "GIF, BMP, WebP, PNM, PAM, PFM, TIFF, HDR, Sun raster, JPEG 2000, AVIF)")
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRefused(400, "undecodable_image", "the image header declares a zero width or height")
    if width * height > max_pixels:
        raise ImageRefused(413, "image_too_large",
                           f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return width, height


def decode_bgr(data: bytes, max_pixels: int | None = None) -> np.ndarray | None:
    """(H, W, 3) BGR uint8, contiguous; grey, 16-bit and alpha images are converted. None if undecodable.
    With `max_pixels`, the header is checked first (`check_size`: raises ImageRefused), and so is the result."""
    if max_pixels is not None:
        check_size(data, max_pixels)
    try:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if frame is None or frame.size == 0:
        return None
    if max_pixels is not None and frame.shape[0] * frame.shape[1] > max_pixels:
        raise ImageRefused(413, "image_too_large", f"the decoded image exceeds {max_pixels} pixels")
    return np.ascontiguousarray(frame)


def decode_for_detection(data: bytes, max_pixels: int, max_side: int) -> tuple[np.ndarray | None, float]:
    """The frame a detector needs from compressed bytes: at most `max_side` pixels on its longer side (0: any),
    and the factor its pixels are of the original's (boxes found on it are divided by it). The header is checked
    first (ImageRefused); a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size by the JPEG decoder itself, so
    the full frame is never allocated."""
    width, height = check_size(data, max_pixels)
    flag, reduced = cv2.IMREAD_COLOR, 1
    if max_side and data[:2] == b"\xff\xd8":
        for k, option in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if max(width, height) // k >= max_side:
                flag, reduced = option, k
                break
    try:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error:
        return None, 1.0
    if frame is None or frame.size == 0:
        return None, 1.0
    factor = frame.shape[1] / width if reduced > 1 else 1.0
    fitted, more = fit_side(frame, max_side)
    return fitted, factor * more


def fit_side(frame: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`frame` scaled down (area averaging) so that its longer side is at most `max_side` (0: unchanged), and the
    factor applied. A detector's network sees a few hundred pixels per side; a 6000x6000 photo would only cost
    memory and time (DeepStream's stream muxer scales every frame to the network's size likewise)."""
    height, width = frame.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return frame, 1.0
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.ascontiguousarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA)), size[0] / width
