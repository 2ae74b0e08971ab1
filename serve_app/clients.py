"""How the graph reaches a model stage: through a Serve handle, or in this very process.

The graph only needs `await detector.detect(frame)` and `await classifier.classify(crops)`. Remote
clients add what a network hop needs (cancel the replica's work when the caller gives up, one
retry when a classifier replica dies under the call); a stage held in the ingress (layout `ingress`)
is its own client: `DetectorStage` and `ClassifierStage` have the same two methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from deployments.results import ClassifierResult, DetectorResult, StageFailed, StageFailure

logger = logging.getLogger("ray.serve")


def payload_bytes(value: Any) -> int:
    """The bytes a call's arguments carry: raw buffers and arrays counted, containers summed, the rest nothing."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


class Routed:
    """One deployment's handle in both of Serve's transports, chosen per call by what the call carries.

    By value (`_by_reference=False`), Ray Serve 2.60 pickles a call over the callee replica's gRPC server: the
    fastest for small payloads, but its messages are capped (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, 4 MiB
    unless raised: a raw 1080p frame is 6.2 MB). By reference, the arguments go through Ray's object store,
    which costs more for a few KB and far less for megabytes (bench/transport.py, docs/benchmarks.md). A call
    whose arguments carry more than `above_bytes` goes by reference (0: always; None: never)."""

    def __init__(self, handle: Any, above_bytes: int | None) -> None:  # ray.serve.handle.DeploymentHandle
        self._by_value = handle.options(_by_reference=False)
        self._by_reference = handle.options(_by_reference=True)
        self._above = above_bytes

    def handle_for(self, *args: Any) -> Any:
        if self._above is None:
            return self._by_value
        return self._by_reference if payload_bytes(args) > self._above else self._by_value

    def call(self, method: str, *args: Any) -> Any:
        """`handle.<method>.remote(*args)` in the transport that suits the arguments: a DeploymentResponse."""
        return getattr(self.handle_for(*args), method).remote(*args)

    def method(self, name: str) -> Any:
        """For calls without a payload (describe): the by-value handle's method."""
        return getattr(self._by_value, name)


class DetectorClient(Protocol):
    async def detect(self, image: np.ndarray | bytes, source: Hashable | None = None) -> DetectorResult:
        """`source`: the live stream the frame is of, for a detector that batches by stream (the streams'
        muxer); the others take frames as they come and leave it."""


class ClassifierClient(Protocol):
    async def classify(self, crops: np.ndarray) -> ClassifierResult: ...


async def awaited(response: Any) -> Any:
    """Await a DeploymentResponse; if the caller is cancelled (a deadline), cancel the replica's work too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class RemoteDetector:
    """The detector deployment, or (`method="detect_stage"`) the ingress that holds the detector (layout
    ingress, seen from the streams deployment)."""

    def __init__(self, handle: Routed, method: str = "detect") -> None:
        self._handle = handle
        self._method = method

    async def detect(self, image: np.ndarray | bytes, source: Hashable | None = None) -> DetectorResult:
        return await awaited(self._handle.call(self._method, image))

    async def detect_many(self, images: list[np.ndarray | bytes]) -> list[DetectorResult]:
        """Several frames in one call (`<method>_many`): the stream muxer's batches."""
        return await awaited(self._handle.call(f"{self._method}_many", images))


async def _retried_once(name: str, call: Callable[[], Any]) -> tuple[Any, int]:
    """Await `call()`; once more if the replica died under it (Serve routes the retry to a live replica,
    or holds it until the replacement is up, within the caller's deadline). Returns the answer and the
    number of calls it took."""
    try:
        return await awaited(call()), 1
    except (RayActorError, ActorUnavailableError) as exc:
        logger.warning("%s: replica lost (%s); retrying once", name, type(exc).__name__)
    return await awaited(call()), 2


class RemoteClassifier:
    """A classifier in a deployment of its own (layout `separate`), or (`by_name`) one of the classifiers the
    ingress holds (layout ingress, seen from the streams deployment)."""

    def __init__(self, handle: Routed, name: str, by_name: bool = False) -> None:
        self._name = name
        if by_name:
            self._call = lambda crops: handle.call("classify_stage", name, crops)
        else:
            self._call = lambda crops: handle.call("classify", crops)

    async def classify(self, crops: np.ndarray) -> ClassifierResult:
        result, attempts = await _retried_once(f"classifier {self._name}", lambda: self._call(crops))
        return result if attempts == 1 else replace(result, attempts=attempts)


class PooledClassifiers:
    """The classifiers of the shared `classifiers` deployment (layout `colocated`).

    Calls made in the same event-loop tick (one request's fan-out, or several requests') travel as one
    `classify_many` call: one hop instead of one per classifier. Each caller still waits, times out and
    fails on its own; `client(name)` gives the per-classifier view the graph uses."""

    def __init__(self, handle: Routed) -> None:
        self._handle = handle
        self._batch: list[tuple[str, np.ndarray, asyncio.Future[ClassifierResult]]] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def client(self, name: str) -> ClassifierClient:
        return _PooledClassifier(self, name)

    async def classify(self, name: str, crops: np.ndarray) -> ClassifierResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ClassifierResult] = loop.create_future()
        if self._batch is None:
            self._batch = []
            loop.call_soon(self._flush)
        self._batch.append((name, crops, future))
        return await future

    def _flush(self) -> None:
        batch, self._batch = self._batch or [], None
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[str, np.ndarray, asyncio.Future[ClassifierResult]]]) -> None:
        live = [entry for entry in batch if not entry[2].done()]  # callers that timed out already are dropped
        if not live:
            return
        calls = [(name, crops) for name, crops, _ in live]
        try:
            answers, attempts = await _retried_once("classifiers", lambda: self._handle.call("classify_many", calls))
        except Exception as exc:
            for _, _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), answer in zip(live, answers):
            if future.done():
                continue
            if isinstance(answer, StageFailure):
                future.set_exception(StageFailed(answer))
            else:
                future.set_result(answer if attempts == 1 else replace(answer, attempts=attempts))


class _PooledClassifier:
    def __init__(self, pool: PooledClassifiers, name: str) -> None:
        self._pool = pool
        self._name = name

    async def classify(self, crops: np.ndarray) -> ClassifierResult:
        return await self._pool.classify(self._name, crops)
