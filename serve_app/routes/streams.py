"""/v1/streams* and /v1/events: forwarded to the `streams` deployment, which holds every live stream of the
application, so that any ingress replica answers for any stream; the records are relayed by
serve_app/stream_relay.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from serve_app.routes.common import bearer, errors, replica_id, served_by, services
from serve_app.routes.video import ndjson
from serve_app.schema import StreamInfo, StreamList, StreamRequest

router = APIRouter(dependencies=[Depends(bearer), Depends(served_by)])


@router.post("/v1/streams", status_code=201, response_model=StreamInfo, responses=errors(401, 404, 422, 429, 503))
async def start_stream(request: Request, body: StreamRequest) -> StreamInfo:
    """Start a live stream from an rtsp/http(s) URL (public addresses only, unless ingress.streams.allowed_hosts
    lists it) or a file in the media directory (played at its frame rate). Its records: /v1/streams/{id}/events."""
    return StreamInfo(**await services(request).streams.call("start", body.source))


@router.get("/v1/streams", response_model=StreamList, responses=errors(401, 404, 503))
async def list_streams(request: Request) -> StreamList:
    """Every stream of the application (running, and those ended in the last `keep_ended_s`)."""
    return StreamList(streams=[StreamInfo(**s) for s in await services(request).streams.call("list")])


@router.get("/v1/events", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}, **errors(401, 404, 429, 503)})
async def all_stream_events(request: Request) -> StreamingResponse:
    """Every stream's per-frame records on one connection, as DeepStream's message broker gives one consumer all
    its sources' metadata: first `{"streams": [...]}` (those running now), then each record as /v1/streams/{id}/events
    gives it, with `stream` (the stream's id), and each stream's summary as it ends. The records that are ready
    together come in one chunk: far less work a record than a listener per stream. A reader that falls behind
    loses the oldest lines (a `{"lost": n}` line says how many), never a stream."""
    items = await services(request).streams.feed()

    async def lines() -> AsyncIterator[bytes]:
        async for item in items:
            yield b"".join(map(ndjson, item)) if isinstance(item, list) else ndjson(item)

    replica = replica_id()
    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"x-served-by": replica} if replica else None)


@router.get("/v1/streams/{stream_id}", response_model=StreamInfo, responses=errors(401, 404, 503))
async def get_stream(request: Request, stream_id: str) -> StreamInfo:
    return StreamInfo(**await services(request).streams.call("get", stream_id))


@router.get("/v1/streams/{stream_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}, **errors(401, 404, 503)})
async def stream_events(request: Request, stream_id: str) -> StreamingResponse:
    """The stream's per-frame records as they happen (the same lines as /v1/video), until it ends with its
    summary; a reader that falls behind loses its oldest lines, never the stream."""
    records = await services(request).streams.events(stream_id)

    async def lines() -> AsyncIterator[bytes]:
        async for record in records:
            yield ndjson(record)

    replica = replica_id()  # a response returned as it is does not take the dependency's headers
    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"x-served-by": replica} if replica else None)


@router.delete("/v1/streams/{stream_id}", response_model=StreamInfo, responses=errors(401, 404, 503))
async def stop_stream(request: Request, stream_id: str) -> StreamInfo:
    """Stop a stream; its listeners get the summary and their responses end. Idempotent: a stream that has
    already stopped or ended answers with its final state (while it is kept)."""
    return StreamInfo(**await services(request).streams.call("stop", stream_id))
