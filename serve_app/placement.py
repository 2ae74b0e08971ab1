"""Decide, before deploying, what each deployment asks Ray for and on which device it runs.

Ray waits silently, forever, for resources that do not exist (a replica asking for a GPU on a
CPU-only machine, or for more CPUs than the cluster has). So the builder resolves the plan
against the cluster's resources first: `device: auto` falls back to CPU (no GPU requested) with a
logged warning, and a plan that cannot fit fails the startup with a message naming the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from serve_app.config import DeploymentConfig, EngineConfig

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

    def actor_options(self, deployment: DeploymentConfig) -> dict[str, object]:
        options: dict[str, object] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if deployment.resources:
            options["resources"] = dict(deployment.resources)
        if deployment.env_vars:
            options["runtime_env"] = {"env_vars": dict(deployment.env_vars)}
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
    replicas = _start_replicas(deployment)
    if engine is None or engine.device == "cpu" or deployment.num_gpus == 0:
        return Placement(name, "cpu", deployment.num_cpus, 0.0, replicas)
    if cluster_gpus <= 0:
        if engine.device == "cuda":
            raise PlacementError(f"{name}: device 'cuda' is configured but the Ray cluster has no GPU")
        logger.warning("%s: no GPU in the Ray cluster; falling back to CPU (num_gpus 0)", name)
        return Placement(name, "cpu", deployment.num_cpus, 0.0, replicas)
    return Placement(name, engine.device, deployment.num_cpus, deployment.num_gpus, replicas)


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
    )


def check_fits(placements: list[Placement], cluster: Mapping[str, float]) -> None:
    """Fail when the replicas that must start cannot all be scheduled at once."""
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(getattr(p, key) * p.replicas for p in placements)
        have = float(cluster.get(resource, 0.0))
        if need > have + 1e-9:
            detail = ", ".join(f"{p.name} {getattr(p, key):g} x {p.replicas}" for p in placements if getattr(p, key))
            raise PlacementError(
                f"the deployments need {need:g} {resource} in all ({detail}) but the Ray cluster has {have:g}; "
                f"lower deployment.{key} or num_replicas in the config"
            )
    for p in placements:
        if p.num_gpus > 1 and p.num_gpus != int(p.num_gpus):
            raise PlacementError(f"{p.name}: num_gpus above 1 must be a whole number, got {p.num_gpus:g}")
