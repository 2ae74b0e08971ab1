"""Compressed image bytes -> BGR uint8 frame: the one decoder every stage uses, so a frame decoded in
the ingress (for the crops) and in the detector (from the same bytes) are identical.

Nothing is decoded before its size is known: `read_header` reads the width and height from the header of
every format OpenCV decodes here (PNG, JPEG, GIF, BMP, WebP, PBM/PGM/PPM, PAM, PFM, TIFF, Radiance HDR, Sun
raster, JPEG 2000, AVIF), and `decode_bgr` refuses bytes whose header it cannot read, or that declare more
pixels than allowed, without allocating the image (a small file can declare an enormous one).

Orientation is read from the same header: EXIF's Orientation tag (JPEG APP1, PNG eXIf, WebP EXIF, TIFF's own
tag) and AVIF's irot/imir transforms. Sizes are the *displayed* image's (width and height swapped for a photo
stored on its side, as phones store them), and every decode applies the orientation itself, after OpenCV
decoded the stored pixels (IMREAD_IGNORE_ORIENTATION): so the header's size, the decoded frame, a reduced JPEG
decode and the boxes found on it always agree, whatever the format (OpenCV alone rotates JPEG, PNG, WebP and
TIFF but not AVIF, and its header-free size would be the stored one).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np


class ImageRefused(ValueError):
    """Bytes that are not decoded: `status` and `code` are what an HTTP caller answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_EXIF = b"Exif\x00\x00"
ORIENTATION_TAG = 274


def _exif_orientation(payload: bytes) -> int:
    """The Orientation tag of an EXIF block (a TIFF structure, with or without the "Exif\\0\\0" prefix); 1 if none."""
    if payload.startswith(_EXIF):
        payload = payload[len(_EXIF):]
    value = _tiff_tags(payload, (ORIENTATION_TAG,)).get(ORIENTATION_TAG, 1)
    return value if 1 <= value <= 8 else 1


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(stored width, stored height, orientation): the frame header (SOFn) and the EXIF APP1 segment before it."""
    i, orientation = 2, 1
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
        if marker == 0xE1 and data[i + 4 : i + 10] == _EXIF:
            orientation = _exif_orientation(data[i + 4 : i + 2 + length])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height, orientation
        i += 2 + length
    return None


def _png_orientation(data: bytes) -> int:
    """The orientation in a PNG's eXIf chunk (chunk headers walked, no pixel data read); 1 if none."""
    i = 8
    for _ in range(1_000_000):
        if i + 8 > len(data):
            break
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        if kind == b"eXIf":
            return _exif_orientation(data[i + 8 : i + 8 + length])
        if kind == b"IEND":
            break
        i += 12 + length
    return 1


def _webp_orientation(data: bytes) -> int:
    """The orientation in a WebP's EXIF chunk (RIFF chunks walked); 1 if none."""
    i = 12
    while i + 8 <= len(data):
        kind = data[i : i + 4]
        (length,) = struct.unpack("<I", data[i + 4 : i + 8])
        if kind == b"EXIF":
            return _exif_orientation(data[i + 8 : i + 8 + length])
        i += 8 + length + (length & 1)
    return 1


# AVIF (HEIF) transforms, rotation first, then mirror (ISO/IEC 23008-12: irot is `angle` x 90 degrees
# anti-clockwise; imir mode 0 exchanges top and bottom, 1 left and right), as the EXIF orientation they amount to
# (the same mapping Pillow and libavif use).
_HEIF_ORIENTATION = {(0, None): 1, (0, 0): 4, (0, 1): 2, (1, None): 8, (1, 0): 5, (1, 1): 7,
                     (2, None): 3, (2, 0): 2, (2, 1): 4, (3, None): 6, (3, 0): 7, (3, 1): 5}


def _heif_property(data: bytes, box: bytes, end: int) -> int | None:
    """The low bits of the first `box` property (a 9-byte box: size, type, one byte) before `end`."""
    start = data.find(box, 4, end)
    while start != -1:
        if data[start - 4 : start] == b"\x00\x00\x00\x09":
            return data[start + 4]
        start = data.find(box, start + 4, end)
    return None


