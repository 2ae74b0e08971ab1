"""The same pipeline in one process, with the project's own engines: the baseline the graph is held to.
Per request it does the graph's work too (decode, crops), so the figures compare the same work."""

from __future__ import annotations

import time
from dataclasses import dataclass

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
        """One request, stages one after another, each timed (milliseconds)."""
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
        return StageTimes((decoded - start) * 1e3, det_ms, times)

    def batched_throughput(self, frame: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
        """Images per second each stage sustains alone, classifiers fed `batch` crops at a time."""
        detections = self.detector.detect(frame)
        rates = {}
        t0 = time.perf_counter()
        for _ in range(repeats):
            self.detector.detect(frame)
        self._sync()
        rates["detector"] = repeats / (time.perf_counter() - t0)
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
