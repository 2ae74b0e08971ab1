"""A model stage's metrics through ray.serve.metrics (Prometheus adds Ray's `ray_` prefix):

- pipeline_compute_ms{stage}: model compute time of each engine call in a detector / classifier stage
- pipeline_batch_size{stage}: items (frames or crops) per engine call
"""

from __future__ import annotations

from ray.serve.metrics import Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 600, 1000, 2000, 5000]
COUNTS = [0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5]  # bucket edges between whole counts


class StageMetrics:
    """Inside a model stage: compute time and items of each engine call."""

    def __init__(self, stage: str) -> None:
        self._tags = {"stage": stage}
        self.compute = Histogram(
            "pipeline_compute_ms", description="Model compute inside a replica (ms)", boundaries=LATENCY_MS,
            tag_keys=("stage",),
        )
        self.batch_size = Histogram(
            "pipeline_batch_size", description="Items (frames or crops) per engine call", boundaries=COUNTS,
            tag_keys=("stage",),
        )

    def record(self, batch_size: int, compute_ms: float) -> None:
        self.compute.observe(compute_ms, tags=self._tags)
        self.batch_size.observe(batch_size, tags=self._tags)
