"""The HTTP client that generates the benchmarks' load: aiohttp, whose cost per request stays flat with the
number of connections, so that a saturation level measures the service and not the client.

httpx (the client of the benchmarks before) spends more of its own CPU per request the more connections its pool
holds, and at c64 it bounded the load itself: against a server that answers at once, on the 2-core CPU box, httpx
made 476 requests/s at c16 and 159 at c64 (6.3 ms of the client's CPU a request) where aiohttp made 9850 and 7704
(0.1 ms). The served figures above c16 before this client (runs 1-8 of issue 24) were the client's.

    python -m bench.load_client        # both clients against a null server on 127.0.0.1, c1 to c128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

JPEG = {"Content-Type": "image/jpeg"}


@dataclass(frozen=True)
class Reply:
    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:200]!r}")


class LoadClient:
    """One aiohttp session, up to `connections` kept open (at least the level's concurrency, so that no request
    waits for a connection or opens a new one)."""

    def __init__(self, connections: int, timeout_s: float = 60.0) -> None:
        self._connections = connections
        self._timeout_s = timeout_s
        self._session: Any = None

    async def __aenter__(self) -> LoadClient:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections, limit_per_host=self._connections),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None) -> Reply:
        async with self._session.post(url, data=body, headers=headers or JPEG, params=params) as response:
            return Reply(response.status, await response.read())

    async def get(self, url: str) -> Reply:
        async with self._session.get(url) as response:
            return Reply(response.status, await response.read(),
                         {name.lower(): value for name, value in response.headers.items()})


# -- the comparison: each client against a server that answers at once --------------------------------------


def _serve(port: int) -> None:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"objects": [{"box": [1, 2, 3, 4], "attributes": {"age": 34.0}}]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/", answer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def _rate(make: Any, concurrency: int, requests: int) -> tuple[float, float]:
    from bench.run import closed_loop

    async with make() as post:
        await closed_loop(post, concurrency, concurrency * 4, 10)  # connections opened, pools warm
        cpu = time.process_time()
        latencies, wall = await closed_loop(post, concurrency, requests, 10)
        cpu = time.process_time() - cpu
    return round(len(latencies) / wall, 1), round(cpu * 1e3 / len(latencies), 3)


def compare(port: int, levels: list[int], body: bytes) -> dict[str, dict[str, Any]]:
    import contextlib

    import httpx

    url = f"http://127.0.0.1:{port}/"

    @contextlib.asynccontextmanager
    async def with_httpx() -> Any:  # as bench.run made its load before
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            yield lambda: client.post(url, content=body, headers=JPEG)

    @contextlib.asynccontextmanager
    async def with_aiohttp() -> Any:
        async with LoadClient(128) as client:
            yield lambda: client.post(url, body)

    out: dict[str, dict[str, Any]] = {}
    for name, make in (("httpx", with_httpx), ("aiohttp", with_aiohttp)):
        for concurrency in levels:
            rps, cpu_ms = asyncio.run(_rate(make, concurrency, max(300, concurrency * 10)))
            out.setdefault(name, {})[f"c{concurrency}"] = {"rps": rps, "client_cpu_ms_per_request": cpu_ms}
            print(f"{name:8} c{concurrency:<4} {rps:8.1f} req/s  {cpu_ms:6.3f} ms of the client's CPU a request",
                  flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the null server's own process
    parser.add_argument("--port", type=int, default=18181)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--body-kib", type=int, default=40, help="the request body (the one-face JPEG is 40 KB)")
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.serve:
        _serve(opts.serve)
        return
    server = subprocess.Popen([sys.executable, "-m", "bench.load_client", "--serve", str(opts.port)])
    try:
        _wait_listening(opts.port, server)
        results = {"command": "python -m bench.load_client " + " ".join(sys.argv[1:]),
                   "clients": compare(opts.port, opts.levels, b"\xff" * (opts.body_kib * 1024))}
    finally:
        server.terminate()
        server.wait(10)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)


def _wait_listening(port: int, server: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the null server exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("the null server did not listen within 30 s")


if __name__ == "__main__":
    main()
