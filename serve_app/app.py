"""The application builder `serve_config.yaml` imports: `serve_app.app:build_app`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import ray
from ray.serve import Application

from deployments import Classifier, Detector
from serve_app.config import DeploymentConfig, PipelineConfig
from serve_app.ingress import Ingress
from serve_app.placement import Placement, check_fits, place

logger = logging.getLogger("ray.serve")


def _options(name: str, deployment: DeploymentConfig, placement: Placement) -> dict[str, object]:
    options: dict[str, object] = {
        "name": name,
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_constructor_retry_count": deployment.max_constructor_retry_count,
        "ray_actor_options": placement.actor_options(deployment),
        "logging_config": {"enable_access_log": deployment.access_log},
    }
    if deployment.autoscaling_config:
        options["autoscaling_config"] = deployment.autoscaling_config
    else:
        options["num_replicas"] = deployment.num_replicas
    return options


def build_app(args: dict[str, Any] | PipelineConfig) -> Application:
    """Serve's entry point: `args` is the YAML mapping under the application's `args`."""
    config = args if isinstance(args, PipelineConfig) else PipelineConfig.model_validate(args)
    return bind_pipeline(config)


def bind_pipeline(config: PipelineConfig, cluster_resources: Mapping[str, float] | None = None) -> Application:
    """Bind the ingress, detector and one deployment per classifier into one Serve application.

    Resources are resolved against the running Ray cluster first, so a machine without a GPU
    runs the same config on CPU, and a plan that cannot be scheduled fails here, loudly.
    """
    resources = dict(cluster_resources if cluster_resources is not None else ray.cluster_resources())
    gpus = float(resources.get("GPU", 0.0))

    detector_place = place("detector", config.detector.deployment, config.detector.engine, gpus)
    classifier_places = [place(c.name, c.deployment, c.engine, gpus) for c in config.classifiers]
    ingress_place = place("ingress", config.ingress.deployment, None, gpus)
    check_fits([ingress_place, detector_place, *classifier_places], resources)

    detector = Detector.options(**_options("detector", config.detector.deployment, detector_place)).bind(
        config.detector, detector_place.device
    )
    classifiers = {
        c.name: Classifier.options(**_options(c.name, c.deployment, p)).bind(c, p.device)
        for c, p in zip(config.classifiers, classifier_places)
    }
    logger.info(
        "pipeline: GPU fractions %s, mode %s",
        {p.name: p.num_gpus for p in (detector_place, *classifier_places)},
        config.ingress.mode,
    )
    return Ingress.options(**_options("ingress", config.ingress.deployment, ingress_place)).bind(
        detector, classifiers, config
    )
