"""Stream sources are contained: no URL reaches an internal address unless the operator allows it, FFmpeg
follows no redirect, opening and reading run off the event loop with timeouts, the limit holds under a
burst, DELETE is idempotent, a source with no frame fails, and detector outages skip frames."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serve_app.config import StreamsConfig
from serve_app.decoding import InputError
from serve_app.stream_sources import AddressPolicy, own_addresses
from serve_app.streams import StreamRegistry
from tests.conftest import demo_args, deployed, small
from tests.images import ASTRONAUT
from tests.videos import two_faces


def check_url(url: str, allowed_hosts: list[str], resolve: Any) -> None:
    """The policy's answer for a URL's host, as parse_source and the egress guard ask it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    AddressPolicy(allowed_hosts, resolve).addresses(parts.hostname, parts.port or 554, f"source {url}")


def _resolver(*addresses: str):  # noqa: ANN202 - socket.getaddrinfo's documented result shape
    def resolve(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:  # noqa: A002
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]
    return resolve


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.9", "private"), ("169.254.169.254", "link-local"),
    ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
])
def test_urls_that_resolve_to_internal_addresses_are_refused(address: str, why: str) -> None:
    with pytest.raises(InputError, match=f"resolves to .*, a {why} address"):
        check_url("rtsp://camera.example/live", [], resolve=_resolver("93.184.216.34", address))  # any one is enough


def test_this_hosts_own_addresses_are_refused_and_public_ones_pass() -> None:
    mine = next(a for a in own_addresses() if not (a.is_loopback or a.is_private or a.is_link_local))  \
        if any(not (a.is_loopback or a.is_private or a.is_link_local) for a in own_addresses()) else None
    if mine is not None:
        with pytest.raises(InputError, match="one of this host's own"):
            check_url("http://me.example/", [], resolve=_resolver(str(mine)))
    check_url("https://cdn.example/clip.mp4", [], resolve=_resolver("93.184.216.34", "2606:2800:220:1::1"))


def test_allowed_hosts_open_what_the_operator_lists() -> None:
    check_url("rtsp://camera.local/live", ["camera.local"], resolve=_resolver("10.0.0.5"))
    check_url("rtsp://cam7/live", ["10.0.0.0/24"], resolve=_resolver("10.0.0.7"))
    with pytest.raises(InputError, match="private"):
        check_url("rtsp://cam9/live", ["10.0.0.0/24"], resolve=_resolver("10.0.1.9"))
    for bad, why in (("http://x", "is not a CIDR"), ("host name", "neither a host name nor a CIDR")):
        with pytest.raises(ValueError, match=why):
            StreamsConfig(allowed_hosts=[bad])


class _Counting(BaseHTTPRequestHandler):
    seen: list[str]  # set per server
    redirect_to: str | None = None

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append(self.path)
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def _server(host: str, redirect_to: str | None = None) -> tuple[socketserver.TCPServer, list[str]]:
    handler = type("Handler", (_Counting,), {"seen": [], "redirect_to": redirect_to})
    server = socketserver.ThreadingTCPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler.seen


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media3")
    two_faces(folder / "clip.mp4", frames=250, enters_at=100)
    (folder / "empty.mjpeg").write_bytes(b"\xff\xd8\xff\xd9" * 4)  # opens, and yields no frame
    return folder


@pytest.fixture(scope="module")
def sources_app(serve_url: str, media: Path) -> Iterator[str]:
    args = small(demo_args())
    args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": 2, "allowed_hosts": ["127.0.0.2/32"],
                                  "open_timeout_s": 3, "read_timeout_s": 3, "keep_ended_s": 60,
                                  "deployment": {"num_cpus": 0.1, "num_gpus": 0}}
    with deployed(serve_url, "sources", args) as url:
        yield url


def test_a_json_body_that_is_not_utf8_is_a_422_in_the_one_error_shape(sources_app: str) -> None:
    with httpx.Client(base_url=sources_app, timeout=60) as client:
        answer = client.post("/v1/streams", content=b'{"source": "\xff\xfe"}',
                             headers={"Content-Type": "application/json"})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_body"
        assert client.get("/v1/streams").status_code == 200  # and the service goes on


