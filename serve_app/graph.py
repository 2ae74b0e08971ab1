"""The inference graph: detect, crop, fan out to every classifier at once, merge.

This is the DeepStream "detector -> classifier1 -> classifier2 -> classifier3" pipeline with the
secondary classifiers run concurrently (latency t_det + max(t_i) instead of t_det + sum(t_i)).
A classifier chained on others (`operate_on_classifiers`) starts as soon as its own parents have
answered, on the objects they selected; the independent ones start together right after the detector.
A classifier that fails or times out costs only its own attribute (and its dependents', which say
why): the answer carries every other result plus a per-classifier error. Every call records where
its time went (`CallSpan`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.results import StageTiming
from engines import Classifications, Detections
from engines.image import Scale, inverse
from engines.preprocess import CropSpec, cut_crops, cut_crops_specs, take_rows
from serve_app.clients import ClassifierClient, DetectorClient
from serve_app.config import ClassifierConfig
from serve_app.decoding import InputError
from serve_app.offload import INLINE, CpuWork
from serve_app.schema import DetectedObject, StageError

logger = logging.getLogger("ray.serve")
_NO_BOXES = np.zeros((0, 4), np.float32)  # a frame that wants no crop of a geometry, cut with the others


CropCutter = Callable[[Any, np.ndarray, list[tuple["ClassifierRoute", np.ndarray]]], Awaitable[list[Any]]]


class DetectorUnavailable(RuntimeError):
    """The detector failed or timed out: the request cannot be answered (HTTP 503)."""


@dataclass(frozen=True)
class ClassifierRoute:
    """Which objects one classifier sees, how they are cropped for it, and how it is reached."""

    name: str
    client: ClassifierClient | None  # None where only the geometry is needed (the in-process benchmark)
    crop: CropSpec
    labels: frozenset[str] | None
    min_width: float
    min_height: float
    timeout_s: float
    parents: tuple[tuple[str, frozenset[str]], ...] = ()  # classifier -> the labels of it this one runs on

    def select(self, detections: Detections, parent_label: Callable[[str, int], str | None]) -> np.ndarray:
        """The objects this classifier runs on: its detector filters, then, for each classifier it is chained on,
        the objects that one labelled with one of the required labels (`parent_label(parent, object index)`:
        from this request's answers, or from a video's per-track cache)."""
        indices = detections.select(self.labels, self.min_width, self.min_height)
        for parent, labels in self.parents:
            indices = np.array([i for i in indices.tolist() if parent_label(parent, i) in labels], np.int64)
        return indices

    @classmethod
    def from_config(cls, config: ClassifierConfig, client: ClassifierClient | None) -> ClassifierRoute:
        return cls(
            config.name,
            client,
            CropSpec(
                config.input.width, config.input.height, config.crop.square, config.crop.padding, config.crop.keep_aspect
            ),
            None if config.operate_on_labels is None else frozenset(config.operate_on_labels),
            config.min_object_width,
            config.min_object_height,
            config.timeout_s,
            tuple((name, frozenset(labels)) for name, labels in (config.operate_on_classifiers or {}).items()),
        )


@dataclass(frozen=True)
class CallSpan:
    """One stage call seen from both ends: the round trip at the caller, the timing inside the stage."""

    started_at: float  # time.perf_counter() when the call was made
    round_trip_ms: float
    timing: StageTiming
    attempts: int = 1  # 2 when a lost replica made the client call again

    @property
    def transport_ms(self) -> float:
        """Everything between caller and stage that is not the stage's own time: routing, (de)serialisation,
        scheduling of the replica's threads and processes."""
        return max(self.round_trip_ms - self.timing.handler_ms, 0.0)


@dataclass
class GraphResult:
    detections: Detections
    frame: np.ndarray | None = None  # the decoded image the crops were cut from
    outputs: dict[str, tuple[np.ndarray, Classifications]] = field(default_factory=dict)
    errors: dict[str, StageError] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    calls: dict[str, CallSpan] = field(default_factory=dict)  # "detector" and each classifier that answered
    decode_ms: float = 0.0  # the ingress's decode while the detector worked (run_encoded only)
    crop_ms: float = 0.0
    classify_ms: float = 0.0


_PATH = re.compile(r"[\w.~-]*(?:/[\w.~-]+)+\.(?:h|hpp|c|cc|cpp|cu|py|onnx|engine|so)(?::\d+)?")


