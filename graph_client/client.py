"""Sync and async clients of the HTTP API: one request builder and one answer reader shared by both."""

from __future__ import annotations

import asyncio
import mimetypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

Image = bytes | str | Path  # the image's bytes, or a file to read them from
TOKEN_ENV = "PIPELINE_API_TOKEN"


class GraphError(Exception):
    """An error answer of the API (or a transport failure, with status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _read(image: Image) -> tuple[bytes, str, str]:
    """(bytes, content type, file name) of an image given as bytes or a path."""
    if isinstance(image, bytes):
        return image, "application/octet-stream", "image"
    path = Path(image)
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return path.read_bytes(), media if media.startswith("image/") else "application/octet-stream", path.name


def _params(classifiers: Sequence[str] | None, mode: str | None) -> dict[str, str]:
    params = {}
    if classifiers is not None:
        params["classifiers"] = ",".join(classifiers)
    if mode is not None:
        params["mode"] = mode
    return params


def _error_of(response: httpx.Response) -> GraphError:
    try:
        error = response.json()["error"]
        return GraphError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return GraphError(response.status_code, "http_error", response.text[:200] or response.reason_phrase)


@dataclass(frozen=True)
class Retry:
    """503 answers (a deployment starting or busy) are retried with exponential backoff."""

    attempts: int = 4
    backoff_s: float = 0.5

    def delay(self, attempt: int, response: httpx.Response) -> float:
        after = response.headers.get("retry-after", "")
        return float(after) if after.isdigit() else self.backoff_s * 2**attempt


def _headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


class GraphClient:
    """Blocking client. `base_url` is where `serve run` answers (default http://127.0.0.1:8000)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 60.0,
                 retry: Retry = Retry()) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(token), timeout=timeout_s)
        self._retry = retry

    def __enter__(self) -> GraphClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self._retry.attempts):
            response = self._http.request(method, url, **kwargs)
            if response.status_code != 503 or attempt == self._retry.attempts - 1:
                break
            time.sleep(self._retry.delay(attempt, response))
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    def infer(self, image: Image, classifiers: Sequence[str] | None = None, mode: str | None = None) -> dict[str, Any]:
        """The answer of POST /v1/infer: objects with their attributes, errors, timings."""
        data, media, _ = _read(image)
        return self._send("POST", "/v1/infer", content=data, headers={"Content-Type": media},
                          params=_params(classifiers, mode)).json()

    def annotate(self, image: Image, classifiers: Sequence[str] | None = None) -> bytes:
        """The image as JPEG with boxes and attributes drawn (POST /v1/annotate)."""
        data, media, _ = _read(image)
        return self._send("POST", "/v1/annotate", content=data, headers={"Content-Type": media},
                          params=_params(classifiers, None)).content

    def infer_batch(self, images: Sequence[Image], classifiers: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """POST /v1/infer/batch: one result per image, in order; an image that failed has {"error": ...}."""
        files = [("images", (name, data, media)) for data, media, name in map(_read, images)]
        return self._send("POST", "/v1/infer/batch", files=files, params=_params(classifiers, None)).json()["results"]

    def pipeline(self) -> dict[str, Any]:
        return self._send("GET", "/v1/pipeline").json()

    def health(self) -> dict[str, Any]:
        return self._send("GET", "/healthz").json()


class AsyncGraphClient:
    """The same as GraphClient for asyncio code; many requests can be in flight at once."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 60.0,
                 retry: Retry = Retry(), max_connections: int = 32) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(token), timeout=timeout_s, limits=limits)
        self._retry = retry

    async def __aenter__(self) -> AsyncGraphClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self._retry.attempts):
            response = await self._http.request(method, url, **kwargs)
            if response.status_code != 503 or attempt == self._retry.attempts - 1:
                break
            await asyncio.sleep(self._retry.delay(attempt, response))
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    async def infer(self, image: Image, classifiers: Sequence[str] | None = None,
                    mode: str | None = None) -> dict[str, Any]:
        data, media, _ = _read(image)
        return (await self._send("POST", "/v1/infer", content=data, headers={"Content-Type": media},
                                 params=_params(classifiers, mode))).json()

    async def annotate(self, image: Image, classifiers: Sequence[str] | None = None) -> bytes:
        data, media, _ = _read(image)
        return (await self._send("POST", "/v1/annotate", content=data, headers={"Content-Type": media},
                                 params=_params(classifiers, None))).content

    async def infer_batch(self, images: Sequence[Image],
                          classifiers: Sequence[str] | None = None) -> list[dict[str, Any]]:
        files = [("images", (name, data, media)) for data, media, name in map(_read, images)]
        response = await self._send("POST", "/v1/infer/batch", files=files, params=_params(classifiers, None))
        return response.json()["results"]

    async def pipeline(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/pipeline")).json()

    async def health(self) -> dict[str, Any]:
        return (await self._send("GET", "/healthz")).json()
