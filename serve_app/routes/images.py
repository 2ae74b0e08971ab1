"""POST /v1/infer, /v1/infer/batch and /v1/annotate: one image (or several) through the graph."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from deployments.budget import LARGE_PIXELS, PixelBudget
from deployments.results import NODE
from engines.image import Scale, fit_side
from serve_app.annotate import annotate
from serve_app.config import PipelineConfig
from serve_app.decoding import InputError, check_header, decode_checked
from serve_app.device_frames import is_jpeg
from serve_app.device_pass import DevicePass
from serve_app.graph import CallSpan, DetectorUnavailable, GraphResult, InferenceGraph, merge
from serve_app.http_input import image_bytes, image_list
from serve_app.offload import INLINE, CpuWork
from serve_app.routes.common import ERRORS, bearer, counted, services
from serve_app.schema import (
    BATCH_BODY,
    IMAGE_BODY,
    BatchResponse,
    CallTrace,
    ErrorBody,
    ErrorResponse,
    ImageInfo,
    InferResponse,
    Mode,
    Trace,
)
from serve_app.telemetry import IngressMetrics

if TYPE_CHECKING:
    from serve_app.device_frames import DeviceBatches

router = APIRouter(dependencies=[Depends(bearer)])


@dataclass(frozen=True)
class Inference:
    frame: Any  # BGR (H, W, 3) uint8: numpy, or a torch tensor on the device that decoded it
    result: GraphResult
    mode: Mode
    start: float  # perf_counter at the request's arrival in the ingress
    read_body_ms: float
    decode_ms: float


def call_trace(span: CallSpan, request_start: float) -> CallTrace:
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


def spans(trace: Trace) -> dict[str, float]:
    """The trace flattened for the pipeline_span_ms{span} metric."""
    out = {"read_body": trace.read_body_ms, "decode": trace.decode_ms, "crop": trace.crop_ms, "merge": trace.merge_ms}
    for name, call in (("detector", trace.detector), *trace.classifiers.items()):
        out |= {f"{name}.transport": call.transport_ms, f"{name}.queue": call.queue_ms,
                f"{name}.compute": call.compute_ms}
    return out


def _decoded(frame: Any) -> Any:
    """The frame, or the client's error if the body did not decode."""
    if frame is None:
        raise InputError(400, "undecodable_image", "the body is not an image this service can decode")
    return frame


