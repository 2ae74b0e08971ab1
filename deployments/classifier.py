"""A classifier deployment, instantiated once per configured classifier (layout `separate`).

Requests carry uint8 BGR crops already at the network's input size; crops of concurrent requests
are batched together, sized in crops, without waiting when the engine is idle.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.results import ClassifierResult
from deployments.stages import ClassifierStage
from deployments.metrics import StageMetrics
from deployments.startup import freeze_startup_heap
from deployments.config import ClassifierConfig


@serve.deployment
class Classifier:
    def __init__(self, config: ClassifierConfig, device: str) -> None:
        self._stage = ClassifierStage(config, device, on_batch=StageMetrics(config.name).record)
        freeze_startup_heap()

    async def classify(self, crops: np.ndarray) -> ClassifierResult:
        return await self._stage.classify(crops)

    async def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine cannot classify a blank crop is restarted."""
        await self._stage.check_health()

    def __del__(self) -> None:
        """Serve calls this when the replica stops: release the engines."""
        if hasattr(self, "_stage"):
            self._stage.close()

    async def describe(self) -> dict[str, object]:
        return self._stage.describe()
