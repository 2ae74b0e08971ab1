"""Reading the request body: the size limit, and a 413 that the client is still there to read."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from serve_app.decoding import InputError
from serve_app.http_input import DRAIN_FACTOR, read_limited

CHUNK = 64 * 1024


def _request(total: int, declared: bool) -> tuple[Request, list[int]]:
    """A Starlette request whose body of `total` bytes arrives in chunks; the list counts bytes read."""
    read = [0]

    async def receive() -> dict:
        size = min(CHUNK, total - read[0])
        read[0] += size
        return {"type": "http.request", "body": b"\0" * size, "more_body": read[0] < total}

    headers = [(b"content-type", b"image/png")] + ([(b"content-length", str(total).encode())] if declared else [])
    scope = {"type": "http", "method": "POST", "path": "/v1/infer", "headers": headers, "query_string": b""}
    return Request(scope, receive), read


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversize_body_is_read_to_its_end_before_the_413(declared: bool) -> None:
    limit = 1 << 20
    request, read = _request(3 * limit, declared)
    with pytest.raises(InputError) as refused:
        asyncio.run(read_limited(request, limit))
    assert refused.value.status == 413
    assert read[0] == 3 * limit  # drained: a client that sends everything before reading gets its answer


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_draining_stops_at_its_bound(declared: bool) -> None:
    limit = 1 << 20
    request, read = _request(10 * DRAIN_FACTOR * limit, declared)
    with pytest.raises(InputError):
        asyncio.run(read_limited(request, limit))
    assert read[0] <= DRAIN_FACTOR * limit + CHUNK  # a huge body is not read to its end


def test_a_body_within_the_limit_is_returned_whole() -> None:
    request, _ = _request(5 * CHUNK + 7, declared=True)
    assert len(asyncio.run(read_limited(request, 1 << 20))) == 5 * CHUNK + 7
