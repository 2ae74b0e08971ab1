"""Per-stage metrics through ray.serve.metrics (exported on Ray's Prometheus endpoint, shown in the dashboard).

Each replica creates its own instruments (no module-level state); Serve adds the deployment,
replica and application tags. Metric names (Prometheus adds Ray's `ray_` prefix):

- pipeline_requests_total{route, status}: HTTP requests answered by the ingress
- pipeline_stage_latency_ms{stage}: wall time of each stage seen from the ingress (detector, each classifier, total)
- pipeline_objects_per_image: detected objects per image
- pipeline_classifier_errors_total{classifier, code}: classifier calls that failed or timed out
- pipeline_batch_size{classifier}: crops per @serve.batch call in a classifier replica
- pipeline_compute_ms{stage}: model compute time inside the detector / classifier replicas
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 600, 1000, 2000, 5000]
COUNTS = [0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5]  # bucket edges between whole counts


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "pipeline_requests", description="HTTP requests answered, by route and status", tag_keys=("route", "status")
        )
        self.stage_latency = Histogram(
            "pipeline_stage_latency_ms",
            description="Wall time of each pipeline stage seen from the ingress (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("stage",),
        )
        self.objects = Histogram(
            "pipeline_objects_per_image", description="Detected objects per image", boundaries=COUNTS
        )
        self.classifier_errors = Counter(
            "pipeline_classifier_errors",
            description="Classifier calls that failed or timed out",
            tag_keys=("classifier", "code"),
        )

    def record(self, timings_ms: dict[str, float], objects: int, errors: dict[str, str]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_latency.observe(ms, tags={"stage": stage})
        self.objects.observe(objects)
        for name, code in errors.items():
            self.classifier_errors.inc(tags={"classifier": name, "code": code})


class StageMetrics:
    """Inside a model replica: compute time and, for classifiers, batch sizes."""

    def __init__(self, stage: str) -> None:
        self._tags = {"stage": stage}
        self.compute = Histogram(
            "pipeline_compute_ms", description="Model compute inside a replica (ms)", boundaries=LATENCY_MS,
            tag_keys=("stage",),
        )
        self.batch_size = Histogram(
            "pipeline_batch_size", description="Crops per batched classifier call", boundaries=COUNTS,
            tag_keys=("classifier",),
        )

    def record(self, compute_ms: float, batch: int | None = None) -> None:
        self.compute.observe(compute_ms, tags=self._tags)
        if batch is not None:
            self.batch_size.observe(batch, tags={"classifier": self._tags["stage"]})
