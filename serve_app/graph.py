"""The inference graph: detect, crop, fan out to every classifier at once, merge.

This is the DeepStream "detector -> classifier1 -> classifier2 -> classifier3" pipeline with the
secondary classifiers run concurrently (latency t_det + max(t_i) instead of t_det + sum(t_i)).
A classifier that fails or times out costs only its own attribute: the answer carries every
other result plus a per-classifier error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from engines import Classifications, Detections
from engines.preprocess import CropSpec, crop_resize
from serve_app.config import ClassifierConfig
from serve_app.schema import DetectedObject, StageError

logger = logging.getLogger("ray.serve")


class DetectorUnavailable(RuntimeError):
    """The detector failed or timed out: the request cannot be answered (HTTP 503)."""


@dataclass(frozen=True)
class ClassifierRoute:
    """Which objects one classifier sees, and how they are cropped for it."""

    name: str
    handle: Any  # ray.serve.handle.DeploymentHandle (kept loose so unit tests can pass fakes)
    crop: CropSpec
    labels: frozenset[str] | None
    min_width: float
    min_height: float
    timeout_s: float

    @classmethod
    def from_config(cls, config: ClassifierConfig, handle: Any) -> ClassifierRoute:
        return cls(
            config.name,
            handle,
            CropSpec(
                config.input.width, config.input.height, config.crop.square, config.crop.padding, config.crop.keep_aspect
            ),
            None if config.operate_on_labels is None else frozenset(config.operate_on_labels),
            config.min_object_width,
            config.min_object_height,
            config.timeout_s,
        )


@dataclass
class GraphResult:
    detections: Detections
    outputs: dict[str, tuple[np.ndarray, Classifications]] = field(default_factory=dict)
    errors: dict[str, StageError] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


_PATH = re.compile(r"[\w.~-]*(?:/[\w.~-]+)+\.(?:h|hpp|c|cc|cpp|cu|py|onnx|engine|so)(?::\d+)?")


def _short_error(exc: BaseException) -> str:
    """One line naming the failure, without tracebacks, file paths or source locations."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    first = _PATH.sub("<path>", text[0] if text else "")
    return f"{type(cause).__name__}: {first}"[:300]


async def _await(response: Awaitable[Any]) -> Any:
    return await response


def merge(detections: Detections, outputs: Mapping[str, tuple[np.ndarray, Classifications]]) -> list[DetectedObject]:
    """One record per detected object, with each classifier's attribute where it ran and passed."""
    attributes: list[dict[str, dict[str, Any]]] = [{} for _ in range(len(detections))]
    for name, (indices, result) in outputs.items():
        if len(indices) != len(result):
            raise ValueError(f"{name}: {len(result)} results for {len(indices)} objects")
        for row, obj in enumerate(indices.tolist()):
            attribute = result.attribute(row)
            if attribute is not None:
                attributes[obj][name] = attribute
    labels = detections.labels
    landmarks = detections.landmarks
    return [
        DetectedObject(
            box=[round(float(v), 1) for v in detections.xyxy[i]],
            score=round(float(detections.confidence[i]), 4),
            label=labels[i],
            landmarks=None if landmarks is None else [[round(float(x), 1), round(float(y), 1)] for x, y in landmarks[i]],
            attributes=attributes[i],
        )
        for i in range(len(detections))
    ]


class InferenceGraph:
    def __init__(self, detector: Any, routes: list[ClassifierRoute], detector_timeout_s: float) -> None:
        self._detector = detector
        self._routes = routes
        self._detector_timeout_s = detector_timeout_s

    async def _detect(self, frame: np.ndarray) -> Detections:
        response = self._detector.detect.remote(frame)
        try:
            result = await asyncio.wait_for(_await(response), self._detector_timeout_s)
        except asyncio.TimeoutError as exc:
            response.cancel()
            raise DetectorUnavailable(f"the detector did not answer within {self._detector_timeout_s:g} s") from exc
        except Exception as exc:
            logger.warning("detector failed: %s", _short_error(exc))
            raise DetectorUnavailable(f"the detector failed: {_short_error(exc)}") from exc
        return result.detections

    async def _call_with_retry(self, route: ClassifierRoute, crops: np.ndarray) -> Any:
        """One classifier call; retried once if the replica died under it (Serve routes the retry to a
        live replica, or holds it until the replacement is up, within the same deadline)."""
        for attempt in (1, 2):
            response = route.handle.classify.remote(crops)
            try:
                return await _await(response)
            except asyncio.CancelledError:  # the deadline passed: stop the work on the replica too
                response.cancel()
                raise
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt == 2:
                    raise
                logger.warning("classifier %s: replica lost (%s); retrying once", route.name, type(exc).__name__)
        raise AssertionError("unreachable")

    async def _classify(self, route: ClassifierRoute, crops: np.ndarray, out: GraphResult, indices: np.ndarray) -> None:
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(self._call_with_retry(route, crops), route.timeout_s)
        except asyncio.TimeoutError:
            out.errors[route.name] = StageError(code="timeout", message=f"no answer within {route.timeout_s:g} s")
        except Exception as exc:
            logger.warning("classifier %s failed: %s", route.name, _short_error(exc))
            out.errors[route.name] = StageError(code="failed", message=_short_error(exc))
        else:
            out.outputs[route.name] = (indices, result.classifications)
        out.timings_ms[route.name] = round((time.perf_counter() - start) * 1e3, 2)

    async def run(self, frame: np.ndarray, mode: str) -> GraphResult:
        start = time.perf_counter()
        detections = await self._detect(frame)
        out = GraphResult(detections, timings_ms={"detector": round((time.perf_counter() - start) * 1e3, 2)})
        calls = []
        for route in self._routes:
            indices = detections.select(route.labels, route.min_width, route.min_height)
            if len(indices) == 0:
                continue
            crops = crop_resize(frame, detections.xyxy[indices], route.crop)
            calls.append((route, crops, indices))
        if mode == "sequential":
            for route, crops, indices in calls:
                await self._classify(route, crops, out, indices)
        else:
            await asyncio.gather(*(self._classify(route, crops, out, indices) for route, crops, indices in calls))
        order = [route.name for route in self._routes]  # answer in config order, not completion order
        out.outputs = {n: out.outputs[n] for n in order if n in out.outputs}
        out.errors = {n: out.errors[n] for n in order if n in out.errors}
        out.timings_ms = {k: out.timings_ms[k] for k in ("detector", *order) if k in out.timings_ms}
        return out
