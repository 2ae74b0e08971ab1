"""Run by tests/test_scale_out.py in its own process (a fresh Ray): the face graph on a local cluster
of two nodes, with every classifier pinned to the second node through a custom resource.

Exits 0 and prints a JSON line when the answer is right and the placement is as configured.
"""

from __future__ import annotations

import json
import socket
import sys

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serve_app.app import build_app
from tests.conftest import demo_args
from tests.images import ASTRONAUT


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    worker = cluster.add_node(num_cpus=2, resources={"classifier_node": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = demo_args()
        for c in args["classifiers"]:
            c["deployment"] = {"num_cpus": 0.25, "num_gpus": 0, "resources": {"classifier_node": 0.1}}
        args["detector"]["deployment"] = {"num_cpus": 0.5, "num_gpus": 0, "resources": {"head": 0.1}}
        serve.run(build_app(args), name="faces", route_prefix="/")
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
        print(json.dumps({"ok": True, "replica_nodes": nodes, "worker": worker.node_id}))
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
