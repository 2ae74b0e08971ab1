"""Images decoded into device memory, turned and scaled there: the GPU side of engines/image.py.

A frame on the device is a torch uint8 tensor (H, W, 3), BGR, as displayed: the layout of a decoded numpy
frame, so the detector, the crops and the answer treat both alike. JPEGs are decoded by nvJPEG
(torchvision's `decode_jpeg` on a CUDA device), several at once when several arrive together; other formats,
and JPEGs where nvJPEG is not there, are decoded by OpenCV on the host, as `decode_bgr` does, and uploaded once
from page-locked memory. The EXIF orientation read from the header is applied on the device, and `fit_side`'s
INTER_AREA scaling to the detector's working side is two matrix products there (engines/torch_boxes.py), the
same arithmetic as OpenCV's. Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from engines.image import UNSCALED, ImageHeader, Scale, decode_stored, read_header
from engines.torch_boxes import image_resize_weights, resize_image

logger = logging.getLogger(__name__)


def orient_tensor(frame: Any, orientation: int) -> Any:
    """engines/image.py's `orient` for an (H, W, C) tensor: the same flips and transposes."""
    if orientation == 2:
        return frame.flip(1)
    if orientation == 3:
        return frame.flip(0).flip(1)
    if orientation == 4:
        return frame.flip(0)
    if orientation >= 5:
        turned = frame.transpose(0, 1)
        return {5: turned, 6: turned.flip(1), 7: turned.flip(0).flip(1), 8: turned.flip(0)}[orientation]
    return frame


@functools.lru_cache(maxsize=16)
def _weights(height: int, width: int, out_height: int, out_width: int, device: str) -> tuple[Any, Any]:
    """The INTER_AREA resize matrices of one frame size, made once (a camera or a photo size repeats)."""
    return image_resize_weights(height, width, out_height, out_width, device)


def fit_side_tensor(frame: Any, max_side: int) -> tuple[Any, Scale]:
    """engines/image.py's `fit_side` on the device: the (H, W, 3) uint8 frame scaled down (OpenCV's INTER_AREA)
    so that its longer side is at most `max_side`, and the scale on each axis."""
    import torch

    height, width = int(frame.shape[0]), int(frame.shape[1])
    if not max_side or max(height, width) <= max_side:
        return frame, UNSCALED
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    weights = _weights(height, width, size[1], size[0], str(frame.device))
    with torch.inference_mode():
        planes = frame.permute(2, 0, 1).float()[None]  # (1, 3, H, W)
        scaled = resize_image(planes, weights)[0].permute(1, 2, 0)
        return scaled.round().clamp(0, 255).to(torch.uint8).contiguous(), (size[0] / width, size[1] / height)


class DeviceDecoder:
    """Compressed images -> displayed BGR frames on `device`. `decode_many` takes the images of concurrent
    requests in one call (nvJPEG decodes a batch of JPEGs in one go)."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        self._torch = torch
        self._nvjpeg = None
        if device.startswith("cuda"):
            try:
                from torchvision.io import ImageReadMode, decode_jpeg

                self._nvjpeg = decode_jpeg
                self._rgb = ImageReadMode.RGB
            except ImportError as exc:  # OpenCV on the host, uploaded once
                logger.warning("torchvision is not importable (%s): images are decoded on the host", exc)

    @property
    def decodes_jpeg_on_device(self) -> bool:
        return self._nvjpeg is not None

    def decode(self, data: bytes) -> Any:
        """One image; None if it will not decode."""
        return self.decode_many([data])[0]

    def decode_many(self, images: Sequence[bytes]) -> list[Any]:
        """Each image as a device frame (H, W, 3) uint8 BGR, displayed; None for one that will not decode."""
        headers = [read_header(data) for data in images]
        out: list[Any] = [None] * len(images)
        jpegs = [i for i, (data, header) in enumerate(zip(images, headers))
                 if self._nvjpeg is not None and header is not None and data[:2] == b"\xff\xd8"]
        if jpegs:
            out_jpegs = self._nvjpeg_many([images[i] for i in jpegs])
            for i, planes in zip(jpegs, out_jpegs):
                out[i] = None if planes is None else self._displayed(planes.permute(1, 2, 0).flip(2), headers[i])
        for i, data in enumerate(images):
            if out[i] is None:  # not a JPEG, or one nvJPEG would not take
                out[i] = self._on_host(data, headers[i])
        return out

    def _nvjpeg_many(self, images: list[bytes]) -> list[Any]:
        torch = self._torch
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        try:
            return list(self._nvjpeg(encoded, mode=self._rgb, device=self.device))
        except RuntimeError:  # one of them nvJPEG cannot take (a CMYK or lossless JPEG): each on its own
            decoded = []
            for one in encoded:
                try:
                    decoded.append(self._nvjpeg(one, mode=self._rgb, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def _on_host(self, data: bytes, header: ImageHeader | None) -> Any:
        stored = decode_stored(data, cv2.IMREAD_COLOR)
        if stored is None:
            return None
        torch = self._torch
        host = torch.from_numpy(np.ascontiguousarray(stored))
        if self.device.startswith("cuda"):
            host = host.pin_memory()
        frame = host.to(self.device, non_blocking=True)
        return frame if header is None or header.decoder_orients else self._displayed(frame, header)

    def _displayed(self, frame: Any, header: ImageHeader | None) -> Any:
        return (frame if header is None else orient_tensor(frame, header.orientation)).contiguous()
