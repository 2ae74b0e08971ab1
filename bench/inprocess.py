"""The same pipeline in one process, with the project's own engines: the baseline the graph is held to.
Per request it does the graph's work too (decode, crops), so the figures compare the same work."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.models import build_classifier, build_detector
from engines.preprocess import crop_resize
from serve_app.config import PipelineConfig
from serve_app.decoding import decode_image
from serve_app.graph import ClassifierRoute


@dataclass
class StageTimes:
    decode: float
    detector: float
    classifiers: dict[str, float]  # each including its crops
    parallel: float | None = None  # every classifier launched, then every one waited for (crops included)

    @property
    def sequential(self) -> float:
        return self.decode + self.detector + sum(self.classifiers.values())

    @property
    def ideal_parallel(self) -> float:
        return self.decode + self.detector + max(self.classifiers.values(), default=0.0)


class InProcessPipeline:
    def __init__(self, config: PipelineConfig, device: str) -> None:
        self.max_pixels = config.ingress.max_image_pixels
        self.detector = build_detector(config.detector, device)
        self.classifiers = {c.name: build_classifier(c, device) for c in config.classifiers}
        self.routes = [ClassifierRoute.from_config(c, None) for c in config.classifiers]
        self._sync = _cuda_sync if device == "cuda" else (lambda: None)

    def decode(self, body: bytes) -> np.ndarray:
        return decode_image(body, self.max_pixels)

    def run(self, body: bytes) -> StageTimes:
        """One request, stages one after another, each timed (milliseconds); then the classifiers again,
        launched together (each crops, then launches; then every one is waited for), as one process that
        fans out would run them."""
        start = time.perf_counter()
        frame = self.decode(body)
        decoded = time.perf_counter()
        detections = self.detector.detect(frame)
        self._sync()
        det_ms = (time.perf_counter() - decoded) * 1e3
        times = {}
        for route in self.routes:
            t0 = time.perf_counter()
            indices = detections.select(route.labels, route.min_width, route.min_height)
            if len(indices):
                self.classifiers[route.name].predict(crop_resize(frame, detections.xyxy[indices], route.crop))
                self._sync()
            times[route.name] = (time.perf_counter() - t0) * 1e3
        return StageTimes((decoded - start) * 1e3, det_ms, times, self.classify_together(frame, detections))

    def classify_together(self, frame: np.ndarray, detections: Any) -> float:
        """Milliseconds for every classifier launched before any is waited for (crops included)."""
        t0 = time.perf_counter()
        pending = []
        for route in self.routes:
            indices = detections.select(route.labels, route.min_width, route.min_height)
            if len(indices):
                pending.append(self.classifiers[route.name].launch(crop_resize(frame, detections.xyxy[indices], route.crop)))
        for run in pending:
            run.wait()
        self._sync()
        return (time.perf_counter() - t0) * 1e3

    def batched_throughput(self, frame: np.ndarray, batch: int, repeats: int, frames: int = 8) -> dict[str, float]:
        """Images per second each stage sustains alone: the detector one frame per call and `frames` frames per
        call (as its deployment batches concurrent requests), classifiers fed `batch` crops at a time."""
        detections = self.detector.detect(frame)
        rates = {}
        t0 = time.perf_counter()
        for _ in range(repeats):
            self.detector.detect(frame)
        self._sync()
        rates["detector"] = repeats / (time.perf_counter() - t0)
        self.detector.detect_batch([frame] * frames)
        t0 = time.perf_counter()
        for _ in range(max(1, repeats // 2)):
            self.detector.detect_batch([frame] * frames)
        self._sync()
        rates[f"detector_batch{frames}"] = max(1, repeats // 2) * frames / (time.perf_counter() - t0)
        for route in self.routes:
            indices = detections.select(route.labels, route.min_width, route.min_height)
            crops = crop_resize(frame, detections.xyxy[indices], route.crop)
            per_image = max(len(crops), 1)
            crops = np.concatenate([crops] * max(1, batch // per_image)) if len(crops) else crops
            model = self.classifiers[route.name]
            model.predict(crops)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.predict(crops)
            self._sync()
            rates[route.name] = repeats * len(crops) / per_image / (time.perf_counter() - t0)
        return rates


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()
