"""Layout ingress with frames on the device, DeepStream's way: the requests that arrive together go through the
whole pipeline as one batch, and only metadata comes back to the host.

A batch is the images that queued while the previous batch ran (up to `ingress.device_batch_size`; a lone request
waits for nothing, nvstreammux's `batched-push-timeout` of 0): their JPEGs are decoded in one nvJPEG call, the
frames scaled to the detector's working side on the device and detected in one detector batch; then every
classifier's crops are cut in one pass per crop geometry (engines/device_crops.py) and classified in one engine
launch per classifier, the independent classifiers launched back to back so that they compute together, chained
ones after their parents; only boxes and result rows come back to the host. The two halves run on two threads,
like two elements of a DeepStream pipeline: the detector's compute thread decodes and detects a batch while the
classifiers' thread classifies the one before (each half waits for the GPU with the GIL released, so the other's
host work goes on meanwhile). A request comes back to the event loop twice, once per half (three times with
`decode_apart`, the decode on a third thread). The per-stage path
(`ingress.device_pass: stages`) batches every step on its own (decode, detect, cut, each classifier), with
per-request tasks and deadlines around each: about twice the host time per request (docs/benchmarks.md).

Detection runs on the detector stage's own compute thread, so that it and the detector's other callers (streams,
video) take turns on the detector; the classifier engines order their runs themselves. A classifier that raises
costs only its attribute (every request of the batch gets its error); one slower than its `timeout_s` delays its
batch and answers `timeout`. The detector failing, or the request taking longer than the detector's timeout plus
the longest classifier timeout, fails the request (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from deployments.batcher import GreedyBatcher
from deployments.execution import ComputeExecutor
from deployments.results import StageTiming
from deployments.stages import ClassifierStage, DetectorStage
from engines import Classifications, completed
from engines.batching import concatenate
from engines.image import Scale, inverse
from serve_app.decoding import InputError
from serve_app.graph import (
    CallSpan,
    ClassifierRoute,
    DetectorUnavailable,
    GraphResult,
    cut_each_spec_once_many,
    selected_objects,
    short_error,
    topological_layers,
)
from serve_app.schema import StageError

if TYPE_CHECKING:  # the decoder imports torch
    from engines.device_image import DeviceDecoder

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class _Decoded:
    """An image on the device: as displayed, and scaled to the detector's working side."""

    frame: Any  # (H, W, 3) uint8 BGR tensor
    fitted: Any  # the same at most `max_detect_side` on its longer side
    scale: Scale  # fitted over displayed, per axis
    decode_ms: float  # its batch's decode and scaling


@dataclass(frozen=True)
class _Request:
    image: Any  # the encoded bytes (decoded with the batch's others), an image decoded apart, or a device frame
    only: frozenset[str] | None  # the classifiers wanted (their parents included); None: all
    submitted: float  # time.perf_counter()


