"""POST /v1/video (NDJSON per frame) and /v1/video/annotate (MP4): a video file through the graph and the tracker."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from serve_app.admission import ApiGate
from serve_app.annotate import draw
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError
from serve_app.graph import InferenceGraph
from serve_app.offload import INLINE, CpuWork
from serve_app.routes.common import ERRORS, bearer, counted, services
from serve_app.schema import VIDEO_BODY, DetectedObject
from serve_app.telemetry import IngressMetrics
from serve_app.video import Mp4Writer, NvdecVideoFile, VideoFile, video_bytes
from serve_app.video_session import VideoSession, new_session

router = APIRouter(dependencies=[Depends(bearer)])


def ndjson(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


class VideoService:
    def __init__(self, graph: InferenceGraph, config: PipelineConfig, metrics: IngressMetrics,
                 cpu: CpuWork = INLINE, gate: ApiGate | None = None, on_nvdec: bool = False,
                 workers: Any = None, frames_device: str | None = None) -> None:
        """`on_nvdec`: H.264 and HEVC videos are decoded on the GPU (serve_app/video.py `NvdecVideoFile`), their
        frames kept on `frames_device` where the graph's models take them there (the host otherwise);
        `workers`: the streams deployment's handle, where /v1/video runs on its stream workers
        (ingress.streams.workers.videos)."""
        self._file = functools.partial(NvdecVideoFile, device=frames_device) if on_nvdec else VideoFile
        self._cpu = cpu
        self._gate = gate or ApiGate(1024)
        self._graph = graph
        self._config = config
        self._limits = config.ingress.video
        self._metrics = metrics
        self._workers = workers

    async def open(self, request: Request) -> VideoFile:
        return await self.open_data(await video_bytes(request, self._limits.max_bytes))

    async def open_data(self, data: bytes) -> VideoFile:
        return await self._cpu.run(self._file, data, self._limits)  # a temporary file written, then opened

    def _count(self, session: VideoSession) -> None:
        self._metrics.record_video_frame(session.last_new_tracks, session.last_classified, session.last_cached)

    async def records(self, video: VideoFile, every: int) -> AsyncIterator[tuple[dict[str, Any], np.ndarray | None]]:
        """The session's records, then (unless it failed) a truncation record when the video breaks off before
        the frames it declares, and the summary. Closes the video whatever ends the iteration."""
        session = new_session(self._graph, self._config, video.info.fps, self._cpu)
        try:
            async for record, frame in session.records(video.frames(every), self._limits.lookahead, self._count):
                yield record, frame
                if frame is None:  # the detector failed: the error record ends the video
                    break
            else:
                declared = video.info.frames
                if video.cut_short:
                    yield {"error": {"code": "video_too_long", "frame": video.frames_read,
                                     "message": video.cut_short}}, None
                elif declared and video.frames_read < declared - 1:  # containers may round their count by one
                    yield {"error": {"code": "truncated_video", "frame": video.frames_read,
                                     "message": f"the video breaks off after frame {video.frames_read} of the "
                                                f"{declared} it declares"}}, None
            yield session.summary(), None
        finally:
            video.close()

    async def ndjson(self, request: Request, every: int) -> StreamingResponse:
        if self._workers is not None:
            return await self._on_a_worker(request, every)
        video = await self.open(request)  # 4xx before the stream starts: limits, undecodable input

        async def lines() -> AsyncIterator[bytes]:
            async with self._gate.admit():  # the frames are API work for as long as they stream
                async for record, _ in self.records(video, every):
                    yield ndjson(record)

        # the response owns the temporary file: closed after it is sent, or when the client left before
        return StreamingResponse(lines(), media_type="application/x-ndjson", background=BackgroundTask(video.close))

    async def _on_a_worker(self, request: Request, every: int) -> StreamingResponse:
        """The video on the least-loaded stream worker (its own models and decoders): the bytes go there, its
        records come back. The worker opens it first, so a refused video is still a 4xx before the stream."""
        from serve_app.stream_relay import relay_first

        data = await video_bytes(request, self._limits.max_bytes)
        # megabytes: through Ray's object store, not pickled over the streams replica's gRPC server
        generator = self._workers.options(stream=True, _by_reference=True).video.remote(data, every)
        records = await relay_first(generator, "the stream workers")

        async def lines() -> AsyncIterator[bytes]:
            async with self._gate.admit():  # the frames are API work for as long as they stream
                async for record in records:
                    yield ndjson(record)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def mp4(self, request: Request, every: int) -> Response:
        video = await self.open(request)
        writer = Mp4Writer(video.info.fps / every if video.info.fps else 25.0, video.info.width, video.info.height)
        try:
            async for record, frame in self.records(video, every):
                if "error" in record:  # a 503 stays a 503, a video too long a 413
                    code = record["error"]["code"]
                    status = {"detector_unavailable": 503, "video_too_long": 413}.get(code, 422)
                    raise InputError(status, record["error"]["code"], record["error"]["message"])
                if frame is not None:
                    frame = frame if isinstance(frame, np.ndarray) else frame.cpu().numpy()  # kept on the device
                    objects = [DetectedObject(**o) for o in record["objects"]]
                    await self._cpu.run(lambda f=frame, o=objects: writer.write(draw(f, o)))
            return Response(await self._cpu.run(writer.finish), media_type="video/mp4")
        finally:
            writer.discard()  # the temporary file, whatever happened


@router.post("/v1/video", response_class=StreamingResponse, openapi_extra=VIDEO_BODY,
             responses={200: {"content": {"application/x-ndjson": {}}}, **ERRORS})
async def video(request: Request, every: int = Query(1, ge=1, le=1000)) -> StreamingResponse:
    """A video file: one NDJSON line per processed frame (tracked objects with their cached attributes), as
    frames are processed, then a summary line. `every=N` processes every Nth frame."""
    return await counted(request, "/v1/video", services(request).video.ndjson(request, every))


@router.post("/v1/video/annotate", response_class=Response, openapi_extra=VIDEO_BODY,
             responses={200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS})
async def video_annotate(request: Request, every: int = Query(1, ge=1, le=1000)) -> Response:
    """The same processing; returns the processed frames as MP4 with tracks and attributes drawn."""
    return await counted(request, "/v1/video/annotate", services(request).video.mp4(request, every))
