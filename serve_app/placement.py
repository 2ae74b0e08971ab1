"""Decide, before deploying, what each deployment asks Ray for and on which device it runs.

Ray waits silently, forever, for resources that do not exist (a replica asking for a GPU on a
CPU-only machine, or for more CPUs than the cluster has). So the builder resolves the plan
against the cluster's resources first: `device: auto` falls back to CPU (no GPU requested) with a
logged warning, and a plan that cannot fit fails the startup with a message naming the numbers.
The check counts every resource a replica asks for (CPU, GPU and custom `resources`) and where it
can go: a replica runs on one node, so it must fit on one node, not on the cluster's total.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from serve_app.config import DeploymentConfig, EngineConfig, PipelineConfig

logger = logging.getLogger("ray.serve")


class PlacementError(ValueError):
    """The configured deployments cannot be scheduled on this cluster."""


@dataclass(frozen=True)
class Placement:
    name: str
    device: str  # what the engine is asked for: "cpu" (no GPU held), else the configured "auto" or "cuda"
    num_cpus: float
    num_gpus: float
    replicas: int  # replicas that must fit at start (min_replicas under autoscaling)
    resources: Mapping[str, float] = field(default_factory=dict)  # custom Ray resources, per replica

    def demand(self) -> dict[str, float]:
        """What one replica asks Ray for, by resource name."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}

    def actor_options(self, deployment: DeploymentConfig,
                      environment: Mapping[str, str] | None = None) -> dict[str, object]:
        """Ray's actor options for a replica; `environment`: variables every replica of the application gets
        (the deployment's own `env_vars` win)."""
        options: dict[str, object] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if deployment.resources:
            options["resources"] = dict(deployment.resources)
        env = {**(environment or {}), **deployment.env_vars}
        if env:
            options["runtime_env"] = {"env_vars": env}
        return options


def _start_replicas(deployment: DeploymentConfig) -> int:
    if deployment.autoscaling_config:
        cfg = deployment.autoscaling_config
        return int(cfg.get("initial_replicas", cfg.get("min_replicas", 1)) or 1)
    return deployment.num_replicas


def place(
    name: str,
    deployment: DeploymentConfig,
    engine: EngineConfig | None,
    cluster_gpus: float,
) -> Placement:
    """One deployment's placement. `engine` None means it runs no model (the ingress)."""
    replicas, custom = _start_replicas(deployment), dict(deployment.resources)
    if engine is None or engine.device == "cpu" or deployment.num_gpus == 0:
        return Placement(name, "cpu", deployment.num_cpus, 0.0, replicas, custom)
    if cluster_gpus <= 0:
        if engine.device == "cuda":
            raise PlacementError(f"{name}: device 'cuda' is configured but the Ray cluster has no GPU")
        logger.warning("%s: no GPU in the Ray cluster; falling back to CPU (num_gpus 0)", name)
        return Placement(name, "cpu", deployment.num_cpus, 0.0, replicas, custom)
    return Placement(name, engine.device, deployment.num_cpus, deployment.num_gpus, replicas, custom)


def place_streams(deployment: DeploymentConfig, decoder: str, cluster_gpus: float, workers: int = 0) -> Placement:
    """The `streams` deployment's placement: no model, but a GPU share where it decodes on NVDEC
    (`ingress.streams.decoder` auto or nvdec, and `deployment.num_gpus` above 0) and has no stream workers
    (`workers`: their count; they decode instead)."""
    replicas, custom = _start_replicas(deployment), dict(deployment.resources)
    if decoder == "ffmpeg" or deployment.num_gpus == 0 or workers:  # with workers, they decode
        return Placement("streams", "cpu", deployment.num_cpus, 0.0, replicas, custom)
    if cluster_gpus <= 0:
        if decoder == "nvdec":
            raise PlacementError("streams: ingress.streams.decoder is nvdec, but the Ray cluster has no GPU")
        logger.warning("streams: no GPU in the Ray cluster; streams are decoded by FFmpeg on the CPU")
        return Placement("streams", "cpu", deployment.num_cpus, 0.0, replicas, custom)
    return Placement("streams", "cuda", deployment.num_cpus, deployment.num_gpus, replicas, custom)


