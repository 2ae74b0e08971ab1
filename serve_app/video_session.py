"""One video through the graph: detect every processed frame, track, and classify each track only when its
cached attributes are due, DeepStream's secondary-classifier behaviour.

With `detector.interval` N the detector runs on one processed frame in N + 1 (DeepStream nvinfer's `interval`);
the frames between carry each tracked object on at its last velocity (engines/tracking.py `CarriedBoxes`), with
its cached attributes, and classify nothing; their records say `"detected": false`.

A classifier classifies a track when the track first appears (once confirmed by the tracker), again when its
box area has grown by `reinfer_area_growth` since the last classification, and after `reinfer_interval` frames
if set. Every frame's object carries the latest attribute of each classifier and the frame it was computed on.
The classifications that do run go out together through the same parallel fan-out; chained classifiers
(`operate_on_classifiers`) run after their parents, on the tracks whose cached parent label matches.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines import Detections
from engines.tracking import CarriedBoxes, Tracker, TrackerParams
from serve_app.config import PipelineConfig
from serve_app.offload import INLINE, CpuWork
from serve_app.graph import ClassifierRoute, DetectorUnavailable, GraphResult, InferenceGraph, topological_order


@dataclass
class Cached:
    attribute: dict[str, Any] | None  # None: classified, but below the classifier's threshold
    frame: int
    area: float


@dataclass
class TrackCache:
    """One classifier's latest result per track, and when it is due again."""

    area_growth: float
    interval: int
    entries: dict[int, Cached] = field(default_factory=dict)

    def due(self, track_ids: np.ndarray, areas: np.ndarray, frame: int) -> np.ndarray:
        """A mask over the rows: tracked (id >= 0) and new, grown, or past the interval."""
        mask = np.zeros(len(track_ids), bool)
        for row, (track, area) in enumerate(zip(track_ids.tolist(), areas.tolist())):
            if track < 0:
                continue
            entry = self.entries.get(track)
            mask[row] = (entry is None or area >= entry.area * (1 + self.area_growth)
                         or (self.interval > 0 and frame - entry.frame >= self.interval))
        return mask

    def label(self, track: int) -> str | None:
        entry = self.entries.get(track)
        return None if entry is None or entry.attribute is None else entry.attribute.get("label")


def _levels(routes: list[ClassifierRoute]) -> list[list[ClassifierRoute]]:
    """Routes grouped so that each group depends only on earlier groups."""
    levels: list[list[ClassifierRoute]] = []
    for route in topological_order(routes):
        depth = max((i + 1 for i, level in enumerate(levels) for r in level
                     if r.name in {p for p, _ in route.parents}), default=0)
        if depth == len(levels):
            levels.append([])
        levels[depth].append(route)
    return levels


