"""The detector deployment: one frame in, one Detections out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from ray import serve

from deployments.execution import ComputeExecutor
from deployments.models import build_detector
from deployments.placement_log import warn_if_gpu_unused
from engines import Detections
from engines.yolo import Yolo
from serve_app.config import DetectorConfig
from serve_app.telemetry import StageMetrics

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class DetectorResult:
    detections: Detections
    compute_ms: float


@serve.deployment(name="detector")
class Detector:
    def __init__(self, config: DetectorConfig, device: str) -> None:
        self._config = config
        self._model = build_detector(config, device)
        self._device = self._model.device
        warn_if_gpu_unused("detector", device, self._device, self._model.backend)
        self._executor = ComputeExecutor(config.engine.execution, self._device, "detector")
        self._metrics = StageMetrics("detector")
        self._probe = np.zeros((48, 48, 3), np.uint8)
        logger.info("detector %s ready on %s (execution %s)", config.kind, self._device, self._executor.mode)

    async def detect(self, frame: np.ndarray) -> DetectorResult:
        detections, ms = await self._executor.run(self._model.detect, frame)
        self._metrics.record(ms)
        return DetectorResult(detections, ms)

    async def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine cannot run a blank frame is restarted."""
        try:
            await self._executor.run(self._model.detect, self._probe)
        except Exception as exc:
            raise RuntimeError(f"detector: health probe failed: {type(exc).__name__}: {exc}") from exc

    async def describe(self) -> dict[str, object]:
        description: dict[str, object] = {
            "kind": self._config.kind,
            "labels": list(self._model.class_names),
            "backend": self._model.backend,
            "device": self._device,
            "execution": self._executor.mode,
        }
        if isinstance(self._model, Yolo):
            description["layout"] = self._model.layout
            description["model"] = self._config.yolo.model.name if self._config.yolo else None
        return description
