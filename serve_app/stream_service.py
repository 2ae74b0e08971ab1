"""The `streams` deployment: it owns every live stream of the application.

One replica (so `max_streams` counts once, and any ingress replica finds every stream): it reads the sources,
runs the detector and the classifiers through handles (the graph code the ingress uses; in layout `ingress`,
through the ingress's own handle, which holds the models), tracks, and keeps each stream's listeners. The
ingress forwards /v1/streams* here and relays /events with a streaming handle call.

When this replica stops, its streams end: a graceful stop gives every listener the stream's summary; if the
replica dies instead, the ingress ends each listener's response with a summary line of state `lost` naming
the reason, and the streams are gone (a new replica starts empty).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve

from engines.tracking import tracker_unavailable
from serve_app.clients import RemoteDetector
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError
from serve_app.graph import InferenceGraph
from serve_app.offload import CpuWork
from serve_app.stream_muxer import MuxedDetector
from serve_app.streams import LiveStream, StreamRefusal, StreamRegistry
from serve_app.telemetry import StreamMetrics
from serve_app.video_session import VideoSession, new_session
from serve_app.wiring import Wiring, remote, through_ingress

logger = logging.getLogger("ray.serve")


@serve.deployment(name="streams")
class Streams:
    def __init__(self, config: PipelineConfig, detector: Any = None, classifiers: dict[str, Any] | None = None,
                 pool: Any = None) -> None:
        """The model deployments' handles (layouts separate and colocated); none in layout ingress."""
        self._config = config
        self._cpu = CpuWork(config.cpu_work)
        self._metrics = StreamMetrics()
        self._registry = StreamRegistry(config.ingress.streams, self._new_session, config.detector.max_detect_side,
                                        self._on_frame, self._on_end)
        self._muxer: MuxedDetector | None = None
        self._graph: InferenceGraph | None = None
        if detector is not None:
            self._graph = self._muxed(remote(config, detector, classifiers or {}, pool))
        # The tracker's library is imported now: imported at a stream's first frame it held this replica's event
        # loop for 1-7 s (a loaded 2-core box), so the 201 came after most of a short clip had gone unwatched.
        # Where it is missing (a trimmed environment), the replica still starts, and every start says why not.
        self._unavailable = tracker_unavailable()
        if self._unavailable:
            logger.warning("live streams are unavailable: %s", self._unavailable)

    def _graph_now(self) -> InferenceGraph:
        if self._graph is None:  # layout ingress: the models are in the ingress replicas
            app = serve.get_replica_context().app_name
            self._graph = self._muxed(through_ingress(self._config, serve.get_deployment_handle("ingress", app_name=app)))
        return self._graph

    def _muxed(self, wiring: Wiring) -> InferenceGraph:
        """The streams' graph: the frames of all streams go to the detector in batches (serve_app/stream_muxer.py)."""
        if not isinstance(wiring.detector, RemoteDetector):
            raise TypeError(f"the streams deployment reaches its detector by handle, not {type(wiring.detector)}")
        self._muxer = MuxedDetector(wiring.detector, self._config.ingress.streams.muxer, self._registry.running)
        return replace(wiring, detector=self._muxer).graph(self._config, self._cpu)

    def _new_session(self, fps: float) -> VideoSession:
        return new_session(self._graph_now(), self._config, fps, self._cpu)

    def _on_frame(self, stream: LiveStream) -> None:
        info = stream.describe()
        self._metrics.record(stream.id, info["frames_processed"], info["dropped_frames"], info["failed_frames"])

    def _on_end(self, stream: LiveStream) -> None:
        self._on_frame(stream)
        self._metrics.forget(stream.id)

    async def start(self, source: str) -> dict[str, Any] | StreamRefusal:
        if self._unavailable:
            return StreamRefusal(503, "streams_unavailable", f"live streams are unavailable: {self._unavailable}")
        try:
            return (await self._registry.start(source)).describe()
        except InputError as exc:
            return StreamRefusal.of(exc)

    async def list(self) -> list[dict[str, Any]]:
        return self._registry.list()

    async def get(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        try:
            return self._registry.describe(stream_id)
        except InputError as exc:
            return StreamRefusal.of(exc)

    async def stop(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        try:
            return await self._registry.stop(stream_id)
        except InputError as exc:
            return StreamRefusal.of(exc)

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """For a streaming handle call: first the stream's description (or why not: unknown, too many listeners),
        then its records. The listener counts until this generator ends, however it ends."""
        try:
            described = self._registry.describe(stream_id)
            listener = self._registry.listen(stream_id)
        except InputError as exc:
            yield StreamRefusal.of(exc)
            return
        try:
            yield described
            async for record in listener.records():
                yield record
        finally:
            listener.close()

    async def describe(self) -> dict[str, Any]:
        return {"streams": len(self._registry.list()), "max_streams": self._config.ingress.streams.max_streams,
                "opening": self._registry.opening, "listeners": self._registry.listening,
                "muxer": self._muxer.stats() if self._muxer else None}

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: end the streams (their listeners get the summary)."""
        await self._registry.close()
        self._cpu.close()
