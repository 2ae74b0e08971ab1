"""Compressed image bytes -> BGR uint8 frame: the one decoder every stage uses, so a frame decoded in
the ingress (for the crops) and in the detector (from the same bytes) are identical."""

from __future__ import annotations

import cv2
import numpy as np


def decode_bgr(data: bytes) -> np.ndarray | None:
    """(H, W, 3) BGR uint8, contiguous; grey, 16-bit and alpha images are converted. None if undecodable."""
    try:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if frame is None or frame.size == 0:
        return None
    return np.ascontiguousarray(frame)
