"""The HTTP ingress deployment: decode once, run the graph, answer JSON (or an annotated JPEG)."""


import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.annotate import annotate
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError, decode_image
from serve_app.graph import ClassifierRoute, DetectorUnavailable, GraphResult, InferenceGraph, merge
from serve_app.http_input import image_bytes
from serve_app.schema import ErrorResponse, ImageInfo, InferResponse, Mode, PipelineDescription

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="Parallel inference graph",
    description="A detector, then every classifier in parallel on each detected object, merged into one answer.",
    version="0.1.0",
)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)
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
        routes = [ClassifierRoute.from_config(c, classifiers[c.name]) for c in config.classifiers]
        self._graph = InferenceGraph(detector, routes, config.ingress.detector_timeout_s)
        self._detector = detector
        self._classifiers = classifiers

    async def _infer(self, request: Request, mode: Mode | None) -> tuple[Any, GraphResult, float, Mode]:
        start = time.perf_counter()
        data = await image_bytes(request, self._limits.max_body_bytes)
        frame = decode_image(data, self._limits.max_image_pixels)
        chosen: Mode = mode or self._limits.mode
        result = await self._graph.run(frame, chosen)
        return frame, result, start, chosen

    @api.post("/v1/infer", response_model=InferResponse, responses=ERRORS)
    async def infer(self, request: Request, mode: Mode | None = None) -> InferResponse:
        """Body: image bytes (image/*, application/octet-stream) or multipart field `image`."""
        frame, result, start, chosen = await self._infer(request, mode)
        timings = dict(result.timings_ms)
        timings["total"] = round((time.perf_counter() - start) * 1e3, 2)
        return InferResponse(
            image=ImageInfo(width=frame.shape[1], height=frame.shape[0]),
            objects=merge(result.detections, result.outputs),
            errors=result.errors,
            timings_ms=timings,
            mode=chosen,
        )

    @api.post("/v1/annotate", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **ERRORS})
    async def annotate(self, request: Request, mode: Mode | None = None) -> Response:
        """Same input as /v1/infer; returns the image as JPEG with boxes and attributes drawn."""
        frame, result, _, _ = await self._infer(request, mode)
        jpeg = annotate(frame, merge(result.detections, result.outputs))
        return Response(content=jpeg, media_type="image/jpeg")

    async def _describe_all(self, timeout_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        names = list(self._classifiers)
        calls = [self._detector.describe.remote(), *(self._classifiers[n].describe.remote() for n in names)]
        answers = await asyncio.wait_for(asyncio.gather(*calls), timeout_s)
        return answers[0], list(answers[1:])

    @api.get("/v1/pipeline", response_model=PipelineDescription, responses={503: {"model": ErrorResponse}})
    async def pipeline(self) -> PipelineDescription | JSONResponse:
        """The running graph: the detector and each classifier with its filters, backend and device."""
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
