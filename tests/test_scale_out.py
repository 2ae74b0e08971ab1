"""Scale-out: the graph on a local two-node Ray cluster, classifiers placed on the second node; stream workers
on both nodes.

It runs in a subprocess because it needs a Ray of its own (the rest of the suite shares one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_classifiers_and_a_stream_worker_run_on_the_second_node() -> None:
    # Serve's Python proxy here: with the HAProxy ingress, each simulated node would start its own HAProxy on
    # the same HTTP port of this one host (on a real cluster each node has its own address).
    env = {**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.two_node_check"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"ok"'))
    result = json.loads(line)
    assert result["ok"] is True
    assert {result["replica_nodes"][n] for n in ("age", "gender", "emotion")} == {result["worker"]}
    assert len(set(result["stream_nodes"])) == 2  # a stream worker on each node, each running its stream