def short_error(exc: BaseException) -> str:
    """One line naming the failure, without tracebacks, file paths or source locations."""
    cause = getattr(exc, "cause", None) or exc
    if callable(getattr(cause, "details", None)) and callable(getattr(cause, "code", None)):
        # a gRPC error (a by-value handle call): its str() is a multi-line dump whose first line says nothing
        code = getattr(cause.code(), "name", cause.code())
        return f"{type(cause).__name__}: {code}: {_PATH.sub('<path>', str(cause.details() or ''))}"[:300]
    text = str(cause).strip().splitlines()
    first = _PATH.sub("<path>", text[0] if text else "")
    kind = getattr(cause, "kind", None) or type(cause).__name__  # StageFailed names the stage's own exception
    return f"{kind}: {first}"[:300]


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1e3, 3)


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
    def __init__(self, detector: DetectorClient, routes: list[ClassifierRoute], detector_timeout_s: float,
                 cpu: CpuWork = INLINE, cut_on_device: CropCutter | None = None) -> None:
        """`cpu`: where the crops are cut (ingress.cpu_work); `cut_on_device`: how the crops of a frame on a device
        are cut (layout ingress: with other requests' frames, serve_app/device_frames.py); None: as host frames."""
        self._detector = detector
        self._routes = routes
        self._detector_timeout_s = detector_timeout_s
        self._cpu = cpu
        self._cut_on_device = cut_on_device

    @property
    def routes(self) -> list[ClassifierRoute]:
        return list(self._routes)

    async def detect(self, image: np.ndarray | bytes, source: Hashable | None = None) -> GraphResult:
        """The detector alone (video: each frame, before the tracker decides what to classify). `source`: the
        live stream the frame is of, for the streams' muxer (serve_app/stream_muxer.py)."""
        out = GraphResult(Detections.empty())
        await self._detect(image, out, source)
        return out

    async def classify_rows(self, frame: np.ndarray, detections: Detections,
                            rows: Mapping[str, np.ndarray]) -> GraphResult:
        """Classify the given objects (indices into `detections`) with each named classifier, all at once.
        Video uses it for the objects whose cached attributes are due."""
        out = GraphResult(detections, frame)
        by_name = {r.name: r for r in self._routes}
        wanted = [(by_name[name], indices) for name, indices in rows.items() if len(indices)]
        crops = await self._cpu.run(cut_each_spec_once, frame, detections.xyxy, wanted)
        await asyncio.gather(*(self._classify(route, c, out, i) for (route, i), c in zip(wanted, crops)))
        return out

    async def _detect(self, image: np.ndarray | bytes, out: GraphResult, source: Hashable | None = None) -> None:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self._detector_timeout_s):
                result = await self._detector.detect(image, source)
        except TimeoutError as exc:
            raise DetectorUnavailable(f"the detector did not answer within {self._detector_timeout_s:g} s") from exc
        except Exception as exc:
            logger.warning("detector failed: %s", short_error(exc))
            raise DetectorUnavailable(f"the detector failed: {short_error(exc)}") from exc
        if result.refused is not None:  # the detector would not decode the bytes: the client's error
            raise InputError(*result.refused)
        out.detections = result.detections
        out.calls["detector"] = CallSpan(start, _ms(start), result.timing)
        out.timings_ms["detector"] = round(out.calls["detector"].round_trip_ms, 2)

    async def _classify(self, route: ClassifierRoute, crops: np.ndarray, out: GraphResult, indices: np.ndarray) -> None:
        assert route.client is not None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(route.timeout_s):
                result = await route.client.classify(crops)
        except TimeoutError:
            out.errors[route.name] = StageError(code="timeout", message=f"no answer within {route.timeout_s:g} s")
        except Exception as exc:
            logger.warning("classifier %s failed: %s", route.name, short_error(exc))
            out.errors[route.name] = StageError(code="failed", message=short_error(exc))
        else:
            out.outputs[route.name] = (indices, result.classifications)
            out.calls[route.name] = CallSpan(start, _ms(start), result.timing, result.attempts)
        out.timings_ms[route.name] = round(_ms(start), 2)

    async def run_encoded(self, data: bytes, decode: Callable[[bytes], np.ndarray], mode: str,
                          only: Collection[str] | None = None, pixels: int = 0) -> GraphResult:
        """Send the compressed bytes to the detector and decode them here meanwhile (the crops need the
        frame): the decode leaves the critical path and a few KB cross the hop instead of a raw frame.
        If the local decode fails (bad input), the detector's work is cancelled and the error raised."""
        out = GraphResult(Detections.empty())
        detecting = asyncio.ensure_future(self._detect(data, out))
        await asyncio.sleep(0)  # let the detector call go out before the decode holds the loop
        start = time.perf_counter()
        try:
            frame = await self._cpu.run_large(pixels, decode, data)
        except BaseException:
            detecting.cancel()
            await asyncio.gather(detecting, return_exceptions=True)  # leave no outcome unread
            raise
        out.decode_ms = _ms(start)
        out.frame = frame
        await detecting
        return await self._classify_all(frame, out, mode, only)

    async def run(self, frame: np.ndarray, mode: str, only: Collection[str] | None = None,
                  detect_on: tuple[np.ndarray | bytes, Scale] | None = None) -> GraphResult:
        """The detector gets the decoded frame (the detector runs in this process, or the bytes are not kept), or
        `detect_on`: a smaller copy of it and its scale (a huge photo: the detector would only scale it down), the
        boxes then mapped back. `only`: the classifiers to run (with their parents already included); None: all."""
        out = GraphResult(Detections.empty(), frame)
        if detect_on is None:
            await self._detect(frame, out)
        else:
            small, scale = detect_on
            await self._detect(small, out)
            out.detections = out.detections.scaled(inverse(scale)).clip(frame.shape[1], frame.shape[0])
        return await self._classify_all(frame, out, mode, only)

    async def _run_route(self, route: ClassifierRoute, frame: np.ndarray, out: GraphResult,
                         parents_done: Mapping[str, asyncio.Future[None]]) -> None:
        """A chained classifier: wait for its own parents only, then crop what they selected and classify."""
        await asyncio.gather(*(parents_done[name] for name, _ in route.parents if name in parents_done))
        selected = selected_objects(route, out)
        if isinstance(selected, StageError):
            out.errors[route.name] = selected
        elif len(selected):
            crops = await self._cpu.run(cut_crops, frame, out.detections.xyxy[selected], route.crop)
            await self._classify(route, crops, out, selected)

    async def _classify_all(self, frame: np.ndarray, out: GraphResult, mode: str,
                            only: Collection[str] | None = None) -> GraphResult:
        routes = [r for r in self._routes if only is None or r.name in only]
        roots = [r for r in routes if not r.parents]
        start = time.perf_counter()

        # the independent classifiers: cropped now, all sent at once
        wanted = [(r, i) for r in roots if len(i := out.detections.select(r.labels, r.min_width, r.min_height))]
        if not wanted:
            crops = []
        elif self._cut_on_device is not None and not isinstance(frame, np.ndarray):
            crops = await self._cut_on_device(frame, out.detections.xyxy, wanted)
        else:
            crops = await self._cpu.run(cut_each_spec_once, frame, out.detections.xyxy, wanted)
        calls = [(route, c, indices) for (route, indices), c in zip(wanted, crops)]
        out.crop_ms = _ms(start)
        start = time.perf_counter()
        chained = [r for r in routes if r.parents]
        if mode == "sequential":  # one after another, parents first (roots, then chains in a topological order)
            for route, crops, indices in calls:
                await self._classify(route, crops, out, indices)
            for route in topological_order(chained):
                await self._run_route(route, frame, out, {})
        elif len(calls) == 1 and not chained:  # one call needs no task of its own
            route, crops, indices = calls[0]
            await self._classify(route, crops, out, indices)
        else:
            tasks: dict[str, asyncio.Future[None]] = {
                route.name: asyncio.ensure_future(self._classify(route, crops, out, indices))
                for route, crops, indices in calls
            }
            for route in topological_order(chained):  # a chain's task waits for its parents' tasks, nothing else
                tasks[route.name] = asyncio.ensure_future(self._run_route(route, frame, out, dict(tasks)))
            await asyncio.gather(*tasks.values())
        out.classify_ms = _ms(start)
        order = [route.name for route in routes]  # answer in config order, not completion order
        out.outputs = {n: out.outputs[n] for n in order if n in out.outputs}
        out.errors = {n: out.errors[n] for n in order if n in out.errors}
        out.timings_ms = {k: out.timings_ms[k] for k in ("detector", *order) if k in out.timings_ms}
        return out


