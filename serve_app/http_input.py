"""Read images out of an HTTP request: raw bytes, multipart field `image`, or (batches) `images` repeated; size-limited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serve_app.decoding import InputError

RAW_TYPES = ("application/octet-stream",)
MULTIPART = "multipart/form-data"


# A refused body is still read (and dropped) up to this many times the limit, for at most this long, before the
# 413 goes out: a client that sends the whole body before it reads (urllib, and most with `Connection: close`)
# would otherwise have its connection reset mid-send and never see the answer (nginx's "lingering close").
DRAIN_FACTOR = 4
DRAIN_SECONDS = 5.0


async def _drain(chunks: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop what is left of the body, up to `budget` bytes and DRAIN_SECONDS."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in chunks:
                budget -= len(chunk)
                if budget < 0:
                    return
    except TimeoutError:
        return


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes (after draining
    a bounded rest of it, so that the client is still listening when the 413 comes)."""
    declared = request.headers.get("content-length")
    chunks = request.stream()
    if declared is not None:
        if not declared.strip().isdigit():
            raise InputError(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            if int(declared) <= DRAIN_FACTOR * limit:
                await _drain(chunks, int(declared))
            raise InputError(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit}")
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            await _drain(chunks, DRAIN_FACTOR * limit - total)
            raise InputError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()


async def parse_form(request: Request, body: bytes, max_files: int, batch: bool = False) -> FormData:
    async def replay():  # noqa: ANN202 - async generator of the buffered body
        yield body

    try:
        return await MultiPartParser(request.headers, replay(), max_files=max_files, max_fields=16).parse()
    except MultiPartException as exc:
        if batch and "Too many files" in exc.message:
            raise InputError(413, "too_many_images", f"a batch takes at most {max_files - 1} images") from exc
        raise InputError(400, "bad_multipart", f"malformed multipart body: {exc.message}") from exc


async def file_bytes(item: UploadFile | str, field: str) -> bytes:
    """A multipart part's bytes: it must be a file part (the document says binary); a text field is a 422."""
    if not isinstance(item, UploadFile):
        raise InputError(422, "not_a_file", f"the multipart field {field!r} must be a file (a part with a filename), "
                         "not a text value")
    return await item.read()


async def image_list(request: Request, limit: int, max_images: int) -> list[bytes]:
    """The files of a multipart body's repeated field `images`, in order (POST /v1/infer/batch)."""
    if media_type_of(request) != MULTIPART:
        raise InputError(415, "unsupported_media_type",
                         "a batch is multipart/form-data with the field 'images' repeated, one file each")
    body = await read_limited(request, limit)
    if not body:
        raise InputError(400, "empty_body", "the request body is empty")
    form = await parse_form(request, body, max_images + 1, batch=True)
    items = form.getlist("images")
    if not items:
        raise InputError(422, "missing_images_field", "multipart body has no field named 'images'")
    if len(items) > max_images:
        raise InputError(413, "too_many_images", f"a batch takes at most {max_images} images, got {len(items)}")
    return [await file_bytes(item, "images") for item in items]


async def image_bytes(request: Request, limit: int) -> bytes:
    media = media_type_of(request)
    if not (media.startswith("image/") or media in RAW_TYPES or media == MULTIPART):
        raise InputError(
            415,
            "unsupported_media_type",
            f"Content-Type {media!r} is not accepted; send image/* or application/octet-stream bytes, "
            "or multipart/form-data with the file in field 'image'",
        )
    body = await read_limited(request, limit)
    if media != MULTIPART:
        return body
    if not body:
        raise InputError(400, "empty_body", "the request body is empty")

    form = await parse_form(request, body, max_files=4)
    if not form:
        raise InputError(400, "bad_multipart", "the multipart body holds no complete part")
    item = form.get("image")
    if item is None:
        raise InputError(422, "missing_image_field", "multipart body has no field named 'image'")
    return await file_bytes(item, "image")
