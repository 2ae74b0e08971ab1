"""The composition root: which stages a layout wires, and how the graph reaches them.

- `in_process`: layout `ingress`, every stage built in the calling replica;
- `remote`: layouts `separate` and `colocated`, the stages behind the handles bound by serve_app/app.py;
- `through_ingress`: the streams deployment in layout `ingress`, which reaches the models the ingress holds
  through the ingress's own handle (found by name at run time: binding it would make a cycle).

Each gives a `Wiring`: the graph's clients, how /healthz and /v1/pipeline ask each deployment, the health
checks of engines held in this replica, and how to release them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.metrics import StageMetrics
from deployments.stages import ClassifierStage, DetectorStage
from serve_app.clients import (
    ClassifierClient,
    DetectorClient,
    PooledClassifiers,
    RemoteClassifier,
    RemoteDetector,
    Routed,
)
from serve_app.config import PipelineConfig
from serve_app.graph import ClassifierRoute, CropCutter, InferenceGraph
from serve_app.offload import INLINE, CpuWork


def _now(describe: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        return describe()

    return call


@dataclass(frozen=True)
class Wiring:
    detector: DetectorClient
    classifiers: dict[str, ClassifierClient]
    describers: dict[str, Callable[[], Awaitable[Any]]]  # by deployment (or, in layout ingress, stage) name
    health: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # engines held in this replica
    stages: list[DetectorStage | ClassifierStage] = field(default_factory=list)  # held here, closed by `close`

    def graph(self, config: PipelineConfig, cpu: CpuWork = INLINE, cut_on_device: CropCutter | None = None) -> InferenceGraph:
        routes = [ClassifierRoute.from_config(c, self.classifiers[c.name]) for c in config.classifiers]
        return InferenceGraph(self.detector, routes, config.ingress.detector_timeout_s, cpu, cut_on_device)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def in_process(config: PipelineConfig, devices: Mapping[str, str]) -> Wiring:
    detector = DetectorStage(config.detector, devices.get("detector", "cpu"), shared=True,
                             on_batch=StageMetrics("detector").record)
    stages = {c.name: ClassifierStage(c, devices.get(c.name, "cpu"), shared=True, on_batch=StageMetrics(c.name).record)
              for c in config.classifiers}
    return Wiring(
        detector,
        dict(stages),
        {"detector": _now(detector.describe), **{name: _now(s.describe) for name, s in stages.items()}},
        [detector.check_health, *(s.check_health for s in stages.values())],
        [detector, *stages.values()],
    )


def _tuned(config: PipelineConfig, handle: Any) -> Routed:
    options = config.ingress.handles
    # local routing is an init option of the handle (setting it through options() is deprecated in 2.60)
    if options.prefer_local_routing and not handle.is_initialized:
        handle._init(_prefer_local_routing=True)
    return Routed(handle, options.above_bytes)


def remote(config: PipelineConfig, detector: Any, classifiers: Mapping[str, Any], pool: Any | None) -> Wiring:
    """The clients of the model deployments (`pool`: the shared `classifiers` deployment of layout colocated)."""
    detector = _tuned(config, detector)
    describers: dict[str, Callable[[], Awaitable[Any]]] = {"detector": detector.method("describe").remote}
    if pool is not None:
        pool = _tuned(config, pool)
        pooled = PooledClassifiers(pool)
        clients: dict[str, ClassifierClient] = {c.name: pooled.client(c.name) for c in config.classifiers}
        describers["classifiers"] = pool.method("describe").remote
    else:
        handles = {c.name: _tuned(config, classifiers[c.name]) for c in config.classifiers}
        clients = {name: RemoteClassifier(handle, name) for name, handle in handles.items()}
        describers |= {name: handle.method("describe").remote for name, handle in handles.items()}
    return Wiring(RemoteDetector(detector), clients, describers)


def through_ingress(config: PipelineConfig, ingress: Any) -> Wiring:
    """The models of layout `ingress`, reached through the ingress deployment's handle."""
    ingress = _tuned(config, ingress)
    clients: dict[str, ClassifierClient] = {c.name: RemoteClassifier(ingress, c.name, by_name=True)
                                            for c in config.classifiers}
    return Wiring(RemoteDetector(ingress, method="detect_stage"), clients, {})