def cut_each_spec_once(frame: Any, xyxy: np.ndarray,
                       wanted: list[tuple[ClassifierRoute, np.ndarray]]) -> list[Any]:
    """The crops of each (route, object indices), each crop geometry cut once: classifiers that take the same
    crop (size, square, padding, letterbox: age and emotion here) share one cut of the union of their objects,
    on the host or on the frame's device (`cut_crops`); each gets its own rows of it."""
    return cut_each_spec_once_many([frame], [xyxy], [wanted])[0]


def cut_each_spec_once_many(frames: Sequence[Any], xyxys: Sequence[np.ndarray],
                            wanteds: Sequence[list[tuple[ClassifierRoute, np.ndarray]]]) -> list[list[Any]]:
    """`cut_each_spec_once` of several frames (the requests of a batch), each crop geometry cut once for all of
    them, every geometry in one pass on the device (`cut_crops_specs`); per frame, the crops of each of its
    (route, indices)."""
    unions: list[dict[CropSpec, np.ndarray]] = []
    for wanted in wanteds:
        union: dict[CropSpec, np.ndarray] = {}
        for route, indices in wanted:
            known = union.get(route.crop)
            if known is None or not np.array_equal(known, indices):  # routes of one geometry mostly want the same
                union[route.crop] = np.union1d(np.zeros(0, np.int64) if known is None else known,
                                               indices).astype(np.int64)
        unions.append(union)
    specs = list(dict.fromkeys(spec for union in unions for spec in union))
    if not specs:
        return [[] for _ in frames]
    cut: list[dict[CropSpec, Any]] = [{} for _ in frames]
    # every geometry at once (one pass on the device), each frame's rows in frame order, none where it wants none
    boxes = [[xyxys[i][union[spec]] if spec in union else _NO_BOXES for i, union in enumerate(unions)]
             for spec in specs]
    for spec, together in zip(specs, cut_crops_specs(frames, boxes, specs)):
        having = [i for i, union in enumerate(unions) if spec in union]
        start = 0
        for i in having:
            count = len(unions[i][spec])
            cut[i][spec] = together[start : start + count] if len(having) > 1 else together
            start += count
    out = []
    for union, crops, wanted in zip(unions, cut, wanteds):
        mine = []
        for route, indices in wanted:
            everyone = union[route.crop]
            same = len(indices) == len(everyone) and bool(np.all(indices == everyone))
            mine.append(crops[route.crop] if same else take_rows(crops[route.crop], np.searchsorted(everyone, indices)))
        out.append(mine)
    return out