def place_stream_workers(config: PipelineConfig, cluster_gpus: float) -> tuple[Placement, dict[str, str]]:
    """The stream workers' placement (`ingress.streams.workers`: each holds every model, on its GPU share) and
    the device of each stage in them: the engines' own (`auto`, `cuda`), or `cpu` where a worker holds no GPU."""
    cfg = config.ingress.streams.workers
    share = DeploymentConfig(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources)
    stages = [place(name, share, engine, cluster_gpus) for name, engine in
              [("detector", config.detector.engine), *((c.name, c.engine) for c in config.classifiers)]]
    gpus = cfg.num_gpus if any(p.num_gpus for p in stages) else 0.0
    devices = {p.name: p.device for p in stages}
    return Placement("stream_workers", "cuda" if gpus else "cpu", cfg.num_cpus, gpus, cfg.count,
                     dict(cfg.resources)), devices


def combine(name: str, parts: list[Placement]) -> Placement:
    """One replica that hosts the models of `parts`: it asks for the sum of their CPUs and GPU fractions."""
    gpus = sum(p.num_gpus for p in parts)
    if gpus > 1 + 1e-9:
        detail = ", ".join(f"{p.name} {p.num_gpus:g}" for p in parts if p.num_gpus)
        raise PlacementError(
            f"{name}: the models it hosts ask for {gpus:g} GPUs in all ({detail}), but one replica holds at most "
            "one GPU; lower their deployment.num_gpus so the sum is <= 1"
        )
    devices = {p.device for p in parts if p.num_gpus}
    return Placement(
        name,
        devices.pop() if len(devices) == 1 else "cpu" if not devices else "auto",
        round(sum(p.num_cpus for p in parts), 6),
        round(gpus, 6),
        max(p.replicas for p in parts),
        {k: round(sum(p.resources.get(k, 0.0) for p in parts), 6) for k in {k for p in parts for k in p.resources}},
    )


def _key(resource: str) -> str:
    return {"CPU": "num_cpus", "GPU": "num_gpus"}.get(resource, f"resources.{resource}")


def check_fits(placements: list[Placement], nodes: Sequence[Mapping[str, float]]) -> None:
    """Fail when the replicas that must start cannot all be scheduled at once on `nodes` (each node's
    total resources, as `ray.nodes()` reports them).

    Certain failures raise: a resource the cluster lacks in total, or one replica bigger than every
    node. Whether all replicas pack onto the nodes together is checked first-fit-decreasing, a
    heuristic that can miss a tight packing, so failing it only warns.
    """
    for p in placements:
        if p.num_gpus > 1 and p.num_gpus != int(p.num_gpus):
            raise PlacementError(f"{p.name}: num_gpus above 1 must be a whole number, got {p.num_gpus:g}")
    resources = sorted({r for p in placements for r, v in p.demand().items() if v > 0})
    for resource in resources:
        need = sum(p.demand().get(resource, 0.0) * p.replicas for p in placements)
        have = sum(float(n.get(resource, 0.0)) for n in nodes)
        if need > have + 1e-9:
            detail = ", ".join(f"{p.name} {p.demand()[resource]:g} x {p.replicas}"
                               for p in placements if p.demand().get(resource))
            hint = "" if resource in ("CPU", "GPU") else f" (start a node that offers it: ray start --resources='{{\"{resource}\": N}}')"
            raise PlacementError(
                f"the deployments need {need:g} {resource} in all ({detail}) but the Ray cluster has {have:g}{hint}; "
                f"lower deployment.{_key(resource)} or num_replicas in the config"
            )
    for p in placements:
        if not any(_fits(p.demand(), n) for n in nodes):
            largest = ", ".join(f"{r} {max(float(n.get(r, 0.0)) for n in nodes):g}" for r in p.demand() if p.demand()[r])
            raise PlacementError(
                f"{p.name}: one replica asks for {_describe(p.demand())}, more than any single node offers "
                f"(largest per resource: {largest}); a replica runs on one node"
            )
    free = [dict(n) for n in nodes]
    for p in sorted(placements, key=lambda p: -max(p.demand().values(), default=0.0)):
        for _ in range(p.replicas):
            node = next((n for n in free if _fits(p.demand(), n)), None)
            if node is None:
                logger.warning("the replicas may not all fit on the cluster's nodes at once (%s did not pack); "
                               "Ray will wait for resources if they do not", p.name)
                return
            for r, v in p.demand().items():
                node[r] = float(node.get(r, 0.0)) - v


def _fits(demand: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(v <= float(node.get(r, 0.0)) + 1e-9 for r, v in demand.items() if v > 0)


def _describe(demand: Mapping[str, float]) -> str:
    return ", ".join(f"{r} {v:g}" for r, v in demand.items() if v > 0)
