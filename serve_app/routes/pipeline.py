"""GET /v1/pipeline (the running graph) and GET /healthz (200 once every deployment answers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from ray.serve.exceptions import DeploymentUnavailableError

from serve_app.config import PipelineConfig
from serve_app.routes.common import bearer, error, errors, served_by, services
from serve_app.schema import Edge, Health, PipelineDescription

router = APIRouter()


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


class PipelineService:
    def __init__(self, config: PipelineConfig, describers: Mapping[str, Callable[[], Awaitable[Any]]],
                 health: list[Callable[[], Awaitable[None]]], deployments: int, frames: str = "host") -> None:
        """`frames`: where images are decoded and cut (`host`, or the device of the GPU-resident path)."""
        self._config = config
        self._frames = frames
        self.layout = config.layout
        self._describers = dict(describers)  # the model deployments (or, in layout ingress, stages), then streams
        self._health = health  # engines held in the ingress replica
        self.deployments = deployments  # the ingress and what it calls

    async def describe_all(self, timeout_s: float) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
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
        described = dict(zip(names, answers))
        classifiers: list[dict[str, Any]] = []
        for name in names:
            if name in ("detector", "streams"):
                continue
            answer = described[name]  # the shared `classifiers` deployment answers for all of them
            classifiers.extend(answer if isinstance(answer, list) else [answer])
        return described["detector"], classifiers, described.get("streams")

    def description(self, detector: dict[str, Any], classifiers: list[dict[str, Any]],
                    streams: dict[str, Any] | None = None) -> PipelineDescription:
        limits = self._config.ingress
        return PipelineDescription(
            mode=limits.mode,
            layout=self._config.layout,
            detector=detector,
            classifiers=classifiers,
            edges=[Edge(parent=p, child=c, labels=labels) for p, c, labels in self._config.edges()],
            limits={"max_body_bytes": limits.max_body_bytes, "max_image_pixels": limits.max_image_pixels,
                    "max_batch_images": limits.max_batch_images},
            frames=self._frames,
            streams=streams,
        )


@router.get("/v1/pipeline", response_model=PipelineDescription, responses=errors(401, 503),
            dependencies=[Depends(bearer), Depends(served_by)])
async def pipeline(request: Request) -> PipelineDescription | JSONResponse:
    """The running graph: the detector and each classifier with its filters, backend and device."""
    service = services(request).pipeline
    try:
        async with services(request).gate.admit():
            detector, classifiers, streams = await service.describe_all(10.0)
    except NotReady as exc:  # a deployment is down or still starting
        return error(503, "pipeline_unavailable", str(exc))
    return service.description(detector, classifiers, streams)


@router.get("/healthz", response_model=Health, responses=errors(503))
async def healthz(request: Request) -> JSONResponse:
    """200 once every deployment answers and the API admits requests; 503 naming what does not (a deployment
    still starting or failed, or every API slot busy)."""
    service = services(request).pipeline
    saturated = await services(request).gate.saturated(5.0)
    if saturated is not None:
        return error(503, "saturated", saturated)
    try:
        await service.describe_all(5.0)
    except NotReady as exc:
        return error(503, "not_ready", str(exc))
    return JSONResponse({"status": "ok", "layout": service.layout, "deployments": service.deployments})