class VideoSession:
    """The per-video state: the tracker, each classifier's cache, and the counts of the summary line."""

    def __init__(self, graph: InferenceGraph, tracker: TrackerParams, routes: list[ClassifierRoute],
                 reinfer: dict[str, tuple[float, int]], fps: float, cpu: CpuWork = INLINE, interval: int = 0) -> None:
        """`interval`: the detector runs on one processed frame in interval + 1; the frames between get the tracked
        objects carried on (`CarriedBoxes`) and their cached attributes (detector.interval)."""
        self._graph = graph
        self._interval = interval
        self._skipped = interval  # processed frames since the last detected one: the first frame is detected
        self._carried = CarriedBoxes()
        self.detected_frames = 0
        self._cpu = cpu  # where the tracker runs (and `records` reads frames)
        self._fps = fps  # the video's frame rate (0: unknown), for each frame's time_ms
        self._tracker = Tracker(tracker)
        self._levels = _levels(routes)
        self._caches = {r.name: TrackCache(*reinfer[r.name]) for r in routes}
        self.classifier_calls: Counter[str] = Counter({r.name: 0 for r in routes})
        self.frames = 0
        self.objects_seen = 0
        self.tracks: set[int] = set()
        self._started = time.perf_counter()
        # this frame's counts, for the metrics: new tracks, and per classifier objects classified / served from cache
        self.last_new_tracks = 0
        self.last_classified: dict[str, int] = {}
        self.last_cached: dict[str, int] = {}

    @property
    def track_count(self) -> int:
        return len(self.tracks)

    def _detects_next(self) -> bool:
        """Whether the next processed frame goes to the detector (one in interval + 1); frames are asked in order."""
        due = self._skipped >= self._interval
        self._skipped = 0 if due else self._skipped + 1
        return due

    def begin(self, frame: Any, source: Hashable | None = None) -> asyncio.Future[GraphResult] | None:
        """The frame's detection, started now (frames are begun in order), or None on a frame the detector skips.
        Its record comes from `complete`, in the same order: detection runs ahead of tracking and classification.
        `source`: the live stream it is of (the streams' muxer counts streams, not frames)."""
        return asyncio.ensure_future(self._graph.detect(frame, source)) if self._detects_next() else None

    async def complete(self, index: int, frame: Any, detecting: asyncio.Future[GraphResult] | None) -> dict[str, Any]:
        """The record of a frame `begin` started: its detections tracked and classified (`process`), or carried
        (`carry`); an error record if the detector did not answer."""
        if detecting is None:
            return self.carry(index, frame)
        try:
            detected = await detecting
        except DetectorUnavailable as exc:
            return {"error": {"code": "detector_unavailable", "message": str(exc), "frame": index}}
        return await self.process(index, frame, detected.detections)

    def _eligible(self, route: ClassifierRoute, detections: Detections, track_ids: np.ndarray) -> np.ndarray:
        """`route.select`, with each parent's label taken from its per-track cache."""
        return route.select(detections, lambda parent, row: self._caches[parent].label(int(track_ids[row])))

    async def process(self, index: int, frame: np.ndarray, detections: Detections) -> dict[str, Any]:
        """Track and classify one frame; its NDJSON record."""
        track_ids = await self._cpu.run(self._tracker.update, detections)
        self._carried.observe(index, detections, track_ids)
        self.detected_frames += 1
        xyxy = detections.xyxy
        areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) if len(detections) else np.zeros(0)
        errors: dict[str, Any] = {}
        self.last_classified, self.last_cached = {}, {}
        for level in self._levels:  # parents before the classifiers chained on them
            rows = {}
            for route in level:
                eligible = self._eligible(route, detections, track_ids)
                due = self._caches[route.name].due(track_ids[eligible], areas[eligible], index)
                rows[route.name] = eligible[due]
                self.last_classified[route.name] = int(due.sum())
                self.last_cached[route.name] = int((track_ids[eligible] >= 0).sum() - due.sum())
            result = await self._graph.classify_rows(frame, detections, rows)
            for name, (indices, classifications) in result.outputs.items():
                self.classifier_calls[name] += len(indices)
                cache = self._caches[name]
                for j, row in enumerate(indices.tolist()):
                    cache.entries[int(track_ids[row])] = Cached(classifications.attribute(j), index, float(areas[row]))
            errors |= {name: error.model_dump() for name, error in result.errors.items()}
        self.frames += 1
        self.objects_seen += len(detections)
        seen = {int(t) for t in track_ids.tolist() if t >= 0}
        self.last_new_tracks = len(seen - self.tracks)
        self.tracks |= seen
        return {"frame": index, "time_ms": self._time_ms(index), **self._detected(True),
                "objects": self._objects(detections, track_ids), **({"errors": errors} if errors else {})}

    def carry(self, index: int, frame: Any) -> dict[str, Any]:
        """A frame the detector skips: the tracked objects of the last detected frame, carried on to this one, with
        their cached attributes; nothing is classified."""
        height, width = (int(d) for d in frame.shape[:2])
        detections, track_ids = self._carried.at(index, width, height)
        self.frames += 1
        self.objects_seen += len(detections)
        self.last_new_tracks = 0
        self.last_classified = {name: 0 for name in self._caches}
        self.last_cached = {name: len(track_ids) for name in self._caches}
        return {"frame": index, "time_ms": self._time_ms(index), **self._detected(False),
                "objects": self._objects(detections, track_ids)}

    def _time_ms(self, index: int) -> float | None:
        return round(index * 1000.0 / self._fps, 1) if self._fps > 0 else None

    def _detected(self, detected: bool) -> dict[str, bool]:
        """`detected` in the records of a video whose detector skips frames (detector.interval > 0)."""
        return {"detected": detected} if self._interval else {}

    def _objects(self, detections: Detections, track_ids: np.ndarray) -> list[dict[str, Any]]:
        labels = detections.labels
        objects = []
        for row in range(len(detections)):
            track = int(track_ids[row])
            attributes = {}
            if track >= 0:
                for name, cache in self._caches.items():
                    entry = cache.entries.get(track)
                    if entry is not None and entry.attribute is not None:
                        attributes[name] = {**entry.attribute, "frame": entry.frame}
            objects.append({
                "track_id": track if track >= 0 else None,
                "box": [round(float(v), 1) for v in detections.xyxy[row]],
                "score": round(float(detections.confidence[row]), 4),
                "label": labels[row],
                "attributes": attributes,
            })
        return objects

    async def records(self, frames: Iterator[tuple[int, np.ndarray]], lookahead: int,
                      on_frame: Callable[[VideoSession], None] = lambda session: None,
                      ) -> AsyncIterator[tuple[dict[str, Any], np.ndarray | None]]:
        """Each processed frame's record and the frame, in order. Detection runs `lookahead` frames ahead, so that
        frames meet in the detector's batches while the tracker and the classifiers work on an earlier one. A
        detector failure ends the records with an error record (with no frame); the caller adds what follows
        (the summary). `on_frame` runs after each frame (the metrics)."""
        pending: deque[tuple[int, np.ndarray, asyncio.Future[GraphResult] | None]] = deque()
        try:
            while True:
                while len(pending) < lookahead and (item := await self._cpu.run(next, frames, None)) is not None:
                    index, frame = item
                    pending.append((index, frame, self.begin(frame)))
                if not pending:
                    return
                index, frame, detecting = pending.popleft()
                if detecting is None:  # a frame the detector skips
                    record = self.carry(index, frame)
                    on_frame(self)
                    yield record, frame
                    continue
                try:
                    detected = await detecting
                except DetectorUnavailable as exc:
                    yield {"error": {"code": "detector_unavailable", "message": str(exc), "frame": index}}, None
                    return
                record = await self.process(index, frame, detected.detections)
                on_frame(self)
                yield record, frame
        finally:
            for *_, detecting in pending:
                if detecting is not None:
                    detecting.cancel()

    def summary(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._started
        return {"summary": {
            "frames": self.frames,
            **({"detected_frames": self.detected_frames} if self._interval else {}),
            "tracks": len(self.tracks),
            "classifier_calls": dict(self.classifier_calls),
            "objects_seen": self.objects_seen,
            "fps": round(self.frames / wall, 2) if wall > 0 else None,
        }}


def new_session(graph: InferenceGraph, config: PipelineConfig, fps: float, cpu: CpuWork = INLINE) -> VideoSession:
    """A session with the configured tracker and each classifier's re-inference rules."""
    t = config.ingress.video.tracker
    interval = config.detector.interval
    # the tracker sees one frame in interval + 1: its frame rate (which scales its lost-track buffer) is theirs
    params = TrackerParams(t.activation_threshold, t.lost_track_buffer, t.matching_threshold,
                           (fps or 30.0) / (interval + 1))
    reinfer = {c.name: (c.reinfer_area_growth, c.reinfer_interval) for c in config.classifiers}
    return VideoSession(graph, params, graph.routes, reinfer, fps, cpu, interval)
