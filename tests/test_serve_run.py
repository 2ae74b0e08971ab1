"""`serve run` as the README starts it (behind the HAProxy ingress): it answers, and Ctrl-C leaves nothing
running and nothing listening, HAProxy included (an earlier session once saw a stopped run leave `haproxy`
holding port 8000)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import ROOT, _free_port
from tests.images import ASTRONAUT

SERVE = Path(sys.executable).parent / "serve"


def _readme_run_environment() -> dict[str, str]:
    """The variables the README's run command sets before `serve run serve_config.yaml`."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python3 -m venv") and "serve run serve_config.yaml" in line)
    before = line[line.rindex("&&") + 2 : line.index(".venv/bin/serve run")]
    env = dict(re.findall(r"([A-Z][A-Z0-9_]*)=(\S+)", before))
    assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", line  # what this test is about
    return env


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _session_members(sid: int) -> list[str]:
    """Processes still in the process session `sid` (the run and everything it started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid:  # state ppid pgrp session ...
            found.append(text[: text.rindex(")") + 1])
    return found


def _kill_session(sid: int) -> None:
    for member in _session_members(sid):
        try:
            os.kill(int(member.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ctrl_c_stops_serve_run_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port, stats_port, metrics_port = _free_port(), _free_port(), _free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as on a fresh machine
    env.update(_readme_run_environment())
    # HAProxy's stats and metrics listen on fixed ports (8404, 9101); the suite's own Serve holds those
    env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(stats_port), str(metrics_port)
    log = tmp_path / "serve_run.log"
    run = subprocess.Popen(
        [str(SERVE), "run", str(path)], cwd=ROOT, env=env, start_new_session=True,
        stdout=log.open("w"), stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert run.poll() is None, f"serve run exited early:\n{log.read_text()[-3000:]}"
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/infer", content=ASTRONAUT.read_bytes(),
                            headers={"Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["objects"]) == 1
        assert _listening(stats_port)  # HAProxy really is in front
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        assert run.wait(timeout=90) == 0
        deadline = time.monotonic() + 30  # Ray's processes may take a few seconds to follow
        ports = (port, stats_port, metrics_port)
        while time.monotonic() < deadline and (_session_members(run.pid) or any(map(_listening, ports))):
            time.sleep(1)
        assert _session_members(run.pid) == []
        assert [p for p in ports if _listening(p)] == []
    finally:
        _kill_session(run.pid)  # whatever a failed run left, by PID
