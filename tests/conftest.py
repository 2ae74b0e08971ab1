"""Shared fixtures: one local Ray instance (127.0.0.1 only) and the demo app deployed from serve_config.yaml."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# The tests run the service the way the README starts it: behind Serve's HAProxy ingress. Set before anything
# imports ray.serve, which reads it once (RAY_SERVE_ENABLE_HA_PROXY=0 runs the suite behind the Python proxy).
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# HAProxy's stats and metrics ports are fixed (8404, 9101) unless set: free ones, so nothing else on the machine
# can make the suite fail, and the suite takes nothing a running service of the machine holds.
os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))
# Behind HAProxy a deleted app's ingress stays reachable 30 s so load balancers can deregister it; nothing
# balances the tests' loopback traffic, so each serve.delete would only wait. (The service keeps Serve's default.)
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")


def demo_args() -> dict[str, Any]:
    """The `args` of the shipped serve_config.yaml: the tests run exactly what users run."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return config["applications"][0]["args"]


SMALL = {"num_cpus": 0.1, "num_gpus": 0}


def small(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with every deployment on a small CPU share, so that several test apps fit side by side."""
    for section in (args["ingress"], args["detector"], *args["classifiers"]):
        section["deployment"] = dict(SMALL)
    return args


def on_the_cpu_device(args: dict[str, Any], frames_on_device: bool = True) -> dict[str, Any]:
    """`args` in layout ingress with every model on the torch backend on the CPU device (the torch MTCNN), frames
    kept on that device from the decode on (`frames_on_device`): the GPU-resident path's code, run on the CPU."""
    args["layout"] = "ingress"
    args["ingress"]["frames_on_device"] = frames_on_device
    args["detector"]["engine"] = {"backend": "torch", "device": "cpu"}
    args["detector"]["mtcnn"]["implementation"] = "torch"
    for classifier in args["classifiers"]:
        classifier["engine"] = {"backend": "torch", "device": "cpu"}
    return args


def without_streams(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with live streams off, for apps whose tests never touch /v1/streams: one replica fewer to start
    (the streams replica imports the tracker's library), which CI's two cores feel at every module's deploy."""
    args["ingress"]["streams"] = {"enabled": False}
    return args


def routed(url: str, tries: int = 600) -> str:
    """`url` once HTTP reaches the app there: serve.run returns when the app's replicas run, while HAProxy may
    still be reloading its routes (a 404 then; seen with another app's deletion reloading it at the same moment).
    Bounded: about a minute."""
    for _ in range(tries):
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code != 404:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered: its route did not reach HTTP")


# How often a stopping test replica checks whether its requests are done: Serve sleeps one such period before the
# first check, so at its default (2 s) every serve.delete of a test app took 3 s, most of it that sleep.
STOP_CHECK_S = 0.1


def quick_to_stop(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with every deployment checking for its requests' end every STOP_CHECK_S when it stops (unless the
    test set it): the same drain, without the idle wait."""
    from serve_app.config import StreamsConfig

    if "ingress" in args:  # the streams deployment's own defaults kept (no GPU share, its request limit)
        streams = args["ingress"].setdefault("streams", {})
        default = StreamsConfig().deployment.model_dump(exclude={"graceful_shutdown_wait_loop_s"})
        streams.setdefault("deployment", default)
    for section in (args.get("ingress"), args.get("ingress", {}).get("streams"), args.get("detector"),
                    *args.get("classifiers", [])):
        if section is not None:
            section["deployment"] = {"graceful_shutdown_wait_loop_s": STOP_CHECK_S, **section.get("deployment", {})}
    return args


@contextmanager
def deployed(serve_url: str, name: str, args: dict[str, Any]) -> Iterator[str]:
    """The application built from `args`, running at /<name> for the duration of the block."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(quick_to_stop(args)), name=name, route_prefix=f"/{name}")
    try:
        yield routed(f"{serve_url}/{name}")
    finally:
        serve.delete(name)


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where Ray's Prometheus endpoint answers (/metrics) for the session's Ray."""
    return _free_port()


@pytest.fixture(scope="session")
def serve_url(metrics_port: int) -> Iterator[str]:
    """Ray + Serve on this machine, HTTP on a free loopback port. Logical CPUs are raised to 4 so
    the demo app and the fault-injection app fit side by side (the machine has 2 cores)."""
    import ray
    from ray import serve

    ray.init(
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace="tests",
        _metrics_export_port=metrics_port,
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_app(serve_url: str) -> str:
    """The face demo (MTCNN + age, gender, emotion) as configured in serve_config.yaml, at /."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(demo_args()), name="faces", route_prefix="/")
    return routed(serve_url)


@pytest.fixture()
def client(demo_app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_app, timeout=60.0) as c:
        yield c