def test_the_service_never_fetches_a_loopback_url(sources_app: str) -> None:
    server, seen = _server("127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/probe"
        with httpx.Client(base_url=sources_app, timeout=60) as client:
            refused = client.post("/v1/streams", json={"source": url})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "source_not_allowed"
        assert seen == []  # no request reached the local server
    finally:
        server.shutdown()


def test_an_allowed_source_cannot_redirect_to_an_internal_one(sources_app: str) -> None:
    inside, inside_seen = _server("127.0.0.1")
    target = f"http://127.0.0.1:{inside.server_address[1]}/secret"
    allowed, allowed_seen = _server("127.0.0.2", redirect_to=target)
    try:
        with httpx.Client(base_url=sources_app, timeout=60) as client:
            answer = client.post("/v1/streams", json={"source": f"http://127.0.0.2:{allowed.server_address[1]}/v"})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "source_not_allowed"
        assert "resolves to 127.0.0.1, a loopback address" in answer.json()["error"]["message"]
        assert allowed_seen  # FFmpeg asked the allowed host, its redirect came back to the guard ...
        assert inside_seen == []  # ... which refused to reach the internal one
    finally:
        inside.shutdown()
        allowed.shutdown()


def test_silent_sources_time_out_off_the_event_loop(sources_app: str) -> None:
    """Two sources that accept and never answer: each POST ends in a 422 after the open timeout, and a normal
    request sent while they hang is answered before they are."""
    silent = socket.create_server(("127.0.0.2", 0))
    silent.listen(16)
    url = f"http://127.0.0.2:{silent.getsockname()[1]}/live"
    try:
        with ThreadPoolExecutor(3) as pool, httpx.Client(base_url=sources_app, timeout=60) as client:
            hanging = [pool.submit(client.post, "/v1/streams", json={"source": url}) for _ in range(2)]
            normal = client.post("/v1/infer", content=ASTRONAUT.read_bytes(), headers={"Content-Type": "image/png"})
            assert normal.status_code == 200
            assert not all(h.done() for h in hanging)  # the opens were still hanging when /v1/infer answered
            answers = [h.result() for h in hanging]
        assert [a.status_code for a in answers] == [422, 422]
        assert all("within 3 s" in a.json()["error"]["message"] for a in answers)
    finally:
        silent.close()


def test_a_burst_of_starts_cannot_pass_the_limit_and_deletes_are_idempotent(sources_app: str) -> None:
    with ThreadPoolExecutor(16) as pool, httpx.Client(base_url=sources_app, timeout=60,
                                                      limits=httpx.Limits(max_connections=16)) as client:
        answers = list(pool.map(lambda _: client.post("/v1/streams", json={"source": "clip.mp4"}), range(16)))
        started = [a.json()["id"] for a in answers if a.status_code == 201]
        assert sorted(a.status_code for a in answers) == [201, 201] + [429] * 14
        stops = list(pool.map(lambda _: client.delete(f"/v1/streams/{started[0]}"), range(2)))
        assert [s.status_code for s in stops] == [200, 200] and {s.json()["state"] for s in stops} == {"stopped"}
        client.delete(f"/v1/streams/{started[1]}")


def test_a_source_that_gives_no_frame_fails(sources_app: str) -> None:
    with httpx.Client(base_url=sources_app, timeout=60) as client:
        answer = client.post("/v1/streams", json={"source": "empty.mjpeg"})
        if answer.status_code == 422:  # FFmpeg refused it already at the open: as good
            return
        stream_id = answer.json()["id"]
        for _ in range(100):
            info = client.get(f"/v1/streams/{stream_id}").json()
            if info["state"] != "running":
                break
            asyncio.run(asyncio.sleep(0.1))
        assert info["state"] == "failed" and info["error"] == "empty.mjpeg gave no frame"


class _Session:
    """A video session whose detector is away for the frames in `outage` (the records VideoSession gives)."""

    def __init__(self, outage: set[int]) -> None:
        self.outage, self.track_count = outage, 0

    def begin(self, frame: np.ndarray, source: str) -> None:
        return None

    async def complete(self, index: int, frame: np.ndarray, begun: None) -> dict[str, Any]:
        if index in self.outage:
            return {"error": {"code": "detector_unavailable", "message": "no answer", "frame": index}}
        return {"frame": index, "objects": []}

    def summary(self) -> dict[str, Any]:
        return {"summary": {"frames": 0}}


def test_frames_the_detector_does_not_answer_are_counted_as_failed_and_the_stream_goes_on(media: Path) -> None:
    ended: list[str] = []
    config = StreamsConfig(media_dir=media, detector_outage_s=30, keep_ended_s=60)
    registry = StreamRegistry(config, lambda fps: _Session(outage=set(range(5, 15))),
                              on_end=lambda stream: ended.append(stream.id))

    async def play() -> dict[str, Any]:
        stream = await registry.start("clip.mp4")
        while stream.task is not None and not stream.task.done():
            await asyncio.sleep(0.05)
        return registry.describe(stream.id)

    final = asyncio.run(asyncio.wait_for(play(), 60))
    assert final["state"] == "ended" and final["failed_frames"] > 0
    assert final["frames_processed"] + final["failed_frames"] + final["dropped_frames"] == final["frames_read"]
    assert ended == [final["id"]] and [s["id"] for s in registry.list()] == [final["id"]]  # retired, kept a while
