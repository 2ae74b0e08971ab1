"""Bad input gets a clear 4xx JSON error and never takes a replica down."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import httpx
import pytest

from tests.images import ASTRONAUT

LIMIT = 20 * 1024 * 1024  # ingress.max_body_bytes in serve_config.yaml


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height, then no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * size
        sent += size


CASES = [
    pytest.param({"content": b""}, 400, "empty_body", id="empty body"),
    pytest.param({"content": b"hello, I am not an image"}, 400, "undecodable_image", id="text as image"),
    pytest.param({"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}, 400, "undecodable_image", id="png magic over garbage"),
    pytest.param({"content": ASTRONAUT.read_bytes()[:3000]}, 400, "undecodable_image", id="truncated png"),
    pytest.param({"content": png_header(100_000, 100_000)}, 413, "image_too_large", id="decompression bomb"),
    pytest.param({"content": b"\0" * (LIMIT + 1)}, 413, "body_too_large", id="body over limit"),
    pytest.param({"content": _chunks(LIMIT + (1 << 20))}, 413, "body_too_large", id="chunked body over limit"),
    pytest.param(
        {"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported_media_type", id="json"
    ),
    pytest.param(
        {"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type", id="text/plain"
    ),
    pytest.param(
        {"content": ASTRONAUT.read_bytes(), "params": {"mode": "sideways"}}, 422, "invalid_parameter", id="bad mode"
    ),
    pytest.param(
        {"files": {"picture": ("a.png", ASTRONAUT.read_bytes(), "image/png")}},
        422,
        "missing_image_field",
        id="multipart without image field",
    ),
    pytest.param(
        {"content": b"--xyz\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
        400,
        "bad_multipart",
        id="malformed multipart",
    ),
]


@pytest.mark.parametrize(("request_kwargs", "status", "code"), CASES)
def test_bad_request_gets_a_clear_error_and_the_service_survives(
    client: httpx.Client, request_kwargs: dict, status: int, code: str
) -> None:
    kwargs = dict(request_kwargs)
    kwargs.setdefault("headers", {"Content-Type": "image/png"} if "files" not in kwargs else {})
    response = client.post("/v1/infer", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in response.text and "/work/" not in response.text

    good = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers={"Content-Type": "image/png"})
    assert good.status_code == 200
    assert len(good.json()["objects"]) == 1


def test_annotate_refuses_bad_input_the_same_way(client: httpx.Client) -> None:
    response = client.post("/v1/annotate", content=b"not an image", headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "undecodable_image"
