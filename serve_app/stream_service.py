"""The `streams` deployment: it owns every live stream of the application.

One replica (so `max_streams` counts once, and any ingress replica finds every stream). It runs the streams
itself (serve_app/stream_host.py): it reads the sources and runs the detector and the classifiers through handles
(the graph code the ingress uses; in layout `ingress`, through the ingress's own handle, which holds the models),
tracks, and keeps each stream's listeners. Or, with `ingress.streams.workers.count` above 0, it starts that many
stream workers, each holding the models and a share of the streams, and answers for them
(serve_app/stream_workers.py). The ingress forwards /v1/streams* here and relays /events with a streaming handle
call.

When this replica stops, its streams end: a graceful stop gives every listener the stream's summary; if the
replica dies instead, the ingress ends each listener's response with a summary line of state `lost` naming
the reason, and the streams are gone (a new replica starts empty, with new workers).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray import serve

from serve_app.config import PipelineConfig
from serve_app.stream_host import StreamHost
from serve_app.stream_workers import WorkerRouter, WorkerSpawner
from serve_app.streams import StreamRefusal
from serve_app.wiring import Wiring, remote, through_ingress

logger = logging.getLogger("ray.serve")


@serve.deployment(name="streams")
class Streams:
    def __init__(self, config: PipelineConfig, detector: Any = None, classifiers: dict[str, Any] | None = None,
                 pool: Any = None, workers: Mapping[str, Any] | None = None) -> None:
        """The model deployments' handles (layouts separate and colocated; none in layout ingress), or `workers`:
        the stream workers' devices (by stage), GPU share and environment (ingress.streams.workers)."""
        self._service: StreamHost | WorkerRouter
        if workers is not None:
            app = serve.get_replica_context().app_name
            spawner = WorkerSpawner(config, workers["devices"], workers["gpu_share"], f"{app}-stream-worker",
                                    workers["environment"])
            self._service = WorkerRouter(config, spawner)
            return
        gpu_share = config.ingress.streams.deployment.num_gpus

        def wiring() -> Wiring:
            if detector is not None:
                return remote(config, detector, classifiers or {}, pool)
            # layout ingress: the models are in the ingress replicas (found by name: binding it would make a cycle)
            app = serve.get_replica_context().app_name
            return through_ingress(config, serve.get_deployment_handle("ingress", app_name=app))

        self._service = StreamHost(config, wiring, gpu_share)
        if detector is not None:
            self._service.prepare()

    async def start(self, source: str) -> dict[str, Any] | StreamRefusal:
        return await self._service.start(source)

    async def list(self) -> list[dict[str, Any]]:
        return await self._service.list()

    async def get(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        return await self._service.get(stream_id)

    async def stop(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        return await self._service.stop(stream_id)

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """For a streaming handle call: first the stream's description (or why not: unknown, too many listeners),
        then its records. The listener counts until this generator ends, however it ends."""
        async for item in self._service.events(stream_id):
            yield item

    async def holder(self, stream_id: str) -> Any | None:
        """The stream worker holding the stream (an actor handle), for an ingress to follow its events from it;
        None where the streams run here or the stream is unknown or lost (then `events` answers)."""
        return self._service.holder(stream_id) if isinstance(self._service, WorkerRouter) else None

    async def feed(self) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]] | StreamRefusal]:
        """Every stream's records (GET /v1/events) where the streams run here, for a streaming handle call:
        first the running streams (or why not), then lists of records. With stream workers the ingress follows
        each worker's own feed (`holders`)."""
        if isinstance(self._service, WorkerRouter):
            yield StreamRefusal(503, "streams_unavailable", "the streams run in stream workers: follow their feeds")
            return
        async for item in self._service.feed():
            yield item

    async def holders(self) -> list[tuple[str, Any]] | None:
        """The live stream workers (name, actor handle), for a listener of every stream to follow each one's feed;
        None where the streams run here (then `feed` answers)."""
        return self._service.holders() if isinstance(self._service, WorkerRouter) else None

    async def video(self, data: bytes, every: int) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """/v1/video on a stream worker (ingress.streams.workers.videos), for a streaming handle call: first the
        opened video (or why not), then its records."""
        if not isinstance(self._service, WorkerRouter):
            yield StreamRefusal(503, "streams_unavailable", "this application has no stream workers")
            return
        async for item in self._service.video(data, every):
            yield item

    async def describe(self) -> dict[str, Any]:
        if isinstance(self._service, WorkerRouter):
            return await self._service.describe()
        return self._service.describe()

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: end the streams (their listeners get the summary)."""
        await self._service.close()
