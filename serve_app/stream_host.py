"""One process's live streams: the registry, the sessions that track and classify their frames, the muxer in front
of the detector, and the streams' metrics.

The streams deployment holds one when it runs the streams itself (its graph reaches the models by handle:
serve_app/wiring.py `remote`, or in layout ingress `through_ingress`); each stream worker holds one whose graph
holds the models in its own process (`in_process`, serve_app/stream_workers.py). Its methods answer the streams
API: a description, or a `StreamRefusal` that the ingress turns into the HTTP error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from deployments.results import DetectorResult
from engines.tracking import tracker_unavailable
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError
from serve_app.device_frames import frames_on_device
from serve_app.graph import InferenceGraph
from serve_app.offload import CpuWork
from serve_app.stream_muxer import MuxedDetector
from serve_app.streams import LiveStream, StreamRefusal, StreamRegistry
from serve_app.telemetry import StreamMetrics
from serve_app.video_session import VideoSession, new_session
from serve_app.wiring import Wiring

logger = logging.getLogger("ray.serve")


def batched(detector: Any) -> Callable[[list[Any]], Any]:
    """The muxer's call for a batch of frames: one `detect_many` (a handle call) where the detector has it; else
    each frame's `detect` at once, which a detector held here batches (deployments/batcher.py)."""
    many = getattr(detector, "detect_many", None)
    if many is not None:
        return many

    async def detect_many(images: list[Any]) -> list[DetectorResult]:
        return list(await asyncio.gather(*(detector.detect(image) for image in images)))

    return detect_many


class StreamHost:
    """The streams of one process. `wiring()` gives the graph's clients when the first graph is needed (`prepare`
    asks at once: a worker loads its models before it takes a stream); `gpu_share`: this process's share of a
    GPU, for NVDEC (ingress.streams.decoder)."""

    def __init__(self, config: PipelineConfig, wiring: Callable[[], Wiring], gpu_share: float) -> None:
        self._config = config
        self._wiring_of = wiring
        self._wiring: Wiring | None = None
        self._cpu = CpuWork(config.cpu_work)
        self._metrics = StreamMetrics()
        self._registry = StreamRegistry(config.ingress.streams, self._new_session, config.detector.max_detect_side,
                                        self._on_frame, self._on_end, gpu_share=gpu_share)
        self._muxer: MuxedDetector | None = None
        self._graph: InferenceGraph | None = None
        self._detector: Any = None  # the graph's own detector client, before the muxer
        self._decoder: Any = None  # where the models here take frames (serve_app/device_frames.py), if they do
        self._videos: Any = None  # /v1/video here (serve_app/routes/video.py VideoService), made when first asked
        self.videos = 0  # videos being processed
        self.videos_done = 0  # videos processed to their end
        # The tracker's library is imported now: imported at a stream's first frame it held this replica's event
        # loop for 1-7 s (a loaded 2-core box), so the 201 came after most of a short clip had gone unwatched.
        # Where it is missing (a trimmed environment), the process still starts, and every start says why not.
        self.unavailable = tracker_unavailable()
        if self.unavailable:
            logger.warning("live streams are unavailable: %s", self.unavailable)

    def prepare(self) -> InferenceGraph:
        """The streams' graph: the frames of all streams go to the detector in batches (serve_app/stream_muxer.py).
        Where the models are in this process and take frames on their device (`ingress.frames_on_device`), the
        frames are kept there from the decode on, and the crops are cut there."""
        if self._graph is None:
            wiring = self._wiring_of()
            self._detector = wiring.detector
            self._decoder = decoder = frames_on_device(self._config, wiring)
            self._registry.frames_device = str(decoder.device) if decoder is not None else None
            self._muxer = MuxedDetector(batched(wiring.detector), self._config.ingress.streams.muxer,
                                        self._registry.running)
            self._wiring = replace(wiring, detector=self._muxer)
            self._graph = self._wiring.graph(self._config, self._cpu)
        return self._graph

    def _new_session(self, fps: float) -> VideoSession:
        return new_session(self.prepare(), self._config, fps, self._cpu)

    def _on_frame(self, stream: LiveStream) -> None:
        info = stream.describe()
        self._metrics.record(stream.id, info["frames_processed"], info["dropped_frames"], info["failed_frames"])

    def _on_end(self, stream: LiveStream) -> None:
        self._on_frame(stream)
        self._metrics.forget(stream.id)

    async def start(self, source: str) -> dict[str, Any] | StreamRefusal:
        if self.unavailable:
            return StreamRefusal(503, "streams_unavailable", f"live streams are unavailable: {self.unavailable}")
        try:
            return (await self._registry.start(source)).describe()
        except InputError as exc:
            return StreamRefusal.of(exc)

    def running(self) -> list[str]:
        """The ids of the streams that hold a slot under max_streams here."""
        return self._registry.held()

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
        """First the stream's description (or why not: unknown, too many listeners), then its records. The
        listener counts until this generator ends, however it ends."""
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

    async def feed(self) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]] | StreamRefusal]:
        """Every stream's records on one listener (serve_app/stream_feed.py): first the running streams
        (`{"streams": [...]}`, or why not: too many listeners), then lists of records, each tagged with its
        stream's id. The listener counts until this generator ends, however it ends."""
        try:
            feed = self._registry.feed()
        except InputError as exc:
            yield StreamRefusal.of(exc)
            return
        try:
            yield {"streams": [s for s in self._registry.list() if s["state"] == "running"]}
            async for batch in feed.batches():
                yield batch
        finally:
            feed.close()

    async def video(self, data: bytes, every: int) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """/v1/video on this process's graph: first the opened video's size and rate (or why it is refused: the
        ingress's 4xx), then the same records and summary as the ingress gives."""
        if self._videos is None:
            from serve_app.nvdec_reader import videos_on_nvdec
            from serve_app.routes.video import VideoService
            from serve_app.telemetry import IngressMetrics

            self.prepare()
            self._videos = VideoService(self._graph_for_videos(), self._config, IngressMetrics(), self._cpu,
                                        on_nvdec=videos_on_nvdec(self._config, self._decoder),
                                        frames_device=self._registry.frames_device)
        try:
            video = await self._videos.open_data(data)
        except InputError as exc:
            yield StreamRefusal.of(exc)
            return
        self.videos += 1
        try:
            info = video.info
            yield {"video": {"width": info.width, "height": info.height, "fps": info.fps, "frames": info.frames}}
            async for record, _ in self._videos.records(video, every):
                yield record
            self.videos_done += 1
        finally:
            self.videos -= 1
            video.close()

    def _graph_for_videos(self) -> InferenceGraph:
        """The models of this process without the streams' muxer: a video's frames batch through its lookahead."""
        assert self._wiring is not None
        return replace(self._wiring, detector=self._detector).graph(self._config, self._cpu)

    def describe(self) -> dict[str, Any]:
        return {"streams": self._registry.running(), "videos": self.videos, "videos_done": self.videos_done,
                "max_streams": self._config.ingress.streams.max_streams, "opening": self._registry.opening, "listeners": self._registry.listening,
                "decoder": self._registry.decoder, "frames": self._registry.frames_device or "host",
                "muxer": self._muxer.stats() if self._muxer else None}

    async def close(self) -> None:
        """End the streams (their listeners get the summary), then release what the graph holds here."""
        await self._registry.close()
        self._cpu.close()
        if self._wiring is not None:
            self._wiring.close()

