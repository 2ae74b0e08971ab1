"""The HTTP ingress deployment: what needs the replica (the handles or the stages held here, the graph, the
metrics), handed to the routers of serve_app/routes through the app's `services`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve

from deployments.results import ClassifierResult, DetectorResult
from deployments.stages import ClassifierStage, DetectorStage
from deployments.startup import freeze_startup_heap
from serve_app.admission import ApiGate
from serve_app.auth import BearerAuth
from serve_app.config import PipelineConfig
from serve_app.device_frames import DeviceBatches, device_pass, frames_on_device
from serve_app.http_api import api
from serve_app.nvdec_reader import videos_on_nvdec
from serve_app.offload import CpuWork
from serve_app.routes.common import Services
from serve_app.routes.images import ImageService
from serve_app.routes.pipeline import PipelineService
from serve_app.stream_relay import StreamsProxy
from serve_app.routes.video import VideoService
from serve_app.telemetry import IngressMetrics
from serve_app.wiring import in_process, remote

logger = logging.getLogger("ray.serve")


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """Holds the graph. Where the models run depends on `config.layout`: behind the handles given here
    (`separate`: one per model; `colocated`: the detector and one shared `classifiers` deployment), or
    in this replica (`ingress`: no handles; the stages are built here, each on its device in `devices`).
    `streams`: the streams deployment (None: streams are off)."""

    def __init__(
        self,
        config: PipelineConfig,
        detector: Any = None,
        classifiers: dict[str, Any] | None = None,
        pool: Any = None,
        devices: Mapping[str, str] | None = None,
        streams: Any = None,
    ) -> None:
        held_here = detector is None  # layout "ingress": the models live in this replica
        self._wiring = in_process(config, devices or {}) if held_here else remote(config, detector, classifiers or {}, pool)
        self._cpu = CpuWork(config.cpu_work)
        decoder = frames_on_device(config, self._wiring) if held_here else None
        whole = device_pass(config, self._wiring, decoder) if decoder else None
        batches = DeviceBatches(decoder, config.ingress.device_batch_size) if decoder and not whole else None
        self._on_device = whole or batches
        graph = self._wiring.graph(config, self._cpu, batches.cut if batches else None)
        metrics = IngressMetrics()
        describers = dict(self._wiring.describers)
        if streams is not None:
            describers["streams"] = streams.describe.remote
        # Compressed bytes to a remote detector; a detector held here takes the decoded frame, on its device
        # when every stage here can keep it there.
        send_encoded = config.ingress.detector_input == "encoded" and not held_here
        gate = ApiGate(config.ingress.deployment.max_ongoing_requests)
        self.services = Services(
            auth=BearerAuth(config.ingress.auth_token_env),
            gate=gate,
            metrics=metrics,
            classifier_names=tuple(c.name for c in config.classifiers),
            images=ImageService(graph, config, metrics, send_encoded, self._cpu, self._on_device),
            video=VideoService(graph, config, metrics, self._cpu, gate, videos_on_nvdec(config, decoder),
                               workers=streams if streams is not None and config.ingress.streams.workers.count
                               and config.ingress.streams.workers.videos else None,
                               frames_device=str(decoder.device) if decoder else None),
            streams=StreamsProxy(streams, gate, config.ingress.streams),
            # the ingress, the model deployments it calls (none in layout ingress: its stages are here), streams
            pipeline=PipelineService(config, describers, self._wiring.health,
                                     1 + (0 if held_here else len(self._wiring.describers)) + (streams is not None),
                                     decoder.device if decoder else "host"),
        )
        freeze_startup_heap()
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
            logger.info("HTTP goes through Serve's Python proxy; starting Ray with RAY_SERVE_ENABLE_HA_PROXY=1 "
                        "(README) saves 5-7 ms a request on 2 cores (docs/benchmarks.md)")

    # Layout ingress: the streams deployment reaches the models held here through these two methods.
    async def detect_stage(self, image: np.ndarray | bytes) -> DetectorResult:
        detector = self._wiring.detector
        if not isinstance(detector, DetectorStage):
            raise RuntimeError("this ingress holds no detector (layout is not ingress)")
        return await detector.detect(image)

    async def detect_stage_many(self, images: list[np.ndarray | bytes]) -> list[DetectorResult]:
        return list(await asyncio.gather(*(self.detect_stage(image) for image in images)))

    async def classify_stage(self, name: str, crops: np.ndarray) -> ClassifierResult:
        stage = self._wiring.classifiers.get(name)
        if not isinstance(stage, ClassifierStage):
            raise RuntimeError(f"this ingress holds no classifier {name!r}")
        return await stage.classify(crops)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: release the engines held here."""
        if hasattr(self, "_wiring"):
            self._wiring.close()
            self._cpu.close()
            if getattr(self, "_on_device", None) is not None:
                self._on_device.close()

    async def check_health(self) -> None:
        """Serve calls this periodically: in layout `ingress` the engines held here must answer."""
        for check in self._wiring.health:
            await check()