class ImageService:
    """Images through the graph: read, check, decode, run, answer (and count)."""

    def __init__(self, graph: InferenceGraph, config: PipelineConfig, metrics: IngressMetrics,
                 send_encoded: bool, cpu: CpuWork = INLINE, on_device: DevicePass | DeviceBatches | None = None
                 ) -> None:
        """`on_device`: decode into the detector's device memory (layout ingress on a GPU: the frame never returns
        to the host), the images of concurrent requests in one batch: through the whole pipeline at once
        (`DevicePass`), or step by step (`DeviceBatches`: decodes and crops batched, the rest in the graph)."""
        self._cpu = cpu
        self._on_device = on_device
        self._budget = PixelBudget(config.ingress.max_inflight_pixels)
        self._graph = graph
        self._config = config
        self._limits = config.ingress
        self._metrics = metrics
        self._send_encoded = send_encoded  # compressed bytes to a remote detector; one held here takes the frame

    def choose(self, classifiers: str | None) -> list[str] | None:
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

    async def infer(self, request: Request, mode: Mode | None, classifiers: str | None) -> Inference:
        start = time.perf_counter()
        only = self.choose(classifiers)
        data = await image_bytes(request, self._limits.max_body_bytes)
        return await self.run(data, mode, only, start)

    async def run(self, data: bytes, mode: Mode | None, only: list[str] | None, start: float) -> Inference:
        """One image through the graph, from its encoded bytes; its pixels count against the replica's budget
        from the header check to the answer."""
        width, height = check_header(data, self._limits.max_image_pixels)
        async with self._budget.hold(width * height):
            return await self._run(data, mode, only, start, width * height)

    async def _run(self, data: bytes, mode: Mode | None, only: list[str] | None, start: float,
                   pixels: int) -> Inference:
        read_at = time.perf_counter()
        chosen: Mode = mode or self._limits.mode
        limit = self._limits.max_image_pixels
        if self._send_encoded and pixels > LARGE_PIXELS:
            # A huge photo: decoded once, here (off the loop), and the detector gets it at its working size
            # instead of decoding the same bytes a second time only to scale them down.
            frame, small = await self._cpu.run_large(pixels, self._decode_for_both, data, limit)
            decode_ms = (time.perf_counter() - read_at) * 1e3
            result = await self._graph.run(frame, chosen, only, detect_on=small)
        elif self._send_encoded:
            result = await self._graph.run_encoded(data, lambda d: decode_checked(d, limit), chosen, only, pixels)
            decode_ms = result.decode_ms
        elif self._on_device is not None:
            # a JPEG is decoded with the others of its batch; another format by OpenCV first (a large one off the
            # loop, as on the host path) and uploaded
            image = data if is_jpeg(data) else _decoded(
                await self._cpu.run_large(pixels, self._on_device.decoder.decode, data))
            if isinstance(self._on_device, DevicePass):  # then detected and classified with the batch
                decode_ms = (time.perf_counter() - read_at) * 1e3
                result = await self._on_device.run(image, only)
                decode_ms = result.decode_ms if image is data else decode_ms
            else:
                frame = _decoded(await self._on_device.decode(data)) if image is data else image
                decode_ms = (time.perf_counter() - read_at) * 1e3
                result = await self._graph.run(frame, chosen, only)
        else:
            frame = await self._cpu.run_large(pixels, decode_checked, data, limit)
            decode_ms = (time.perf_counter() - read_at) * 1e3
            result = await self._graph.run(frame, chosen, only)
        assert result.frame is not None
        return Inference(result.frame, result, chosen, start, (read_at - start) * 1e3, decode_ms)

    def _decode_for_both(self, data: bytes, limit: int) -> tuple[np.ndarray, tuple[bytes, Scale]]:
        """The full frame (for the crops) and, for the detector, the frame at its working size as a JPEG (quality
        95: a few hundred KB over the hop, where the raw frame would be megabytes) with its scale."""
        frame = decode_checked(data, limit)
        small, scale = fit_side(frame, self._config.detector.max_detect_side)
        return frame, (cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), scale)

    def answer(self, run: Inference, trace: bool) -> InferResponse:
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
            detector=call_trace(result.calls["detector"], run.start),
            crop_ms=round(result.crop_ms, 2),
            classifiers={n: call_trace(s, run.start) for n, s in result.calls.items() if n != "detector"},
            classify_ms=round(result.classify_ms, 2),
            merge_ms=round((now - merged_at) * 1e3, 2),
            total_ms=total_ms,
        )
        self._metrics.record(timings, len(result.detections), {n: e.code for n, e in result.errors.items()},
                             spans(breakdown))
        return InferResponse(
            image=ImageInfo(width=frame.shape[1], height=frame.shape[0]),
            objects=objects,
            errors=result.errors,
            timings_ms=timings,
            mode=run.mode,
            trace=breakdown if trace else None,
        )

    async def infer_json(self, request: Request, mode: Mode | None, trace: bool, classifiers: str | None) -> Response:
        answer = self.answer(await self.infer(request, mode, classifiers), trace)
        # Serialised here, once: returning the model would make FastAPI validate and encode it again.
        photo = {"objects": {"__all__": {"track_id"}}}  # track ids are for video
        return Response(answer.model_dump_json(exclude_none=not trace, exclude=photo), media_type="application/json")

    async def _one_of_batch(self, data: bytes, mode: Mode | None, only: list[str] | None) -> InferResponse | ErrorResponse:
        try:
            return self.answer(await self.run(data, mode, only, time.perf_counter()), trace=False)
        except InputError as exc:
            return ErrorResponse(error=ErrorBody(code=exc.code, message=exc.message))
        except DetectorUnavailable as exc:
            return ErrorResponse(error=ErrorBody(code="detector_unavailable", message=str(exc)))

    async def infer_batch(self, request: Request, mode: Mode | None, classifiers: str | None) -> Response:
        only = self.choose(classifiers)
        items = await image_list(request, self._limits.max_body_bytes, self._limits.max_batch_images)
        # all at once: the crops of every image meet in the classifiers' batches
        results = await asyncio.gather(*(self._one_of_batch(data, mode, only) for data in items))
        return Response(BatchResponse(results=list(results)).model_dump_json(exclude_none=True),
                        media_type="application/json")

    async def annotate_jpeg(self, request: Request, mode: Mode | None, classifiers: str | None) -> Response:
        run = await self.infer(request, mode, classifiers)
        frame = run.frame if isinstance(run.frame, np.ndarray) else run.frame.cpu().numpy()  # the one copy back
        jpeg = await self._cpu.run(annotate, frame, merge(run.result.detections, run.result.outputs))
        return Response(content=jpeg, media_type="image/jpeg")


@router.post("/v1/infer", response_model=InferResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
async def infer(request: Request, mode: Mode | None = None, trace: bool = False,
                classifiers: str | None = None) -> Response:
    """Body: image bytes (image/*, application/octet-stream) or multipart field `image`.
    `trace=true` adds the per-request breakdown of where the time went; `classifiers=a,b` runs only
    those classifiers (and those they depend on)."""
    work = services(request).images.infer_json(request, mode, trace, classifiers)
    return await counted(request, "/v1/infer", work)


@router.post("/v1/infer/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY)
async def infer_batch(request: Request, mode: Mode | None = None, classifiers: str | None = None) -> Response:
    """multipart/form-data with the field `images` repeated: one result per image, in order, each the
    /v1/infer answer or that image's own error. The images go through the graph together."""
    return await counted(request, "/v1/infer/batch", services(request).images.infer_batch(request, mode, classifiers))


@router.post("/v1/annotate", response_class=Response, openapi_extra=IMAGE_BODY,
             responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}, **ERRORS})
async def annotate_image(request: Request, mode: Mode | None = None, classifiers: str | None = None) -> Response:
    """Same input as /v1/infer; returns the image as JPEG with boxes and attributes drawn."""
    return await counted(request, "/v1/annotate", services(request).images.annotate_jpeg(request, mode, classifiers))