def selected_objects(route: ClassifierRoute, out: GraphResult) -> np.ndarray | StageError:
    """The objects `route` runs on (`ClassifierRoute.select` over this request's answers so far). A parent that
    did not answer skips it, with the reason."""
    for parent, _ in route.parents:
        if parent in out.errors:
            why = "was skipped" if out.errors[parent].code == "skipped" else (
                "timed out" if out.errors[parent].code == "timeout" else "failed")
            return StageError(code="skipped", message=f"not run: its parent {parent} {why}")
    labels = {parent: _labels_by_object(out, parent) for parent, _ in route.parents}
    return route.select(out.detections, lambda parent, obj: labels[parent].get(obj))


def _labels_by_object(out: GraphResult, name: str) -> dict[int, str | None]:
    """Object index -> the label classifier `name` gave it in this request (None below its threshold)."""
    if name not in out.outputs:
        return {}
    rows, result = out.outputs[name]
    return {obj: (result.attribute(row) or {}).get("label") for row, obj in enumerate(rows.tolist())}


def topological_order(routes: list[ClassifierRoute]) -> list[ClassifierRoute]:
    """`routes` with every route after the routes among them it depends on (config order otherwise)."""
    return [route for layer in topological_layers(routes) for route in layer]


def topological_layers(routes: list[ClassifierRoute]) -> list[list[ClassifierRoute]]:
    """`routes` in layers: the first depends on none of the others, each later one only on routes of earlier
    layers (config order within a layer)."""
    layers: list[list[ClassifierRoute]] = []
    pending = list(routes)
    while pending:
        ready = [r for r in pending if all(p not in {q.name for q in pending} for p, _ in r.parents)]
        if not ready:  # a cycle: refused by PipelineConfig, so only reachable with hand-built routes
            raise ValueError(f"classifier chains form a cycle among {[r.name for r in pending]}")
        layers.append(ready)
        pending = [r for r in pending if r not in ready]
    return layers
