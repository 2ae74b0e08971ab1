"""The FastAPI application the ingress serves: its routers, the one error shape and the OpenAPI document.

Every route lives in a router of serve_app/routes (one per resource); what a route needs from the replica
(the graph, the limits, the metrics, the streams deployment's handle) it gets through `services`, which the
ingress replica sets once at start-up.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.decoding import InputError
from serve_app.graph import DetectorUnavailable
from serve_app.routes import images, pipeline, streams, video
from serve_app.routes.common import error

# FastAPIOffline serves Swagger UI and ReDoc from files in its wheel: /docs works without internet access.
api = FastAPIOffline(
    title="Parallel inference graph",
    description="A detector, then every classifier in parallel on each detected object, merged into one answer.",
    version="0.1.0",
)
for module in (images, video, streams, pipeline):
    api.include_router(module.router)


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


@api.exception_handler(InputError)
async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    response = error(exc.status, exc.code, exc.message)
    if "/v1/streams" in request.url.path:  # (behind a route prefix too)
        await streams.served_by(response)  # refusals too say which ingress replica answered
    return response


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error(422, "invalid_parameter", details)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 and 405 (and any other HTTPException) in the one error shape."""
    response = error(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
    for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
        response.headers[name] = value
    return response


@api.exception_handler(DetectorUnavailable)
async def _detector_unavailable(_: Request, exc: DetectorUnavailable) -> JSONResponse:
    return error(503, "detector_unavailable", str(exc))
