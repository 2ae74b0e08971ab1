"""The HTTP ingress deployment: decode once, run the graph, answer JSON (or an annotated JPEG)."""


import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.annotate import annotate
from serve_app.auth import BearerAuth
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError, decode_image
from serve_app.graph import ClassifierRoute, DetectorUnavailable, GraphResult, InferenceGraph, merge
from serve_app.http_input import image_bytes
from serve_app.schema import ErrorResponse, ImageInfo, InferResponse, Mode, PipelineDescription
from serve_app.telemetry import IngressMetrics

T = TypeVar("T")

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="Parallel inference graph",
    description="A detector, then every classifier in parallel on each detected object, merged into one answer.",
    version="0.1.0",
)
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


@api.exception_handler(DetectorUnavailable)
async def _detector_unavailable(_: Request, exc: DetectorUnavailable) -> JSONResponse:
    return _error(503, "detector_unavailable", str(exc))


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        detector: DeploymentHandle,
        classifiers: dict[str, DeploymentHandle],
        config: PipelineConfig,
    ) -> None:
        self._config = config
        self._limits = config.ingress
        handles = config.ingress.handles

        def tuned(handle: DeploymentHandle) -> DeploymentHandle:
            return handle.options(_by_reference=handles.by_reference, _prefer_local_routing=handles.prefer_local_routing)

        detector = tuned(detector)
        classifiers = {name: tuned(h) for name, h in classifiers.items()}
        routes = [ClassifierRoute.from_config(c, classifiers[c.name]) for c in config.classifiers]
        self._graph = InferenceGraph(detector, routes, config.ingress.detector_timeout_s)
        self._detector = detector
        self._classifiers = classifiers
        self._auth = BearerAuth(config.ingress.auth_token_env)
        self._metrics = IngressMetrics()

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

    async def _infer(self, request: Request, mode: Mode | None) -> tuple[Any, GraphResult, dict[str, float], Mode]:
        start = time.perf_counter()
        self._auth.check(request.headers.get("authorization"))
        data = await image_bytes(request, self._limits.max_body_bytes)
        frame = decode_image(data, self._limits.max_image_pixels)
        chosen: Mode = mode or self._limits.mode
        result = await self._graph.run(frame, chosen)
        timings = {**result.timings_ms, "total": round((time.perf_counter() - start) * 1e3, 2)}
        self._metrics.record(timings, len(result.detections), {n: e.code for n, e in result.errors.items()})
        return frame, result, timings, chosen

    async def _infer_json(self, request: Request, mode: Mode | None) -> InferResponse:
        frame, result, timings, chosen = await self._infer(request, mode)
        return InferResponse(
            image=ImageInfo(width=frame.shape[1], height=frame.shape[0]),
            objects=merge(result.detections, result.outputs),
            errors=result.errors,
            timings_ms=timings,
            mode=chosen,
        )

    async def _annotate_jpeg(self, request: Request, mode: Mode | None) -> Response:
        frame, result, _, _ = await self._infer(request, mode)
        jpeg = annotate(frame, merge(result.detections, result.outputs))
        return Response(content=jpeg, media_type="image/jpeg")

    @api.post("/v1/infer", response_model=InferResponse, responses=ERRORS)
    async def infer(self, request: Request, mode: Mode | None = None) -> InferResponse:
        """Body: image bytes (image/*, application/octet-stream) or multipart field `image`."""
        return await self._counted("/v1/infer", self._infer_json(request, mode))

    @api.post("/v1/annotate", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **ERRORS})
    async def annotate(self, request: Request, mode: Mode | None = None) -> Response:
        """Same input as /v1/infer; returns the image as JPEG with boxes and attributes drawn."""
        return await self._counted("/v1/annotate", self._annotate_jpeg(request, mode))

    async def _describe_all(self, timeout_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        names = list(self._classifiers)
        calls = [self._detector.describe.remote(), *(self._classifiers[n].describe.remote() for n in names)]
        answers = await asyncio.wait_for(asyncio.gather(*calls), timeout_s)
        return answers[0], list(answers[1:])

    @api.get("/v1/pipeline", response_model=PipelineDescription, responses={503: {"model": ErrorResponse}})
    async def pipeline(self, authorization: str | None = Header(None)) -> PipelineDescription | JSONResponse:
        """The running graph: the detector and each classifier with its filters, backend and device."""
        self._auth.check(authorization)
        try:
            detector, classifiers = await self._describe_all(10.0)
        except Exception as exc:  # a deployment is down or still starting
            return _error(503, "pipeline_unavailable", f"a deployment did not answer: {type(exc).__name__}")
        return PipelineDescription(
            mode=self._limits.mode,
            detector=detector,
            classifiers=classifiers,
            limits={"max_body_bytes": self._limits.max_body_bytes, "max_image_pixels": self._limits.max_image_pixels},
        )

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once every deployment answers, 503 otherwise."""
        try:
            await self._describe_all(5.0)
        except Exception as exc:
            return _error(503, "not_ready", f"a deployment did not answer: {type(exc).__name__}")
        return JSONResponse({"status": "ok", "deployments": 2 + len(self._classifiers)})
