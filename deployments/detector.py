"""The detector deployment: one frame in, one Detections out (frames of concurrent calls batched)."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.results import DetectorResult
from deployments.stages import DetectorStage
from deployments.metrics import StageMetrics
from deployments.startup import freeze_startup_heap
from deployments.config import DetectorConfig


@serve.deployment(name="detector")
class Detector:
    def __init__(self, config: DetectorConfig, device: str) -> None:
        self._stage = DetectorStage(config, device, on_batch=StageMetrics("detector").record)
        freeze_startup_heap()

    async def detect(self, image: np.ndarray | bytes) -> DetectorResult:
        return await self._stage.detect(image)

    async def detect_many(self, images: list[np.ndarray | bytes]) -> list[DetectorResult]:
        """Frames of several streams in one call (the streams' muxer): they reach the engine's batcher together."""
        return list(await asyncio.gather(*(self._stage.detect(image) for image in images)))

    async def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine cannot run a blank frame is restarted."""
        await self._stage.check_health()

    def __del__(self) -> None:
        """Serve calls this when the replica stops: release the engines."""
        if hasattr(self, "_stage"):
            self._stage.close()

    async def describe(self) -> dict[str, object]:
        return self._stage.describe()
