"""Run by tests/test_scale_out.py in its own process (a fresh Ray): the face graph on a local cluster
of two nodes, with every classifier pinned to the second node through a custom resource; then live streams on
two stream workers (ingress.streams.workers), spread over both nodes, each processing its stream's frames.

Exits 0 and prints a JSON line when the answers are right and the placement is as configured.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serve_app.app import build_app
from tests.conftest import demo_args, quick_to_stop
from tests.images import ASTRONAUT
from tests.videos import two_faces


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    worker = cluster.add_node(num_cpus=2, resources={"classifier_node": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        media = Path(tempfile.mkdtemp(prefix="two-node-media-"))
        two_faces(media / "long.mp4", frames=500, enters_at=25)
        args = demo_args()
        for c in args["classifiers"]:
            c["deployment"] = {"num_cpus": 0.25, "num_gpus": 0, "resources": {"classifier_node": 0.1}}
        args["detector"]["deployment"] = {"num_cpus": 0.5, "num_gpus": 0, "resources": {"head": 0.1}}
        args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": 2,
                                      "workers": {"count": 2, "num_cpus": 0.5, "num_gpus": 0, "spread": True}}
        serve.run(build_app(quick_to_stop(args)), name="faces", route_prefix="/")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/infer", content=ASTRONAUT.read_bytes(),
                              headers={"Content-Type": "image/png"}, timeout=60)
        response.raise_for_status()
        (face,) = response.json()["objects"]
        assert face["attributes"]["gender"]["label"] == "female", face
        assert face["attributes"]["emotion"]["label"] == "happy", face
        nodes = {}
        for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
            name = actor.class_name or ""
            if name.startswith("ServeReplica:faces:"):
                nodes[name.split(":")[-1]] = actor.node_id
        assert {nodes["age"], nodes["gender"], nodes["emotion"]} == {worker.node_id}, nodes
        assert nodes["detector"] != worker.node_id, nodes
        stream_nodes = _streams_on_two_workers(f"http://127.0.0.1:{port}")
        print(json.dumps({"ok": True, "replica_nodes": nodes, "worker": worker.node_id, "stream_nodes": stream_nodes}))
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _streams_on_two_workers(url: str) -> list[str]:
    """Two streams on the app's two stream workers, placed with SPREAD: the nodes of the workers whose streams
    processed frames."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(2):
            started = client.post("/v1/streams", json={"source": "long.mp4"})
            assert started.status_code == 201, started.text
        workers: list[dict[str, Any]] = []
        for _ in range(600):  # until each worker has run frames through its own models (about a minute at most)
            workers = client.get("/v1/pipeline").json()["streams"]["workers"]
            if all(w["state"] == "running" and (w["muxer"] or {}).get("frames", 0) > 0 for w in workers):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the workers did not both process frames: {workers}")
        for stream in client.get("/v1/streams").json()["streams"]:
            client.delete(f"/v1/streams/{stream['id']}")
    nodes = sorted(w["node_id"] for w in workers)
    assert len(set(nodes)) == 2, f"both workers on one node: {workers}"
    return nodes


if __name__ == "__main__":
    sys.exit(main())
