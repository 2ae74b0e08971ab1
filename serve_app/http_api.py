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


def _classifier_names() -> list[str] | None:
    """The configured classifiers, where the document is made inside the ingress replica."""
    from ray import serve

    try:
        return list(serve.get_replica_context().servable_object.services.classifier_names)
    except Exception:  # outside a Serve replica: the document says less
        return None


def _openapi() -> dict[str, Any]:
    """FastAPI's document, plus the bearer scheme of the /v1 routes (Swagger's Authorize button) and, inside the
    replica, the configured classifier names as the form of `?classifiers=`."""
    if api.openapi_schema is None:
        document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        document.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        names = _classifier_names()
        for path, operations in document["paths"].items():
            for operation in operations.values():
                if path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}, {}]  # {}: when ingress.auth_token_env is unset
                for parameter in operation.get("parameters", []):
                    if parameter["name"] == "classifiers" and names:
                        one = "|".join(names)
                        parameter["schema"] = {"type": "string", "pattern": f"^(({one})(,({one}))*)?$"}
                        parameter["description"] = (f"comma-separated classifiers to run (and those they depend on), of "
                                                     f"{', '.join(names)}; empty: none (the detector alone)")
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


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path (Starlette's 405 names only the first route's)."""
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    path = path[len(root):] if root and path.startswith(root) else path
    routes = [r for module in (images, video, streams, pipeline) for r in module.router.routes]
    routes += [r for r in api.routes if hasattr(r, "path_regex")]
    methods = {m for r in routes if r.path_regex.match(path) for m in (getattr(r, "methods", None) or ())}
    return sorted(methods)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 and 405 (and any other HTTPException) in the one error shape."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return error(422, "invalid_body", "the body is not valid JSON (it must be UTF-8)")
    response = error(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
    for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
        response.headers[name] = value
    if exc.status_code == 405:
        response.headers["allow"] = ", ".join(_allowed_methods(request))
    return response


@api.exception_handler(DetectorUnavailable)
async def _detector_unavailable(_: Request, exc: DetectorUnavailable) -> JSONResponse:
    return error(503, "detector_unavailable", str(exc))
