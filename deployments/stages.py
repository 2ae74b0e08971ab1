"""The model stages, free of Ray Serve: what a detector or classifier replica does with a call.

A Serve deployment (deployments/detector.py, classifier.py, classifier_pool.py) is a thin shell
around one or more stages, and the ingress can hold stages itself (layout `ingress`), so the same
code runs wherever a model is placed. Each call reports where its time went (`StageTiming`), which
the ingress turns into the per-request breakdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from deployments.batcher import Batched, GreedyBatcher
from deployments.budget import LARGE_PIXELS, PixelBudget
from deployments.config import ClassifierConfig, DetectorConfig
from deployments.execution import ComputeExecutor
from deployments.models import build_classifier, build_detector
from deployments.placement_log import warn_if_gpu_unused
from deployments.results import ClassifierResult, DetectorResult, StageTiming
from engines import Classifications, Detections, EngineError, Pending, completed
from engines.base import span
from engines.classifier import ClassifierModel
from engines.batching import concatenate
from engines.image import ImageRefused, check_size, decode_for_detection, fit_side, inverse
from engines.yolo import Yolo

logger = logging.getLogger("ray.serve")


def _timing(start: float, parts: list[Batched[Any]]) -> StageTiming:
    return StageTiming.of((time.perf_counter() - start) * 1e3, max(p.queue_ms for p in parts),
                          max(p.compute_ms for p in parts), max(p.batch_size for p in parts),
                          span([p.timing for p in parts]))


class DetectorStage:
    """One frame in, one Detections out; frames of concurrent calls are batched (never waited for)."""

    def __init__(self, config: DetectorConfig, device: str, shared: bool = False,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        """`shared`: other stages run in the same process (layouts `colocated` and `ingress`); `on_batch`:
        called with (items, compute ms) after every engine batch (the deployment's metrics)."""
        self._config = config
        self._model = build_detector(config, device)
        self.device = self._model.device
        warn_if_gpu_unused("detector", device, self.device, self._model.backend)
        self._executor = ComputeExecutor(config.engine.execution, shared, "detector")
        self.on_batch = on_batch
        self.batches = self.frames = 0  # engine batches run and the frames in them (GET /v1/pipeline)
        self._batcher: GreedyBatcher[np.ndarray, Detections] = GreedyBatcher(
            self._detect_batch, self._executor, config.batching.max_batch_size, on_batch=self.record_batch
        )
        self._probe = np.zeros((48, 48, 3), np.uint8)
        self._budget = PixelBudget(config.max_inflight_pixels)
        # takes frames already on its device (decoded there: the GPU-resident image path)
        self.takes_device_frames = bool(getattr(self._model, "takes_device_frames", False))
        logger.info("detector %s ready on %s (execution %s)", config.kind, self.device, self._executor.mode)

    def record_batch(self, frames: int, compute_ms: float) -> None:
        """One engine batch ran (here, or in layout ingress's pass on the device): counted, and measured by
        `on_batch` (the deployment's metrics)."""
        self.batches += 1
        self.frames += frames
        if self.on_batch is not None:
            self.on_batch(frames, compute_ms)

    @property
    def model(self) -> Any:
        """The detector itself, for work that runs on `executor` (one batch at a time: the models are not
        reentrant): layout ingress's whole pass on the device (serve_app/device_pass.py)."""
        return self._model

    @property
    def executor(self) -> ComputeExecutor:
        return self._executor

    def _detect_batch(self, frames: list[np.ndarray]) -> Pending[list[Detections]]:
        return completed(self._model.detect_batch, frames)

    async def detect(self, image: Any, source: Hashable | None = None) -> DetectorResult:
        """`image`: a BGR frame, or the compressed bytes (a few KB instead of a megabyte over the hop), decoded
        here with the same decoder as the ingress's, their size checked from the header first. Frames larger
        than `max_detect_side` are detected scaled down, the boxes mapped back. Bytes that will not decode are
        answered (`refused`), not raised: the ingress's own decode says why to the client, and a client's bad
        upload is no error of this replica. `source` (a stream's) is not used: this stage batches frames as they
        come."""
        start = time.perf_counter()
        cfg = self._config
        if isinstance(image, bytes):
            try:
                width, height = check_size(image, cfg.max_image_pixels)
                async with self._budget.hold(width * height):
                    decode = (decode_for_detection, image, cfg.max_image_pixels, cfg.max_detect_side)
                    # a large image's decode (a second for 36 Mpx) leaves the loop: other frames are detected meanwhile
                    frame, scale = (await asyncio.to_thread(*decode) if width * height > LARGE_PIXELS
                                    else decode_for_detection(*decode[1:]))
            except ImageRefused as exc:
                return self._refused(start, (exc.status, exc.code, exc.message))
            if frame is None:
                return self._refused(start, (400, "undecodable_image", "the detector could not decode the image"))
            size = (width, height)
        elif not isinstance(image, np.ndarray):  # a frame on the device: scaled there
            from engines.device_image import fit_side_tensor

            size = (int(image.shape[1]), int(image.shape[0]))
            frame, scale = fit_side_tensor(image, cfg.max_detect_side)
        else:
            size = (image.shape[1], image.shape[0])
            if size[0] * size[1] > LARGE_PIXELS:
                frame, scale = await asyncio.to_thread(fit_side, image, cfg.max_detect_side)
            else:
                frame, scale = fit_side(image, cfg.max_detect_side)
        part = await self._batcher.submit(frame)
        return DetectorResult(part.result.scaled(inverse(scale)).clip(*size), _timing(start, [part]))

    def _refused(self, start: float, why: tuple[int, str, str]) -> DetectorResult:
        elapsed = round((time.perf_counter() - start) * 1e3, 3)
        return DetectorResult(Detections.empty(self._model.class_names), StageTiming(elapsed, 0.0, 0.0, 0), why)

    def close(self) -> None:
        """Release the engines (device memory, sessions) and the compute thread."""
        self._executor.close()
        self._model.close()

    async def check_health(self) -> None:
        try:
            await self._executor.run(completed, self._model.detect, self._probe)
        except Exception as exc:
            raise RuntimeError(f"detector: health probe failed: {type(exc).__name__}: {exc}") from exc

    def describe(self) -> dict[str, object]:
        description: dict[str, object] = {
            "kind": self._config.kind,
            "labels": list(self._model.class_names),
            "backend": self._model.backend,
            "device": self.device,
            "execution": self._executor.mode,
            "max_batch_size": self._config.batching.max_batch_size,
            "batches": {"count": self.batches, "frames": self.frames},
        }
        counts = getattr(self._model, "cascade_counts", None)  # the torch MTCNN: fixed shapes or data-following
        if counts is not None:
            description["cascade"] = counts()
        if isinstance(self._model, Yolo):
            description["layout"] = self._model.layout
            description["model"] = self._config.yolo.model.name if self._config.yolo else None
        return description


class ClassifierStage:
    """uint8 BGR crops at the network's input size in, one Classifications out.

    Crops of concurrent calls are batched together (sized in crops), without waiting when idle."""

    def __init__(self, config: ClassifierConfig, device: str, shared: bool = False,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        """`shared`: other stages run in the same process (layouts `colocated` and `ingress`); `on_batch`:
        called with (crops, compute ms) after every engine batch (the deployment's metrics)."""
        self._config = config
        self.name = config.name
        try:
            self._model = build_classifier(config, device)
        except EngineError as exc:
            raise ValueError(f"classifiers[{config.name}] (model {config.model.name}): {exc}") from exc
        self.device = self._model.engine.device
        warn_if_gpu_unused(config.name, device, self.device, self._model.engine.backend)
        self._executor = ComputeExecutor(config.engine.execution, shared, config.name, self._model.engine.asynchronous)
        self.on_batch = on_batch
        self._shape = (config.input.height, config.input.width, 3)
        self._max_batch = config.batching.max_batch_size
        self._batcher: GreedyBatcher[np.ndarray, Classifications] = GreedyBatcher(
            self._predict_chunks, self._executor, self._max_batch, size_of=len, on_batch=on_batch
        )
        self._probe = np.zeros((1, *self._shape), np.uint8)
        # takes crops cut on its device (a torch tensor), keeping them there where it normalises in its forward
        self.takes_device_crops = self._model.engine.backend == "torch"
        logger.info("classifier %s ready on %s (execution %s)", config.name, self.device, self._executor.mode)

    @property
    def model(self) -> ClassifierModel:
        """The classifier itself: its `launch` may be called from any thread (the engine orders its runs)."""
        return self._model

    def _predict_chunks(self, chunks: list[Any]) -> Pending[list[Classifications]]:
        """Launch the crops of every call in the batch as one engine batch; the answer splits per call."""
        batch = concatenate(chunks)
        sizes = [len(c) for c in chunks]
        return self._model.launch(batch).then(lambda result: result.split(sizes))

    async def classify(self, crops: Any) -> ClassifierResult:
        """`crops`: (N, H, W, 3) uint8 BGR, numpy on the host or a torch tensor on the device."""
        start = time.perf_counter()
        if not str(crops.dtype).endswith("uint8") or tuple(crops.shape[1:]) != self._shape:
            raise ValueError(f"{self.name}: crops must be (N, {self._shape}) uint8, got {tuple(crops.shape)} "
                             f"{crops.dtype}")
        if len(crops) == 0:
            return ClassifierResult(self._model.predict(crops), StageTiming(0.0, 0.0, 0.0, 0))
        if len(crops) <= self._max_batch:
            parts = [await self._batcher.submit(crops)]
        else:
            chunks = [crops[i : i + self._max_batch] for i in range(0, len(crops), self._max_batch)]
            parts = list(await asyncio.gather(*(self._batcher.submit(chunk) for chunk in chunks)))
        result = Classifications.concatenate([p.result for p in parts]) if len(parts) > 1 else parts[0].result
        return ClassifierResult(result, _timing(start, parts))

    def close(self) -> None:
        """Release the engine (device memory, sessions) and the compute or waiter thread."""
        self._executor.close()
        self._model.close()

    async def check_health(self) -> None:
        try:
            result, _, _ = await self._executor.run(self._model.launch, self._probe)
            if len(result) != 1:
                raise RuntimeError(f"{len(result)} results for 1 crop")
        except Exception as exc:
            raise RuntimeError(f"{self.name}: health probe failed: {type(exc).__name__}: {exc}") from exc

    def describe(self) -> dict[str, object]:
        c = self._config
        return {
            "name": c.name,
            "kind": c.kind,
            "model": c.model.name,
            "operate_on_labels": c.operate_on_labels,
            "min_object_width": c.min_object_width,
            "min_object_height": c.min_object_height,
            "threshold": c.threshold,
            "timeout_s": c.timeout_s,
            "input": c.input.model_dump(),
            "max_batch_size": self._max_batch,
            "backend": self._model.engine.backend,
            "device": self.device,
            "execution": self._executor.mode,
        }
