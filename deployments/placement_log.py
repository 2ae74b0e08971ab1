"""One warning, logged where a replica holds a GPU fraction its engine does not use."""

from __future__ import annotations

import logging

logger = logging.getLogger("ray.serve")


def warn_if_gpu_unused(name: str, requested: str, actual: str, backend: str) -> None:
    if requested != "cpu" and actual == "cpu":
        hint = "install onnxruntime-gpu, or use backend torch" if backend == "onnxruntime" else "check the CUDA setup"
        logger.warning("%s: a GPU fraction is reserved but the %s engine runs on CPU (%s)", name, backend, hint)
