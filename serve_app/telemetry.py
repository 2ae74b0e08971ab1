"""Per-stage metrics through ray.serve.metrics (exported on Ray's Prometheus endpoint, shown in the dashboard).

Each replica creates its own instruments (no module-level state); Serve adds the deployment,
replica and application tags. Metric names (Prometheus adds Ray's `ray_` prefix):

- pipeline_requests_total{route, status}: HTTP requests answered by the ingress
- pipeline_stage_latency_ms{stage}: wall time of each stage seen from the ingress (detector, each classifier, total)
- pipeline_objects_per_image: detected objects per image
- pipeline_classifier_errors_total{classifier, code}: classifier calls that failed or timed out
- pipeline_span_ms{span}: the critical path of each request, span by span (read_body, decode,
  detector.transport / .queue / .compute, crop, <classifier>.transport / .queue / .compute, merge): the
  same breakdown that `?trace=true` returns with one answer
- pipeline_video_frames_total: video frames processed (a rate of it is the service's video fps)
- pipeline_video_tracks_total: tracks that appeared in processed videos
- pipeline_streams: live streams running (the streams deployment); pipeline_stream_frames_total{outcome}: their
  frames, processed, dropped (the source delivered them while the pipeline was busy) or failed (the detector
  did not answer, or their processing raised). Per stream figures are in GET /v1/streams: a series per stream id would grow without bound.
- pipeline_video_cache_total{classifier, outcome}: tracked objects per frame whose attribute was served from the
  per-track cache (hit) or classified (miss); hit / (hit + miss) is the cache hit rate
(The model stages' own metrics, pipeline_compute_ms{stage} and pipeline_batch_size{stage}, are in
deployments/metrics.py.)
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from deployments.metrics import COUNTS, LATENCY_MS


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

        self.spans = Histogram(
            "pipeline_span_ms",
            description="Each span of a request's critical path, seen from the ingress (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("span",),
        )

        self.video_frames = Counter("pipeline_video_frames", description="Video frames processed")
        self.video_tracks = Counter("pipeline_video_tracks", description="Tracks that appeared in processed videos")
        self.video_cache = Counter(
            "pipeline_video_cache",
            description="Tracked objects per frame: attribute from the per-track cache (hit) or classified (miss)",
            tag_keys=("classifier", "outcome"),
        )


    def record_video_frame(self, new_tracks: int, classified: dict[str, int], cached: dict[str, int]) -> None:
        self.video_frames.inc()
        if new_tracks:
            self.video_tracks.inc(new_tracks)
        for name, n in classified.items():
            if n:
                self.video_cache.inc(n, tags={"classifier": name, "outcome": "miss"})
        for name, n in cached.items():
            if n:
                self.video_cache.inc(n, tags={"classifier": name, "outcome": "hit"})

    def record(
        self, timings_ms: dict[str, float], objects: int, errors: dict[str, str], spans: dict[str, float]
    ) -> None:
        for stage, ms in timings_ms.items():
            self.stage_latency.observe(ms, tags={"stage": stage})
        for span, ms in spans.items():
            self.spans.observe(ms, tags={"span": span})
        self.objects.observe(objects)
        for name, code in errors.items():
            self.classifier_errors.inc(tags={"classifier": name, "code": code})


class StreamMetrics:
    """The streams deployment's metrics: bounded series, whatever the number of streams that come and go."""

    def __init__(self) -> None:
        self.running = Gauge("pipeline_streams", description="Live streams running")
        self.frames = Counter("pipeline_stream_frames", tag_keys=("outcome",),
                              description="Live stream frames: processed, dropped (pipeline busy) or failed (the "
                              "detector away, or their processing raised)")
        self._seen: dict[str, tuple[int, int, int]] = {}  # stream -> counts already reported

    def record(self, stream_id: str, processed: int, dropped: int, failed: int) -> None:
        before = self._seen.get(stream_id, (0, 0, 0))
        for outcome, now, then in zip(("processed", "dropped", "failed"), (processed, dropped, failed), before):
            if now > then:
                self.frames.inc(now - then, tags={"outcome": outcome})
        self._seen[stream_id] = (processed, dropped, failed)
        self.running.set(len(self._seen))

    def forget(self, stream_id: str) -> None:
        self._seen.pop(stream_id, None)
        self.running.set(len(self._seen))
