"""A classifier deployment, instantiated once per configured classifier.

Requests carry uint8 BGR crops already at the network's input size. Crops from concurrent
requests are batched together with @serve.batch, sized in crops (not requests).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from ray import serve

from deployments.execution import ComputeExecutor
from deployments.models import build_classifier
from deployments.placement_log import warn_if_gpu_unused
from engines import Classifications, EngineError
from serve_app.config import ClassifierConfig
from serve_app.telemetry import StageMetrics

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ClassifierResult:
    classifications: Classifications
    compute_ms: float  # time of the batch(es) this request rode in
    batch_crops: int  # crops in the largest batch it rode in


def _crop_count(chunks: list[np.ndarray]) -> int:
    return sum(len(c) for c in chunks)


@serve.deployment
class Classifier:
    def __init__(self, config: ClassifierConfig, device: str) -> None:
        self._config = config
        try:
            self._model = build_classifier(config, device)
        except EngineError as exc:
            raise ValueError(f"classifiers[{config.name}] (model {config.model.name}): {exc}") from exc
        self._device = self._model.engine.device
        warn_if_gpu_unused(config.name, device, self._device, self._model.engine.backend)
        self._executor = ComputeExecutor(config.engine.execution, self._device, config.name)
        self._shape = (config.input.height, config.input.width, 3)
        self._max_batch = config.batching.max_batch_size
        self._batched.set_max_batch_size(self._max_batch)
        self._batched.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)
        self._metrics = StageMetrics(config.name)
        self._probe = np.zeros((1, *self._shape), np.uint8)
        logger.info("classifier %s ready on %s (execution %s)", config.name, self._device, self._executor.mode)

    async def classify(self, crops: np.ndarray) -> ClassifierResult:
        if crops.dtype != np.uint8 or crops.shape[1:] != self._shape:
            raise ValueError(f"{self._config.name}: crops must be (N, {self._shape}) uint8, got {crops.shape} {crops.dtype}")
        if len(crops) == 0:
            return ClassifierResult(self._model.predict(crops), 0.0, 0)
        chunks = [crops[i : i + self._max_batch] for i in range(0, len(crops), self._max_batch)]
        parts = await asyncio.gather(*(self._batched(chunk) for chunk in chunks))
        return ClassifierResult(
            Classifications.concatenate([p[0] for p in parts]),
            max(p[1] for p in parts),
            max(p[2] for p in parts),
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=_crop_count)
    async def _batched(self, chunks: list[np.ndarray]) -> list[tuple[Classifications, float, int]]:
        batch = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        result, ms = await self._executor.run(self._model.predict, batch)
        self._metrics.record(ms, len(batch))
        return [(part, ms, len(batch)) for part in result.split([len(c) for c in chunks])]

    async def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine cannot classify a blank crop is restarted."""
        try:
            result, _ = await self._executor.run(self._model.predict, self._probe)
            if len(result) != 1:
                raise RuntimeError(f"{len(result)} results for 1 crop")
        except Exception as exc:
            raise RuntimeError(f"{self._config.name}: health probe failed: {type(exc).__name__}: {exc}") from exc

    async def describe(self) -> dict[str, object]:
        c = self._config
        return {
            "name": c.name,
            "kind": c.kind,
            "model": c.model.name,
            "operate_on_labels": c.operate_on_labels,
            "min_object_width": c.min_object_width,
            "min_object_height": c.min_object_height,
            "threshold": c.threshold,
            "timeout_s": c.timeout_s,
            "input": c.input.model_dump(),
            "max_batch_size": self._max_batch,
            "backend": self._model.engine.backend,
            "device": self._device,
            "execution": self._executor.mode,
        }
