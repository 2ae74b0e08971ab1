"""What every router shares: the one error shape, the bearer check as a dependency, the replica's services."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from serve_app.admission import ApiGate
from serve_app.auth import BearerAuth
from serve_app.decoding import InputError
from serve_app.graph import DetectorUnavailable
from serve_app.schema import ErrorResponse

if TYPE_CHECKING:  # the services' own modules import this one
    from serve_app.routes.images import ImageService
    from serve_app.routes.pipeline import PipelineService
    from serve_app.stream_relay import StreamsProxy
    from serve_app.routes.video import VideoService
    from serve_app.telemetry import IngressMetrics

T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


@dataclass(frozen=True)
class Services:
    """What the routes need from the ingress replica, made once at its start (`Ingress.services`)."""

    auth: BearerAuth
    gate: ApiGate  # the API's request slots, apart from stream listeners
    metrics: IngressMetrics
    classifier_names: tuple[str, ...]
    images: ImageService
    video: VideoService
    streams: StreamsProxy
    pipeline: PipelineService


def replica_id() -> str | None:
    """This Serve replica's id (None where the app is served without Serve)."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # served without Serve
        return None


async def served_by(response: Response) -> None:
    """Which ingress replica answered (`x-served-by`): streams live in the streams deployment, so any replica
    answers for any stream, and this says which one did; /v1/pipeline's counts are that replica's own engines'
    in layout ingress."""
    replica = replica_id()
    if replica is not None:
        response.headers["x-served-by"] = replica


def services(request: Request) -> Services:
    """The services of the replica serving this request: its Serve object's (Serve copies the FastAPI app into
    the replica, so the app's own state is not where the replica's constructor can leave them), or the app's
    state when the app is served without Serve."""
    found = getattr(request.app.state, "services", None)
    if found is None:
        from ray import serve

        try:
            found = getattr(serve.get_replica_context().servable_object, "services", None)
        except Exception:  # not inside a Serve replica
            found = None
    if found is None:
        raise InputError(503, "not_ready", "the ingress replica is still starting")
    return found


async def bearer(request: Request) -> None:
    """Dependency of every /v1 router: 401 unless the request carries the bearer token (when one is set)."""
    services(request).auth.check(request.headers.get("authorization"))


async def counted(request: Request, route: str, work: Awaitable[T]) -> T:
    """Await `work` once the API gate admits it, counting the answer's status in
    pipeline_requests_total{route, status}."""
    status = 500
    try:
        async with services(request).gate.admit():
            result = await work
        status = 200
        return result
    except asyncio.CancelledError:
        if inspect.iscoroutine(work):
            work.close()  # cancelled at the gate: the work never started (closing a finished one does nothing)
        raise
    except InputError as exc:
        status = exc.status
        raise
    except DetectorUnavailable:
        status = 503
        raise
    finally:
        services(request).metrics.requests.inc(tags={"route": route, "status": str(status)})
