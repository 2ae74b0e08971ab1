"""The application builder Serve imports: `serve_app.app:build_app`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.serve import Application

from deployments.classifier import Classifier
from deployments.classifier_pool import ClassifierPool
from deployments.detector import Detector
from serve_app.config import DeploymentConfig, PipelineConfig
from serve_app.ingress import Ingress
from serve_app.placement import Placement, check_fits, combine, place, place_stream_workers, place_streams
from serve_app.stream_service import Streams

logger = logging.getLogger("ray.serve")


def replica_environment(config: PipelineConfig) -> dict[str, str]:
    """Variables every replica of the application gets: Serve's cap on a by-value call or result, raised so that
    no legal frame or result is refused between deployments (the caller's channel and the callee's server both
    read it)."""
    return {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(config.ingress.handles.grpc_max_message_bytes)}


def _options(name: str, deployment: DeploymentConfig, placement: Placement,
             environment: Mapping[str, str]) -> dict[str, object]:
    options: dict[str, object] = {
        "name": name,
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_constructor_retry_count": deployment.max_constructor_retry_count,
        "ray_actor_options": placement.actor_options(deployment, environment),
        "logging_config": {"enable_access_log": deployment.access_log},
        "graceful_shutdown_wait_loop_s": deployment.graceful_shutdown_wait_loop_s,
        "graceful_shutdown_timeout_s": deployment.graceful_shutdown_timeout_s,
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


def cluster_nodes() -> list[dict[str, float]]:
    """Each live node's total resources, as Ray reports them."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def bind_pipeline(config: PipelineConfig, nodes: Sequence[Mapping[str, float]] | None = None) -> Application:
    """Bind the ingress and the model deployments of `config.layout` into one Serve application.

    Resources are resolved against the running Ray cluster's nodes first (`nodes`: each node's
    resources; default: asked from Ray), so a machine without a GPU runs the same config on CPU, and a
    plan that cannot be scheduled fails here, loudly.
    - separate: the detector and each classifier in a deployment of its own, each with its GPU fraction;
    - colocated: the detector alone, every classifier in one `classifiers` deployment that asks for the
      sum of their fractions (its other settings are the first classifier's);
    - ingress: every model in the ingress replica, which asks for the sum of all fractions.
    Unless streams are off, a `streams` deployment (one replica, no model) holds the live streams; it reaches
    the models through the same handles, or, in layout ingress, through the ingress; or, with
    `ingress.streams.workers`, it starts stream workers that each hold the models (counted in the fit check).
    """
    resources = list(nodes) if nodes is not None else cluster_nodes()
    env = replica_environment(config)
    gpus = sum(float(n.get("GPU", 0.0)) for n in resources)

    detector_place = place("detector", config.detector.deployment, config.detector.engine, gpus)
    classifier_places = [place(c.name, c.deployment, c.engine, gpus) for c in config.classifiers]
    ingress_place = place("ingress", config.ingress.deployment, None, gpus)
    streams_on = config.ingress.streams.enabled
    worker_count = config.ingress.streams.workers.count
    streams_place = place_streams(config.ingress.streams.deployment, config.ingress.streams.decoder, gpus, worker_count)
    extra = [streams_place] if streams_on else []
    workers: dict[str, Any] | None = None
    if streams_on and worker_count:  # the stream workers hold their own models: the handles are not theirs
        workers_place, worker_devices = place_stream_workers(config, gpus)
        extra.append(workers_place)
        workers = {"devices": worker_devices, "gpu_share": workers_place.num_gpus, "environment": env}

    def streams(**handles: Any) -> Any:
        if not streams_on:
            return None
        with_listeners = config.ingress.streams.deployment.model_copy(update={"max_ongoing_requests": (
            config.ingress.streams.deployment.max_ongoing_requests + config.ingress.streams.max_listeners)})
        bound = {"workers": workers} if workers is not None else handles
        return Streams.options(**_options("streams", with_listeners, streams_place, env)).bind(config, **bound)
    devices = {p.name: p.device for p in (detector_place, *classifier_places)}
    logger.info(
        "pipeline: layout %s, GPU fractions %s, mode %s",
        config.layout,
        {p.name: p.num_gpus for p in (detector_place, *classifier_places)},
        config.ingress.mode,
    )

    # the ingress holds each events listener as an ongoing request: room for them on top of the API's own capacity
    # (which serve_app/admission.py's gate keeps at the configured max_ongoing_requests)
    listeners = config.ingress.streams.max_listeners if streams_on else 0
    ingress_deployment = config.ingress.deployment.model_copy(
        update={"max_ongoing_requests": config.ingress.deployment.max_ongoing_requests + listeners})

    if config.layout == "ingress":
        host = combine("ingress", [ingress_place, detector_place, *classifier_places])
        check_fits([host, *extra], resources)
        return Ingress.options(**_options("ingress", ingress_deployment, host, env)).bind(
            config, devices=devices, streams=streams())

    detector = Detector.options(**_options("detector", config.detector.deployment, detector_place, env)).bind(
        config.detector, detector_place.device
    )
    if config.layout == "colocated" and config.classifiers:
        shared = combine("classifiers", classifier_places)
        check_fits([ingress_place, detector_place, shared, *extra], resources)
        first = config.classifiers[0].deployment
        pool = ClassifierPool.options(**_options("classifiers", first, shared, env)).bind(
            list(config.classifiers), {c.name: devices[c.name] for c in config.classifiers}
        )
        return Ingress.options(**_options("ingress", ingress_deployment, ingress_place, env)).bind(
            config, detector=detector, pool=pool, streams=streams(detector=detector, pool=pool)
        )

    check_fits([ingress_place, detector_place, *classifier_places, *extra], resources)
    classifiers = {
        c.name: Classifier.options(**_options(c.name, c.deployment, p, env)).bind(c, p.device)
        for c, p in zip(config.classifiers, classifier_places)
    }
    return Ingress.options(**_options("ingress", ingress_deployment, ingress_place, env)).bind(
        config, detector=detector, classifiers=classifiers,
        streams=streams(detector=detector, classifiers=classifiers),
    )
