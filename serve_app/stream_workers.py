"""Stream workers (`ingress.streams.workers`): processes that each hold the models and run a share of the live
streams, as DeepStream runs a pipeline per process. A frame never leaves the process that decoded it (reader,
muxer, detector, tracker and classifiers in one place), and the streams' host work spreads over as many
processes, and nodes, as there are workers.

- `StreamWorker`: one worker, a Ray actor (`ray.remote` in `spawn_workers`): a `StreamHost` whose graph holds
  the models (serve_app/wiring.py `in_process`), each stage on this worker's device.
- `WorkerRouter`: the streams deployment's side. It places a new stream on the worker with the fewest, counts
  `max_streams` once for all of them, and answers every call for a stream from the worker that holds it, so any
  ingress replica answers for any stream. The workers are its children: they stop with it. A worker that dies
  ends only its own streams: they answer with state `lost` naming the worker, and their listeners get that
  summary; the other workers' streams go on, and a new worker takes the lost one's place.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from serve_app.config import PipelineConfig
from serve_app.stream_host import StreamHost
from serve_app.streams import StreamRefusal
from serve_app.wiring import in_process

logger = logging.getLogger("ray.serve")

_GONE = (RayActorError, ActorUnavailableError)
_NO_WORKER = StreamRefusal(503, "streams_unavailable", "every stream worker has stopped")
_KEEP_OWNERS = 4096  # stream ids whose worker is remembered (running ones are never dropped)


class StreamWorker:
    """One worker process: its streams and its own copy of the models, on `devices` (by stage name)."""

    def __init__(self, config: PipelineConfig, devices: Mapping[str, str], gpu_share: float) -> None:
        self._host = StreamHost(config, lambda: in_process(config, devices), gpu_share)
        self._host.prepare()  # the models load now: a worker that cannot hold them fails the deployment's start

    async def ready(self) -> dict[str, Any]:
        """Where this worker runs."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "pid": os.getpid()}

    async def start(self, source: str) -> dict[str, Any] | StreamRefusal:
        return await self._host.start(source)

    async def running(self) -> list[str]:
        return self._host.running()

    async def list(self) -> list[dict[str, Any]]:
        return await self._host.list()

    async def get(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        return await self._host.get(stream_id)

    async def stop(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        return await self._host.stop(stream_id)

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        async for item in self._host.events(stream_id):
            yield item

    async def feed(self) -> AsyncIterator[dict[str, Any] | list[dict[str, Any]] | StreamRefusal]:
        async for item in self._host.feed():
            yield item

    async def video(self, data: bytes, every: int) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        async for item in self._host.video(data, every):
            yield item

    async def describe(self) -> dict[str, Any]:
        return self._host.describe()

    async def close(self) -> None:
        await self._host.close()


@dataclass
class _Worker:
    name: str
    handle: Any
    index: int = 0  # its place among the workers (a replacement takes the place of the one it replaces)
    node_id: str = ""
    streams: set[str] = field(default_factory=set)  # those holding a slot under max_streams, as last known
    opening: int = 0
    videos: int = 0  # /v1/video uploads it is processing
    gone: str | None = None  # why it is lost

    @property
    def load(self) -> int:
        return len(self.streams) + self.opening + self.videos


class WorkerSpawner:
    """Starts stream workers (named `<prefix>-<i>`, a replacement `<prefix>-<i>.<n>`; children of the calling
    process, so they stop with it), each on its share of a GPU and with the application's environment."""

    def __init__(self, config: PipelineConfig, devices: Mapping[str, str], gpu_share: float, prefix: str,
                 environment: Mapping[str, str]) -> None:
        cfg = config.ingress.streams.workers
        self.count = cfg.count
        self._args = (config, dict(devices), gpu_share)
        self._prefix = prefix
        self._starts = 0
        self._options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": gpu_share, "max_concurrency": 10_000,
                                         "max_restarts": 0}
        if cfg.resources:
            self._options["resources"] = dict(cfg.resources)
        if cfg.spread:
            self._options["scheduling_strategy"] = "SPREAD"
        if environment:
            self._options["runtime_env"] = {"env_vars": dict(environment)}
        self._actor = ray.remote(StreamWorker)

    def start(self, index: int) -> _Worker:
        """A worker for place `index`, starting (not yet waited for)."""
        name = f"{self._prefix}-{index}" + (f".{self._starts}" if self._starts >= self.count else "")
        self._starts += 1
        return _Worker(name, self._actor.options(name=name, **self._options).remote(*self._args), index)

    def start_all(self) -> list[_Worker]:
        """Every worker, waited for until each holds its models; one that cannot start fails this, saying why."""
        workers = [self.start(i) for i in range(self.count)]
        for worker, where in zip(workers, ray.get([w.handle.ready.remote() for w in workers])):
            _placed(worker, where)
        return workers


def _placed(worker: _Worker, where: dict[str, Any]) -> None:
    worker.node_id = where["node_id"]
    logger.info("stream worker %s runs on node %s (pid %d)", worker.name, worker.node_id[:12], where["pid"])


class WorkerRouter:
    """The streams API over the workers (the same methods as `StreamHost`)."""

    def __init__(self, config: PipelineConfig, spawner: WorkerSpawner) -> None:
        self._max = config.ingress.streams.max_streams
        self._spawner = spawner
        self._workers = spawner.start_all()  # one a place; a lost one is replaced in its place
        self._gone: list[_Worker] = []  # the workers lost, latest last (the last 16 are described)
        self.relayed = 0  # records relayed from workers here (/v1/video's; a listener follows its worker itself)
        self._owner: OrderedDict[str, _Worker] = OrderedDict()  # stream id -> its worker
        self._started: dict[str, dict[str, Any]] = {}  # stream id -> its description at the start (for `lost`)
        self._replacing: set[asyncio.Task[None]] = set()
        self._closing = False

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.gone is None]

    def _taken(self) -> int:
        return sum(w.load for w in self._live())

    def _lose(self, worker: _Worker, exc: BaseException) -> None:
        if worker.gone is None:
            worker.gone = f"stream worker {worker.name} stopped ({type(exc).__name__}); its streams ended"
            logger.warning("%s: %s", worker.gone, str(exc).splitlines()[0][:200] if str(exc) else "")
            self._gone = [*self._gone, worker][-16:]
            if not self._closing:  # a new worker takes its place (Serve restarts a replica the same way)
                task = asyncio.ensure_future(self._replace(worker))
                self._replacing.add(task)
                task.add_done_callback(self._replacing.discard)

    async def _replace(self, lost: _Worker) -> None:
        new = self._spawner.start(lost.index)
        try:
            _placed(new, await new.handle.ready.remote())
        except Exception as exc:  # noqa: BLE001 - the place stays empty; the other workers take the streams
            logger.warning("stream worker %s could not replace %s: %s", new.name, lost.name,
                           str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return
        if not self._closing and self._workers[lost.index] is lost:
            self._workers[lost.index] = new
            logger.info("stream worker %s took the place of %s", new.name, lost.name)

    def _lost(self, stream_id: str, worker: _Worker) -> dict[str, Any]:
        return {**self._started.get(stream_id, {"id": stream_id}), "state": "lost", "error": worker.gone,
                "worker": worker.name}

    async def _ask_live(self, method: str) -> list[tuple[_Worker, Any]]:
        """`method` of every live worker at once, with its answer; a worker that is gone is marked lost, left out."""
        live = self._live()
        answers = await asyncio.gather(*(getattr(w.handle, method).remote() for w in live), return_exceptions=True)
        out: list[tuple[_Worker, Any]] = []
        for worker, answer in zip(live, answers):
            if isinstance(answer, BaseException):
                self._lose(worker, answer)
            else:
                out.append((worker, answer))
        return out

    async def _refresh(self) -> None:
        """Forget the streams that ended on their own (the workers free their slots without telling)."""
        for worker, running in await self._ask_live("running"):
            worker.streams &= set(running)

    async def start(self, source: str) -> dict[str, Any] | StreamRefusal:
        if self._taken() >= self._max:
            await self._refresh()
        if self._taken() >= self._max:  # checked and taken with nothing awaited between: starts cannot pass it together
            return StreamRefusal(429, "too_many_streams", f"{self._taken()} streams are running or starting; the limit "
                                 f"is {self._max} (ingress.streams.max_streams)")
        worker = self._least_loaded()
        if worker is None:
            return _NO_WORKER
        worker.opening += 1
        ref = worker.handle.start.remote(source)
        answer_of = asyncio.wrap_future(ref.future())
        try:
            answer = await asyncio.shield(answer_of)
        except asyncio.CancelledError:  # the client went away: abort the open; a stream that started anyway stops
            ray.cancel(ref)
            answer_of.add_done_callback(lambda done: self._abandoned(worker, done))
            raise
        except _GONE as exc:
            self._lose(worker, exc)
            return StreamRefusal(503, "streams_unavailable", worker.gone or "")
        finally:
            worker.opening -= 1
        if isinstance(answer, dict):
            self._own(answer["id"], worker, answer)
            return {**answer, "worker": worker.name}
        return answer

    def _own(self, stream_id: str, worker: _Worker, described: dict[str, Any]) -> None:
        worker.streams.add(stream_id)
        self._owner[stream_id], self._started[stream_id] = worker, described
        while len(self._owner) > _KEEP_OWNERS:  # forget the oldest ended stream
            old = next((i for i, w in self._owner.items() if i not in w.streams), None)
            if old is None:
                break
            self._owner.pop(old)
            self._started.pop(old, None)

    def _abandoned(self, worker: _Worker, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None or not isinstance(done.result(), dict):
            return
        stream_id = done.result()["id"]  # nobody knows its id: it must not run on, holding a slot
        self._own(stream_id, worker, done.result())
        worker.handle.stop.remote(stream_id)

    async def _ask(self, stream_id: str, method: str) -> dict[str, Any] | StreamRefusal:
        worker = self._owner.get(stream_id)
        if worker is None:
            return StreamRefusal(404, "unknown_stream", f"no stream {stream_id!r} here")
        if worker.gone is None:
            try:
                answer = await getattr(worker.handle, method).remote(stream_id)
            except _GONE as exc:
                self._lose(worker, exc)
            else:
                return {**answer, "worker": worker.name} if isinstance(answer, dict) else answer
        return self._lost(stream_id, worker)

    async def get(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        return await self._ask(stream_id, "get")

    async def stop(self, stream_id: str) -> dict[str, Any] | StreamRefusal:
        return await self._ask(stream_id, "stop")

    async def list(self) -> list[dict[str, Any]]:
        out = [{**d, "worker": worker.name} for worker, listed in await self._ask_live("list") for d in listed]
        return out + [self._lost(i, w) for i, w in self._owner.items() if w.gone is not None and i in w.streams]

    async def events(self, stream_id: str) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """The worker's own events call, relayed; if the worker goes away mid-way, a summary of state `lost`."""
        worker = self._owner.get(stream_id)
        if worker is None:
            yield StreamRefusal(404, "unknown_stream", f"no stream {stream_id!r} here")
            return
        if worker.gone is not None:
            yield self._lost(stream_id, worker)
            yield {"summary": self._lost(stream_id, worker)}
            return
        async for item in self._relayed(worker, worker.handle.events.remote(stream_id),
                                        lambda: {"summary": self._lost(stream_id, worker)}):
            yield item

    def holder(self, stream_id: str) -> Any | None:
        """The actor handle of the live worker that holds the stream, so that its listener's ingress follows the
        records from the worker itself (one hop fewer); None: unknown here, or its worker is lost."""
        worker = self._owner.get(stream_id)
        return worker.handle if worker is not None and worker.gone is None else None

    def holders(self) -> list[tuple[str, Any]]:
        """Every live worker's name and actor handle, for a listener of all streams (GET /v1/events) to
        follow each worker's feed itself."""
        return [(w.name, w.handle) for w in self._live()]

    async def video(self, data: bytes, every: int) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """/v1/video on the least-loaded worker, its records relayed; if it goes away mid-way, an error line."""
        worker = self._least_loaded()
        if worker is None:
            yield _NO_WORKER
            return
        worker.videos += 1
        try:
            async for item in self._relayed(worker, worker.handle.video.remote(data, every),
                                            lambda: {"error": {"code": "worker_lost", "message": worker.gone}}):
                yield item
        finally:
            worker.videos -= 1

    def _least_loaded(self) -> _Worker | None:
        return min(self._live(), key=lambda w: w.load, default=None)

    async def _relayed(self, worker: _Worker, generator: Any,
                       lost: Callable[[], dict[str, Any]]) -> AsyncIterator[dict[str, Any] | StreamRefusal]:
        """A worker's streaming call, item by item; if the worker goes away mid-way, it is marked lost and `lost()`
        is the last item. A caller that leaves cancels the worker's side (a listener's slot, a video's reading)."""
        try:
            async for ref in generator:
                item = await ref
                self.relayed += 1
                yield item
        except _GONE as exc:
            self._lose(worker, exc)
            yield lost()
        finally:
            ray.cancel(generator)

    async def describe(self) -> dict[str, Any]:
        rows = [{"name": worker.name, "node_id": worker.node_id, "state": "running", **answer}
                for worker, answer in await self._ask_live("describe")]
        rows += [{"name": w.name, "node_id": w.node_id, "state": "lost", "error": w.gone} for w in self._gone]
        running = [r for r in rows if r["state"] == "running"]
        return {"streams": sum(r["streams"] for r in running), "max_streams": self._max,
                "opening": sum(r["opening"] for r in running), "listeners": sum(r["listeners"] for r in running),
                "relayed": self.relayed,
                "workers": rows}

    def running(self) -> list[str]:
        return [i for w in self._live() for i in w.streams]

    async def close(self) -> None:
        """End every worker's streams (their listeners get the summary); the workers stop with this process."""
        self._closing = True
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*(w.handle.close.remote() for w in self._live()), return_exceptions=True)
