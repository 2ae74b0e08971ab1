"""The HTTP ingress deployment: decode once, run the graph, answer JSON (or an annotated JPEG)."""


import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.metrics import StageMetrics
from deployments.results import NODE
from deployments.stages import ClassifierStage, DetectorStage
from deployments.startup import freeze_startup_heap
from engines.tracking import TrackerParams
from serve_app.annotate import annotate, draw
from serve_app.auth import BearerAuth
from serve_app.clients import ClassifierClient, DetectorClient, PooledClassifiers, RemoteClassifier, RemoteDetector
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError, check_header, decode_checked
from serve_app.graph import CallSpan, ClassifierRoute, DetectorUnavailable, GraphResult, InferenceGraph, merge
from serve_app.http_input import image_bytes, image_list
from serve_app.schema import (
    BATCH_BODY,
    IMAGE_BODY,
    BatchResponse,
    VIDEO_BODY,
    CallTrace,
    DetectedObject,
    Edge,
    ErrorBody,
    ErrorResponse,
    Health,
    ImageInfo,
    StreamInfo,
    StreamList,
    StreamRequest,
    InferResponse,
    Mode,
    PipelineDescription,
    Trace,
)
from serve_app.telemetry import IngressMetrics
from serve_app.streams import LiveStream, StreamRegistry
from serve_app.video import Mp4Writer, VideoFile, video_bytes
from serve_app.video_session import VideoSession

T = TypeVar("T")

logger = logging.getLogger("ray.serve")

# FastAPIOffline serves Swagger UI and ReDoc from files in its wheel: /docs works without internet access.
api = FastAPIOffline(
    title="Parallel inference graph",
    description="A detector, then every classifier in parallel on each detected object, merged into one answer.",
    version="0.1.0",
)


