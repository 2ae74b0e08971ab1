"""Every classifier in one deployment (layout `colocated`).

One replica holds all the classifier engines. The ingress's concurrent per-classifier calls of one
request travel together as one `classify_many` call (one hop instead of one per classifier), and the
replica runs them concurrently, each stage on its own compute thread (on a GPU each engine has its
own CUDA stream), so one process shares the GPU instead of several time-slicing it. Each classifier
answers or fails on its own: a failure comes back as a `StageFailure` for that name alone.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.results import ClassifierResult, StageFailure
from deployments.stages import ClassifierStage
from deployments.metrics import StageMetrics
from deployments.startup import freeze_startup_heap
from deployments.config import ClassifierConfig


@serve.deployment(name="classifiers")
class ClassifierPool:
    def __init__(self, configs: list[ClassifierConfig], devices: dict[str, str]) -> None:
        self._stages = {c.name: ClassifierStage(c, devices[c.name], shared=True, on_batch=StageMetrics(c.name).record)
                        for c in configs}
        freeze_startup_heap()

    async def classify(self, name: str, crops: np.ndarray) -> ClassifierResult:
        stage = self._stages.get(name)
        if stage is None:
            raise ValueError(f"no classifier named {name!r} here; have {sorted(self._stages)}")
        return await stage.classify(crops)

    async def classify_many(self, calls: list[tuple[str, np.ndarray]]) -> list[ClassifierResult | StageFailure]:
        """Several (classifier name, crops) calls at once, run concurrently; each answers or fails on its own."""
        answers = await asyncio.gather(*(self.classify(name, crops) for name, crops in calls), return_exceptions=True)
        return [StageFailure.of(a) if isinstance(a, BaseException) else a for a in answers]

    async def check_health(self) -> None:
        await asyncio.gather(*(stage.check_health() for stage in self._stages.values()))

    def __del__(self) -> None:
        """Serve calls this when the replica stops: release the engines."""
        for stage in getattr(self, "_stages", {}).values():
            stage.close()

    async def describe(self) -> list[dict[str, object]]:
        return [stage.describe() for stage in self._stages.values()]
