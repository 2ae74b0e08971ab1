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
- pipeline_stream_fps{stream}, pipeline_stream_dropped_frames{stream}, pipeline_stream_tracks{stream}: each live
  stream's processed frames per second, frames its source delivered that the pipeline skipped, and tracks
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

        self.stream_fps = Gauge("pipeline_stream_fps", description="Frames a live stream processes per second",
                                tag_keys=("stream",))
        self.stream_dropped = Gauge("pipeline_stream_dropped_frames", tag_keys=("stream",),
                                    description="Frames a live stream's source delivered that the pipeline skipped")
        self.stream_tracks = Gauge("pipeline_stream_tracks", description="Tracks seen in a live stream",
                                   tag_keys=("stream",))

    def record_stream(self, stream_id: str, fps: float, dropped: int, tracks: int) -> None:
        tags = {"stream": stream_id}
        self.stream_fps.set(fps, tags=tags)
        self.stream_dropped.set(dropped, tags=tags)
        self.stream_tracks.set(tracks, tags=tags)

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