def _avif_orientation(data: bytes) -> int:
    end = data.find(b"mdat")  # the item properties come before the media data
    end = len(data) if end == -1 else end
    angle = _heif_property(data, b"irot", end)
    mirror = _heif_property(data, b"imir", end)
    return _HEIF_ORIENTATION[(0 if angle is None else angle & 3, None if mirror is None else mirror & 1)]


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


def _tiff_tags(data: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """The integer values of the `wanted` tags of a TIFF structure's first image file directory (classic or
    BigTIFF): a TIFF file, or the body of an EXIF block. Missing or unreadable tags are left out."""
    if data[:2] not in (b"II", b"MM"):
        return {}
    order = "<" if data[:2] == b"II" else ">"
    found: dict[int, int] = {}
    try:
        (version,) = struct.unpack(order + "H", data[2:4])
        if version == 43:
            (offset,) = struct.unpack(order + "Q", data[8:16])
            (count,) = struct.unpack(order + "Q", data[offset : offset + 8])
            entry, start, value_at = 20, offset + 8, 12
        else:
            (offset,) = struct.unpack(order + "I", data[4:8])
            (count,) = struct.unpack(order + "H", data[offset : offset + 2])
            entry, start, value_at = 12, offset + 2, 8
        for i in range(min(count, 4096)):
            at = start + i * entry
            tag, kind = struct.unpack(order + "HH", data[at : at + 4])
            if tag in wanted:
                code = {3: "H", 4: "I", 16: "Q"}.get(kind)
                if code is not None:
                    (found[tag],) = struct.unpack(order + code, data[at + value_at : at + value_at + struct.calcsize(code)])
    except struct.error:
        pass
    return found


def _tiff_header(data: bytes) -> tuple[int, int, int, bool] | None:
    """ImageWidth (256), ImageLength (257) and Orientation (274) of the first directory (OpenCV's decoder applies
    the orientation itself: tests/test_orientation.py)."""
    tags = _tiff_tags(data, (256, 257, ORIENTATION_TAG))
    if 256 not in tags or 257 not in tags:
        return None
    orientation = tags.get(ORIENTATION_TAG, 1)
    return tags[256], tags[257], orientation if 1 <= orientation <= 8 else 1, True


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


@dataclass(frozen=True)
class ImageHeader:
    """What a header says: the stored pixel grid and the orientation (EXIF's 1-8) to display it in."""

    stored_width: int
    stored_height: int
    orientation: int = 1
    decoder_orients: bool = False  # OpenCV's TIFF decoder turns the pixels itself (IMREAD_IGNORE_ORIENTATION or not)

    @property
    def transposed(self) -> bool:
        """Orientations 5-8 display the stored image on its side: width and height swap."""
        return self.orientation >= 5

    @property
    def width(self) -> int:
        return self.stored_height if self.transposed else self.stored_width

    @property
    def height(self) -> int:
        return self.stored_width if self.transposed else self.stored_height

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed."""
        return self.width, self.height


def _stored_header(data: bytes) -> tuple[int, int] | tuple[int, int, int] | tuple[int, int, int, bool] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height, _png_orientation(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_header(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp_size(data)
        return None if size is None else (*size, _webp_orientation(data))
    if data[:1] == b"P" and data[1:2] in b"123456" and len(data) > 2:
        return _pnm_size(data)
    if data[:2] == b"P7":
        return _pam_size(data)
    if data[:2] in (b"PF", b"Pf"):
        return _pnm_size(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") and len(data) >= 16:
        return _tiff_header(data)
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
        size = _box_sizes(data, b"ispe", height_first=False)
        return None if size is None else (*size, _avif_orientation(data))
    return None


def read_header(data: bytes) -> ImageHeader | None:
    """The stored size and the orientation, for every format OpenCV decodes here; None if unknown."""
    found = _stored_header(data)
    return None if found is None else ImageHeader(*found)


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the image as displayed (its orientation applied), from the header; None if unknown."""
    header = read_header(data)
    return None if header is None else header.size


def orient(frame: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned as EXIF's `orientation` says they are displayed (OpenCV's own order of
    operations for each value, so a frame matches what cv2.imdecode gives for the formats it orients)."""
    if orientation == 2:
        return cv2.flip(frame, 1)
    if orientation == 3:
        return cv2.flip(frame, -1)
    if orientation == 4:
        return cv2.flip(frame, 0)
    if orientation >= 5:
        turned = cv2.transpose(frame)
        return {5: turned, 6: cv2.flip(turned, 1), 7: cv2.flip(turned, -1), 8: cv2.flip(turned, 0)}[orientation]
    return frame


def check_header(data: bytes, max_pixels: int) -> ImageHeader:
    """The image's header (size and orientation), or ImageRefused: empty body (400), a header this decoder
    cannot read (400), a zero side (400), more than `max_pixels` (413)."""
    if not data:
        raise ImageRefused(400, "empty_body", "the request body is empty; send image bytes")
    header = read_header(data)
    if header is None:
        raise ImageRefused(400, "undecodable_image",
                           "the body is no image whose size this service can read before decoding it (PNG, JPEG, "
                           "GIF, BMP, WebP, PNM, PAM, PFM, TIFF, HDR, Sun raster, JPEG 2000, AVIF)")
    width, height = header.size
    if width <= 0 or height <= 0:
        raise ImageRefused(400, "undecodable_image", "the image header declares a zero width or height")
    if width * height > max_pixels:
        raise ImageRefused(413, "image_too_large",
                           f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return header


def check_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """`check_header`'s (width, height) as displayed."""
    return check_header(data, max_pixels).size


Scale = tuple[float, float]  # (x, y): a frame's pixels per pixel of the image it was made from
UNSCALED: Scale = (1.0, 1.0)


def inverse(scale: Scale) -> Scale:
    """The scale back: boxes found on a scaled frame times this are in the original image's pixels."""
    return 1 / scale[0], 1 / scale[1]


def decode_stored(data: bytes, flag: int) -> np.ndarray | None:
    """The stored pixels (no orientation applied), BGR uint8; None if OpenCV cannot decode them."""
    try:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    return None if frame is None or frame.size == 0 else frame


def decode_bgr(data: bytes, max_pixels: int | None = None) -> np.ndarray | None:
    """(H, W, 3) BGR uint8, contiguous, as displayed (orientation applied); grey, 16-bit and alpha images are
    converted. None if undecodable. With `max_pixels`, the header is checked first (`check_header`: raises
    ImageRefused), and so is the result."""
    header = check_header(data, max_pixels) if max_pixels is not None else read_header(data)
    frame = decode_stored(data, cv2.IMREAD_COLOR)
    if frame is None:
        return None
    if max_pixels is not None and frame.shape[0] * frame.shape[1] > max_pixels:
        raise ImageRefused(413, "image_too_large", f"the decoded image exceeds {max_pixels} pixels")
    return np.ascontiguousarray(_displayed(frame, header))


def _displayed(stored: np.ndarray, header: ImageHeader | None) -> np.ndarray:
    if header is None or header.decoder_orients:
        return stored
    return orient(stored, header.orientation)


def decode_for_detection(data: bytes, max_pixels: int, max_side: int) -> tuple[np.ndarray | None, Scale]:
    """The frame a detector needs from compressed bytes, as displayed: at most `max_side` pixels on its longer side
    (0: any), and the scale of its pixels to the image's (boxes found on it are divided by it). The header is
    checked first (ImageRefused); a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size by the JPEG decoder
    itself, so the full frame is never allocated."""
    header = check_header(data, max_pixels)
    flag, reduced = cv2.IMREAD_COLOR, 1
    if max_side and data[:2] == b"\xff\xd8":
        for k, option in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if max(header.size) // k >= max_side:
                flag, reduced = option, k
                break
    stored = decode_stored(data, flag)
    if stored is None:
        return None, UNSCALED
    frame = _displayed(stored, header)
    scale = (frame.shape[1] / header.width, frame.shape[0] / header.height) if reduced > 1 else UNSCALED
    fitted, more = fit_side(frame, max_side)
    return fitted, (scale[0] * more[0], scale[1] * more[1])


def fit_side(frame: np.ndarray, max_side: int) -> tuple[np.ndarray, Scale]:
    """`frame` scaled down (area averaging) so that its longer side is at most `max_side` (0: unchanged), and the
    scale applied on each axis (each side is rounded to whole pixels on its own). A detector's network sees a few
    hundred pixels per side; a 6000x6000 photo would only cost memory and time (DeepStream's stream muxer scales
    every frame to the network's size likewise)."""
    height, width = frame.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return frame, UNSCALED
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = np.ascontiguousarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
    return resized, (size[0] / width, size[1] / height)