_Detected = tuple[frozenset[str] | None, GraphResult]  # the classifiers a request wants, its frame and detections


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class DevicePass:
    def __init__(self, decoder: DeviceDecoder, detector: DetectorStage, classifiers: dict[str, ClassifierStage],
                 routes: Sequence[ClassifierRoute], max_batch: int, max_detect_side: int,
                 detector_timeout_s: float, overlap: bool = True, decode_apart: bool = False) -> None:
        """`routes`: every classifier's geometry, filters and chain (their clients unused: the models are called
        here); `max_batch`: the most requests in one batch; `overlap`: the classifiers' half on a thread of its own
        (False: on the detector's thread too, one batch wholly after the other: bench/device_pass.py's baseline);
        `decode_apart`: the encoded images decoded and scaled to the working side on a thread of their own, so that
        the next batch's decode goes on while the detector's batch computes (default: on the detector's thread,
        before its batch; apart was slower on an H100, 524 against 584 one-face images/s in one process:
        docs/benchmarks.md, run 10)."""
        self.decoder = decoder
        self._detector = detector
        self._classifiers = classifiers
        self._layers = topological_layers(list(routes))
        self._order = [route.name for route in routes]  # answers in config order, as the graph gives them
        self._max_side = max_detect_side
        # the request's own deadline: the detector's and the longest classifier's (a batch does them in turn)
        self._timeout_s = detector_timeout_s + max((r.timeout_s for r in routes), default=0.0)
        # two phases on two threads, so that one batch's detection overlaps the previous one's classification
        self._classify_thread = ComputeExecutor("thread", True, "device-classify") if overlap else None
        self._decode_thread = ComputeExecutor("thread", True, "device-decode") if decode_apart else None
        self._decoding: GreedyBatcher[bytes, _Decoded | None] | None = None if self._decode_thread is None else \
            GreedyBatcher(lambda images: completed(self._decode, images), self._decode_thread, max_batch)
        self._detecting: GreedyBatcher[_Request, GraphResult | None] = GreedyBatcher(
            lambda requests: completed(self._detect, requests), detector.executor, max_batch)
        self._classifying: GreedyBatcher[_Detected, GraphResult] = GreedyBatcher(
            lambda detected: completed(self._classify, detected), self._classify_thread or detector.executor,
            max_batch)

    async def run(self, image: Any, only: Collection[str] | None = None) -> GraphResult:
        """One image (its encoded bytes, or a frame already on the device) through the pass; InputError 400 if
        it will not decode, DetectorUnavailable if the detector fails or the pass is late."""
        submitted, wanted = time.perf_counter(), None if only is None else frozenset(only)
        result = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if isinstance(image, bytes) and self._decoding is not None:
                    image = (await self._decoding.submit(image)).result
                if image is not None:
                    result = (await self._detecting.submit(_Request(image, wanted, submitted))).result
                if result is not None and self._layers:
                    result = (await self._classifying.submit((wanted, result))).result
        except TimeoutError as exc:
            raise DetectorUnavailable(f"the device pass did not answer within {self._timeout_s:g} s") from exc
        except Exception as exc:
            logger.warning("the device pass failed: %s", short_error(exc))
            raise DetectorUnavailable(f"the device pass failed: {short_error(exc)}") from exc
        if result is None:
            raise InputError(400, "undecodable_image", "the body is not an image this service can decode")
        return result

    def close(self) -> None:
        for thread in (self._decode_thread, self._classify_thread):
            if thread is not None:
                thread.close()

    # -- on the decode thread (or the detector's) --------------------------------------------------------

    def _decode(self, images: list[bytes]) -> list[_Decoded | None]:
        """The batch's images decoded on the device (one nvJPEG call for its JPEGs) and scaled to the detector's
        working side; None for one that will not decode."""
        began = time.perf_counter()
        fitted = [None if frame is None else self._fitted(frame) for frame in self.decoder.decode_many(images)]
        ms = _ms(time.perf_counter() - began)
        return [None if one is None else replace(one, decode_ms=ms) for one in fitted]

    def _fitted(self, frame: Any) -> _Decoded:
        from engines.device_image import fit_side_tensor

        scaled, scale = fit_side_tensor(frame, self._max_side)
        return _Decoded(frame, scaled, scale, 0.0)

    # -- on the detector's compute thread ---------------------------------------------------------------

    def _detect(self, requests: list[_Request]) -> list[GraphResult | None]:
        """Detect the batch (decoding the images that come encoded first); per request its frame and detections
        (None: it would not decode)."""
        began = time.perf_counter()
        images: list[_Decoded | None] = [r.image if isinstance(r.image, _Decoded) else None for r in requests]
        encoded = [i for i, r in enumerate(requests) if isinstance(r.image, bytes)]
        for i, one in zip(encoded, self._decode([requests[i].image for i in encoded]) if encoded else []):
            images[i] = one
        for i, r in enumerate(requests):
            if images[i] is None and not isinstance(r.image, bytes):  # a frame already on the device
                images[i] = self._fitted(r.image)
        decoded = time.perf_counter()
        live = [i for i, one in enumerate(images) if one is not None]
        results: list[GraphResult | None] = [None] * len(requests)
        if not live:
            return results
        found = self._detector.model.detect_batch([images[i].fitted for i in live])  # type: ignore[union-attr]
        detected = time.perf_counter()
        self._detector.record_batch(len(live), _ms(detected - decoded))
        for i, detections in zip(live, found):
            one, submitted = images[i], requests[i].submitted
            assert one is not None
            frame = one.frame
            out = GraphResult(detections.scaled(inverse(one.scale)).clip(int(frame.shape[1]), int(frame.shape[0])),
                              frame)
            out.decode_ms = one.decode_ms
            timing = StageTiming(_ms(detected - submitted), _ms(began - submitted), _ms(detected - decoded), len(live))
            out.calls["detector"] = CallSpan(submitted, timing.handler_ms, timing)
            out.timings_ms["detector"] = round(timing.handler_ms, 2)
            results[i] = out
        return results

    # -- on the classifiers' thread ---------------------------------------------------------------------

    def _classify(self, batch: list[_Detected]) -> list[GraphResult]:
        """Every classifier, layer by layer, on the objects of every frame of the batch."""
        for layer in self._layers:
            self._classify_layer(layer, batch)
        for _, out in batch:
            out.outputs = {n: out.outputs[n] for n in self._order if n in out.outputs}
            out.errors = {n: out.errors[n] for n in self._order if n in out.errors}
            out.timings_ms = {k: out.timings_ms[k] for k in ("detector", *self._order) if k in out.timings_ms}
        return [out for _, out in batch]

    def _classify_layer(self, layer: list[ClassifierRoute], batch: list[_Detected]) -> None:
        """One layer of classifiers (none depends on another) for every request: cut once per crop geometry,
        launched one after another (they compute together), then read."""
        cut_at = time.perf_counter()
        wanteds: list[list[tuple[ClassifierRoute, Any]]] = []
        for only, out in batch:
            wanted = []
            for route in layer:
                if only is not None and route.name not in only:
                    continue
                selected = selected_objects(route, out)
                if isinstance(selected, StageError):
                    out.errors[route.name] = selected
                elif len(selected):
                    wanted.append((route, selected))
            wanteds.append(wanted)
        cutting = [k for k, wanted in enumerate(wanteds) if wanted]
        if not cutting:
            return
        cuts = cut_each_spec_once_many([batch[k][1].frame for k in cutting],
                                       [batch[k][1].detections.xyxy for k in cutting], [wanteds[k] for k in cutting])
        crops: dict[str, list[tuple[int, Any, Any]]] = {}  # route -> (request, object indices, crops)
        for k, cut in zip(cutting, cuts):
            for (route, indices), part in zip(wanteds[k], cut):
                crops.setdefault(route.name, []).append((k, indices, part))
        launched_at = time.perf_counter()
        for k in cutting:
            batch[k][1].crop_ms += _ms(launched_at - cut_at)
        routes = {route.name: route for route in layer}
        runs = {}
        for name, parts in crops.items():
            try:
                runs[name] = self._classifiers[name].model.launch(concatenate([p for _, _, p in parts]))
            except Exception as exc:  # noqa: BLE001 - this classifier's attribute only
                self._failed(name, exc, [batch[k][1] for k, _, _ in parts])
        for name, run in runs.items():
            parts, route = crops[name], routes[name]
            try:
                classifications: Classifications = run.wait()
            except Exception as exc:  # noqa: BLE001 - this classifier's attribute only
                self._failed(name, exc, [batch[k][1] for k, _, _ in parts])
                continue
            done = time.perf_counter()
            size = sum(len(indices) for _, indices, _ in parts)
            stage = self._classifiers[name]
            if stage.on_batch is not None:
                stage.on_batch(size, _ms(done - launched_at))
            late = done - launched_at > route.timeout_s
            timing = StageTiming.of((done - launched_at) * 1e3, 0.0, (done - launched_at) * 1e3, size, run.timing)
            for (k, indices, _), mine in zip(parts, classifications.split([len(i) for _, i, _ in parts])):
                out = batch[k][1]
                out.timings_ms[name] = round(timing.handler_ms, 2)
                if late:
                    out.errors[name] = StageError(code="timeout", message=f"no answer within {route.timeout_s:g} s")
                else:
                    out.outputs[name] = (indices, mine)
                    out.calls[name] = CallSpan(launched_at, timing.handler_ms, timing)
        finished = time.perf_counter()
        for k in cutting:
            batch[k][1].classify_ms += _ms(finished - launched_at)

    @staticmethod
    def _failed(name: str, exc: Exception, outs: list[GraphResult]) -> None:
        logger.warning("classifier %s failed: %s", name, short_error(exc))
        for out in outs:
            out.errors[name] = StageError(code="failed", message=short_error(exc))