def _openapi() -> dict[str, Any]:
    """FastAPI's document, plus the bearer scheme of the /v1 routes (Swagger's Authorize button)."""
    if api.openapi_schema is None:
        document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        document.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in document["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {}]  # {}: when ingress.auth_token_env is unset
        api.openapi_schema = document
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


@api.exception_handler(InputError)
async def _input_error(_: Request, exc: InputError) -> JSONResponse:
    return _error(exc.status, exc.code, exc.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return _error(422, "invalid_parameter", details)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 and 405 (and any other HTTPException) in the one error shape."""
    response = _error(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
    for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
        response.headers[name] = value
    return response


@api.exception_handler(DetectorUnavailable)
async def _detector_unavailable(_: Request, exc: DetectorUnavailable) -> JSONResponse:
    return _error(503, "detector_unavailable", str(exc))


class NotReady(Exception):
    """Deployments of the graph that did not answer, by name."""

    def __init__(self, failed: Mapping[str, BaseException], timeout_s: float) -> None:
        def why(exc: BaseException) -> str:
            if isinstance(exc, TimeoutError):
                return f"no answer within {timeout_s:g} s: still starting, or busy"
            if isinstance(exc, DeploymentUnavailableError):
                return "unavailable: its replicas failed to start; `serve status` and the replica logs say why"
            return type(exc).__name__

        names = ", ".join(f"{name} ({why(exc)})" for name, exc in failed.items())
        super().__init__(f"not ready: {names}")


@dataclass(frozen=True)
class _Inference:
    frame: np.ndarray
    result: GraphResult
    mode: Mode
    start: float  # perf_counter at the request's arrival in the ingress
    read_body_ms: float
    decode_ms: float


def _call_trace(span: CallSpan, request_start: float) -> CallTrace:
    t = span.timing

    def since_start(at: float | None) -> float | None:
        """A stage's clock reading as ms from the request's arrival; only on this host (one monotonic clock)."""
        return None if at is None or t.node != NODE else round((at - request_start) * 1e3, 2)

    return CallTrace(
        start_ms=round((span.started_at - request_start) * 1e3, 2),
        round_trip_ms=round(span.round_trip_ms, 2),
        transport_ms=round(span.transport_ms, 2),
        queue_ms=round(t.queue_ms, 2),
        compute_ms=round(t.compute_ms, 2),
        batch_size=t.batch_size,
        attempts=span.attempts,
        launch_ms=None if t.launch_ms is None else round(t.launch_ms, 3),
        gpu_start_ms=since_start(t.gpu_start_at),
        gpu_end_ms=since_start(t.gpu_end_at),
    )


def _spans(trace: Trace) -> dict[str, float]:
    """The trace flattened for the pipeline_span_ms{span} metric."""
    spans = {"read_body": trace.read_body_ms, "decode": trace.decode_ms, "crop": trace.crop_ms, "merge": trace.merge_ms}
    for name, call in (("detector", trace.detector), *trace.classifiers.items()):
        spans |= {f"{name}.transport": call.transport_ms, f"{name}.queue": call.queue_ms,
                  f"{name}.compute": call.compute_ms}
    return spans


def _now(describe: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return describe()

    return call


@dataclass(frozen=True)
class _Wiring:
    """How the graph reaches its stages, and how /healthz and /v1/pipeline ask them."""

    detector: DetectorClient
    classifiers: dict[str, ClassifierClient]
    describers: dict[str, Callable[[], Awaitable[Any]]]  # by deployment (or, in layout ingress, stage) name
    health: list[Callable[[], Awaitable[None]]]  # engines held in this replica; Serve checks the others


def _in_process(config: PipelineConfig, devices: Mapping[str, str]) -> _Wiring:
    detector = DetectorStage(config.detector, devices.get("detector", "cpu"), shared=True,
                             on_batch=StageMetrics("detector").record)
    stages = {c.name: ClassifierStage(c, devices.get(c.name, "cpu"), shared=True, on_batch=StageMetrics(c.name).record)
              for c in config.classifiers}
    return _Wiring(
        detector,
        dict(stages),
        {"detector": _now(detector.describe), **{name: _now(s.describe) for name, s in stages.items()}},
        [detector.check_health, *(s.check_health for s in stages.values())],
    )


def _remote(
    config: PipelineConfig,
    detector: DeploymentHandle,
    classifiers: dict[str, DeploymentHandle],
    pool: DeploymentHandle | None,
) -> _Wiring:
    options = config.ingress.handles

    def tuned(handle: DeploymentHandle) -> DeploymentHandle:
        # local routing is an init option of the handle (setting it through options() is deprecated in 2.60)
        if options.prefer_local_routing and not handle.is_initialized:
            handle._init(_prefer_local_routing=True)
        return handle.options(_by_reference=options.by_reference)

    detector = tuned(detector)
    describers: dict[str, Callable[[], Awaitable[Any]]] = {"detector": detector.describe.remote}
    if pool is not None:  # layout "colocated"
        pool = tuned(pool)
        pooled = PooledClassifiers(pool)
        clients: dict[str, ClassifierClient] = {c.name: pooled.client(c.name) for c in config.classifiers}
        describers["classifiers"] = pool.describe.remote
    else:
        handles = {c.name: tuned(classifiers[c.name]) for c in config.classifiers}
        clients = {name: RemoteClassifier(handle, name) for name, handle in handles.items()}
        describers |= {name: handle.describe.remote for name, handle in handles.items()}
    return _Wiring(RemoteDetector(detector), clients, describers, [])


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """Holds the graph. Where the models run depends on `config.layout`: behind the handles given here
    (`separate`: one per model; `colocated`: the detector and one shared `classifiers` deployment), or
    in this replica (`ingress`: no handles; the stages are built here, each on its device in `devices`)."""

    def __init__(
        self,
        config: PipelineConfig,
        detector: DeploymentHandle | None = None,
        classifiers: dict[str, DeploymentHandle] | None = None,
        pool: DeploymentHandle | None = None,
        devices: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._limits = config.ingress
        if detector is None:  # layout "ingress": the models live in this replica
            wiring = _in_process(config, devices or {})
        else:
            wiring = _remote(config, detector, classifiers or {}, pool)
        routes = [ClassifierRoute.from_config(c, wiring.classifiers[c.name]) for c in config.classifiers]
        self._graph = InferenceGraph(wiring.detector, routes, config.ingress.detector_timeout_s)
        self._describers = wiring.describers
        self._health = wiring.health
        self._deployments = 1 if detector is None else 1 + len(wiring.describers)  # the ingress and what it calls
        # Compressed bytes to a remote detector; a detector held here takes the decoded frame.
        self._send_encoded = config.ingress.detector_input == "encoded" and detector is not None
        self._auth = BearerAuth(config.ingress.auth_token_env)
        self._metrics = IngressMetrics()
        self._streams = StreamRegistry(config.ingress.streams, self._new_session, self._on_stream_frame)
        if config.ingress.deployment.num_replicas > 1:
            logger.info("live streams are held by the ingress replica that started them; with %d replicas, "
                        "/v1/streams requests may reach another one", config.ingress.deployment.num_replicas)
        freeze_startup_heap()
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
            logger.info("HTTP goes through Serve's Python proxy; starting Ray with RAY_SERVE_ENABLE_HA_PROXY=1 "
                        "(README) saves 5-7 ms a request on 2 cores (docs/benchmarks.md)")

    async def _counted(self, route: str, work: Awaitable[T]) -> T:
        """Await `work`, counting the answer's status in pipeline_requests_total{route, status}."""
        status = 500
        try:
            result = await work
            status = 200
            return result
        except InputError as exc:
            status = exc.status
            raise
        except DetectorUnavailable:
            status = 503
            raise
        finally:
            self._metrics.requests.inc(tags={"route": route, "status": str(status)})

    def _choose(self, classifiers: str | None) -> list[str] | None:
        """`?classifiers=a,b`: those and every classifier they depend on (None: all). 422 for unknown names."""
        if classifiers is None:
            return None
        names = [n.strip() for n in classifiers.split(",") if n.strip()]
        known = [c.name for c in self._config.classifiers]
        for name in names:
            if name not in known:
                raise InputError(422, "unknown_classifier",
                                 f"unknown classifier {name!r}; the classifiers are {', '.join(known)}")
        return self._config.with_dependencies(names)

    async def _infer(self, request: Request, mode: Mode | None, classifiers: str | None) -> _Inference:
        start = time.perf_counter()
        self._auth.check(request.headers.get("authorization"))
        only = self._choose(classifiers)
        data = await image_bytes(request, self._limits.max_body_bytes)
        return await self._run(data, mode, only, start)

    async def _run(self, data: bytes, mode: Mode | None, only: list[str] | None, start: float) -> _Inference:
        """One image through the graph, from its encoded bytes."""
        read_at = time.perf_counter()
        chosen: Mode = mode or self._limits.mode
        limit = self._limits.max_image_pixels
        check_header(data, limit)
        if self._send_encoded:
            result = await self._graph.run_encoded(data, lambda d: decode_checked(d, limit), chosen, only)
            decode_ms = result.decode_ms
        else:
            frame = decode_checked(data, limit)
            decode_ms = (time.perf_counter() - read_at) * 1e3
            result = await self._graph.run(frame, chosen, only)
        assert result.frame is not None
        return _Inference(result.frame, result, chosen, start, (read_at - start) * 1e3, decode_ms)

    def _answer(self, run: _Inference, trace: bool) -> InferResponse:
        """The /v1/infer answer for one image (and its metrics)."""
        frame, result = run.frame, run.result
        merged_at = time.perf_counter()
        objects = merge(result.detections, result.outputs)
        now = time.perf_counter()
        total_ms = round((now - run.start) * 1e3, 2)
        timings = {**result.timings_ms, "total": total_ms}
        breakdown = Trace(
            read_body_ms=round(run.read_body_ms, 2),
            decode_ms=round(run.decode_ms, 2),
            detector=_call_trace(result.calls["detector"], run.start),
            crop_ms=round(result.crop_ms, 2),
            classifiers={n: _call_trace(s, run.start) for n, s in result.calls.items() if n != "detector"},
            classify_ms=round(result.classify_ms, 2),
            merge_ms=round((now - merged_at) * 1e3, 2),
            total_ms=total_ms,
        )
        self._metrics.record(timings, len(result.detections), {n: e.code for n, e in result.errors.items()},
                             _spans(breakdown))
        return InferResponse(
            image=ImageInfo(width=frame.shape[1], height=frame.shape[0]),
            objects=objects,
            errors=result.errors,
            timings_ms=timings,
            mode=run.mode,
            trace=breakdown if trace else None,
        )

    async def _infer_json(self, request: Request, mode: Mode | None, trace: bool, classifiers: str | None) -> Response:
        answer = self._answer(await self._infer(request, mode, classifiers), trace)
        # Serialised here, once: returning the model would make FastAPI validate and encode it again.
        photo = {"objects": {"__all__": {"track_id"}}}  # track ids are for video
        return Response(answer.model_dump_json(exclude_none=not trace, exclude=photo), media_type="application/json")

    async def _one_of_batch(self, data: bytes, mode: Mode | None, only: list[str] | None) -> InferResponse | ErrorResponse:
        try:
            return self._answer(await self._run(data, mode, only, time.perf_counter()), trace=False)
        except InputError as exc:
            return ErrorResponse(error=ErrorBody(code=exc.code, message=exc.message))
        except DetectorUnavailable as exc:
            return ErrorResponse(error=ErrorBody(code="detector_unavailable", message=str(exc)))

    async def _infer_batch(self, request: Request, mode: Mode | None, classifiers: str | None) -> Response:
        self._auth.check(request.headers.get("authorization"))
        only = self._choose(classifiers)
        images = await image_list(request, self._limits.max_body_bytes, self._limits.max_batch_images)
        # all at once: the crops of every image meet in the classifiers' batches
        results = await asyncio.gather(*(self._one_of_batch(data, mode, only) for data in images))
        return Response(BatchResponse(results=list(results)).model_dump_json(exclude_none=True),
                        media_type="application/json")

    async def _annotate_jpeg(self, request: Request, mode: Mode | None, classifiers: str | None) -> Response:
        run = await self._infer(request, mode, classifiers)
        jpeg = annotate(run.frame, merge(run.result.detections, run.result.outputs))
        return Response(content=jpeg, media_type="image/jpeg")

    @api.post("/v1/infer", response_model=InferResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
    async def infer(self, request: Request, mode: Mode | None = None, trace: bool = False,
                    classifiers: str | None = None) -> Response:
        """Body: image bytes (image/*, application/octet-stream) or multipart field `image`.
        `trace=true` adds the per-request breakdown of where the time went; `classifiers=a,b` runs only
        those classifiers (and those they depend on)."""
        return await self._counted("/v1/infer", self._infer_json(request, mode, trace, classifiers))

    @api.post("/v1/infer/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY)
    async def infer_batch(self, request: Request, mode: Mode | None = None, classifiers: str | None = None) -> Response:
        """multipart/form-data with the field `images` repeated: one result per image, in order, each the
        /v1/infer answer or that image's own error. The images go through the graph together."""
        return await self._counted("/v1/infer/batch", self._infer_batch(request, mode, classifiers))

    @api.post("/v1/annotate", response_class=Response, openapi_extra=IMAGE_BODY,
              responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS})
    async def annotate(self, request: Request, mode: Mode | None = None, classifiers: str | None = None) -> Response:
        """Same input as /v1/infer; returns the image as JPEG with boxes and attributes drawn."""
        return await self._counted("/v1/annotate", self._annotate_jpeg(request, mode, classifiers))

    def _new_session(self, fps: float) -> VideoSession:
        t = self._limits.video.tracker
        params = TrackerParams(t.activation_threshold, t.lost_track_buffer, t.matching_threshold, fps or 30.0)
        reinfer = {c.name: (c.reinfer_area_growth, c.reinfer_interval) for c in self._config.classifiers}
        return VideoSession(self._graph, params, self._graph.routes, reinfer, fps)

    def _on_stream_frame(self, stream: LiveStream) -> None:
        info = stream.describe()
        self._metrics.record_stream(stream.id, info["fps"], info["dropped_frames"], info["tracks"])

    async def _open_video(self, request: Request) -> VideoFile:
        self._auth.check(request.headers.get("authorization"))
        data = await video_bytes(request, self._limits.video.max_bytes)
        return VideoFile(data, self._limits.video)

    async def _video_records(self, video: VideoFile,
                             every: int) -> AsyncIterator[tuple[dict[str, Any], np.ndarray | None]]:
        """Each processed frame's record and the frame, in order; detection runs `lookahead` frames ahead, so
        that frames meet in the detector's batches while the tracker and the classifiers work on an earlier one.
        Ends with the summary record, or an error record when the video breaks off or the detector fails (those
        come with no frame)."""
        session = self._new_session(video.info.fps)
        frames = video.frames(every)
        pending: deque[tuple[int, np.ndarray, asyncio.Future[GraphResult]]] = deque()
        try:
            while True:
                while len(pending) < self._limits.video.lookahead and (item := next(frames, None)) is not None:
                    index, frame = item
                    pending.append((index, frame, asyncio.ensure_future(self._graph.detect(frame))))
                if not pending:
                    break
                index, frame, detecting = pending.popleft()
                try:
                    detected = await detecting
                except DetectorUnavailable as exc:
                    yield {"error": {"code": "detector_unavailable", "message": str(exc), "frame": index}}, None
                    return
                record = await session.process(index, frame, detected.detections)
                self._metrics.record_video_frame(session.last_new_tracks, session.last_classified, session.last_cached)
                yield record, frame
            declared = video.info.frames
            if declared and video.frames_read < declared - 1:  # containers may round their frame count by one
                yield {"error": {"code": "truncated_video", "frame": video.frames_read,
                                 "message": f"the video breaks off after frame {video.frames_read} of the "
                                            f"{declared} it declares"}}, None
            yield session.summary(), None
        finally:
            for *_, detecting in pending:
                detecting.cancel()
            video.close()

    async def _video_ndjson(self, request: Request, every: int) -> StreamingResponse:
        video = await self._open_video(request)  # 4xx before the stream starts: limits, undecodable input

        async def lines() -> AsyncIterator[bytes]:
            async for record, _ in self._video_records(video, every):
                yield (json.dumps(record, separators=(",", ":")) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def _video_mp4(self, request: Request, every: int) -> Response:
        video = await self._open_video(request)
        writer = Mp4Writer(video.info.fps / every if video.info.fps else 25.0, video.info.width, video.info.height)
        try:
            async for record, frame in self._video_records(video, every):
                if "error" in record:
                    raise InputError(422, record["error"]["code"], record["error"]["message"])
                if frame is not None:
                    writer.write(draw(frame, [DetectedObject(**o) for o in record["objects"]]))
            return Response(writer.finish(), media_type="video/mp4")
        finally:
            writer.discard()  # the temporary file, whatever happened

    @api.post("/v1/video", response_class=StreamingResponse, openapi_extra=VIDEO_BODY,
              responses={200: {"content": {"application/x-ndjson": {}}}, **ERRORS})
    async def video(self, request: Request, every: int = Query(1, ge=1, le=1000)) -> StreamingResponse:
        """A video file: one NDJSON line per processed frame (tracked objects with their cached attributes), as
        frames are processed, then a summary line. `every=N` processes every Nth frame."""
        return await self._counted("/v1/video", self._video_ndjson(request, every))

    @api.post("/v1/video/annotate", response_class=Response, openapi_extra=VIDEO_BODY,
              responses={200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS})
    async def video_annotate(self, request: Request, every: int = Query(1, ge=1, le=1000)) -> Response:
        """The same processing; returns the processed frames as MP4 with tracks and attributes drawn."""
        return await self._counted("/v1/video/annotate", self._video_mp4(request, every))

    @api.post("/v1/streams", status_code=201, response_model=StreamInfo,
              responses={code: {"model": ErrorResponse} for code in (401, 422, 429)})
    async def start_stream(self, request: Request, body: StreamRequest) -> StreamInfo:
        """Start a live stream from an rtsp/http(s) URL or a file in the media directory (played at its frame
        rate). Its records: GET /v1/streams/{id}/events."""
        self._auth.check(request.headers.get("authorization"))
        stream = await self._streams.start(body.source)
        return StreamInfo(**stream.describe())

    @api.get("/v1/streams", response_model=StreamList, responses={401: {"model": ErrorResponse}})
    async def list_streams(self, request: Request) -> StreamList:
        """The streams of this ingress replica, with their state, fps, dropped frames and tracks."""
        self._auth.check(request.headers.get("authorization"))
        return StreamList(streams=[StreamInfo(**s) for s in self._streams.list()])

    @api.get("/v1/streams/{stream_id}", response_model=StreamInfo,
             responses={code: {"model": ErrorResponse} for code in (401, 404)})
    async def get_stream(self, request: Request, stream_id: str) -> StreamInfo:
        self._auth.check(request.headers.get("authorization"))
        return StreamInfo(**self._streams.get(stream_id).describe())

    @api.get("/v1/streams/{stream_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"application/x-ndjson": {}}}, **{c: {"model": ErrorResponse} for c in (401, 404)}})
    async def stream_events(self, request: Request, stream_id: str) -> StreamingResponse:
        """The stream's per-frame records as they happen (the same lines as /v1/video), until it ends; a reader
        that falls behind loses its oldest lines, never the stream."""
        self._auth.check(request.headers.get("authorization"))
        self._streams.get(stream_id)  # 404 before the response starts

        async def lines() -> AsyncIterator[bytes]:
            async for record in self._streams.events(stream_id):
                yield (json.dumps(record, separators=(",", ":")) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @api.delete("/v1/streams/{stream_id}", response_model=StreamInfo,
                responses={code: {"model": ErrorResponse} for code in (401, 404)})
    async def stop_stream(self, request: Request, stream_id: str) -> StreamInfo:
        """Stop a stream; its listeners get the summary and their responses end."""
        self._auth.check(request.headers.get("authorization"))
        return StreamInfo(**await self._streams.stop(stream_id))

    async def _describe_all(self, timeout_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Every deployment's description; raises NotReady naming each one that did not answer in time."""
        async def ask(describe: Callable[[], Awaitable[Any]]) -> Any:
            async with asyncio.timeout(timeout_s):
                return await describe()

        names = list(self._describers)
        answers = await asyncio.gather(*(ask(self._describers[n]) for n in names), return_exceptions=True)
        failed = {n: a for n, a in zip(names, answers) if isinstance(a, BaseException)}
        for check in self._health:
            try:
                await check()
            except Exception as exc:  # an engine held in this replica
                failed.setdefault("ingress", exc)
        if failed:
            raise NotReady(failed, timeout_s)
        detector, classifiers = answers[0], []
        for answer in answers[1:]:  # the shared `classifiers` deployment answers for all of them
            classifiers.extend(answer if isinstance(answer, list) else [answer])
        return detector, classifiers

    @api.get("/v1/pipeline", response_model=PipelineDescription,
             responses={code: {"model": ErrorResponse} for code in (401, 503)})
    async def pipeline(self, request: Request) -> PipelineDescription | JSONResponse:
        """The running graph: the detector and each classifier with its filters, backend and device."""
        self._auth.check(request.headers.get("authorization"))
        try:
            detector, classifiers = await self._describe_all(10.0)
        except NotReady as exc:  # a deployment is down or still starting
            return _error(503, "pipeline_unavailable", str(exc))
        return PipelineDescription(
            mode=self._limits.mode,
            layout=self._config.layout,
            detector=detector,
            classifiers=classifiers,
            edges=[Edge(parent=p, child=c, labels=labels) for p, c, labels in self._config.edges()],
            limits={"max_body_bytes": self._limits.max_body_bytes, "max_image_pixels": self._limits.max_image_pixels,
                    "max_batch_images": self._limits.max_batch_images},
        )

    @api.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def healthz(self) -> JSONResponse:
        """200 once every deployment answers, 503 naming those that do not (still starting, or failed)."""
        try:
            await self._describe_all(5.0)
        except NotReady as exc:
            return _error(503, "not_ready", str(exc))
        return JSONResponse({"status": "ok", "layout": self._config.layout, "deployments": self._deployments})

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: end the live streams (their listeners get the summary)."""
        await self._streams.close()

    async def check_health(self) -> None:
        """Serve calls this periodically: in layout `ingress` the engines held here must answer."""
        for check in self._health:
            await check()

