"""The only way out for a live stream's reader: a loopback listener per stream that FFmpeg connects to instead of
the source, which checks every connection the source makes and connects to the address it checked.

FFmpeg follows RTSP redirects by itself (its `max_redirects` covers HTTP only) and an HLS or DASH playlist names
its segments' hosts, so a check of the first URL alone let a source reach addresses the service refuses. Here:
- RTSP and RTSPS (`RtspGuard`): FFmpeg talks RTSP over TCP (interleaved RTP, no UDP) to the guard, which relays it
  to the source's checked address (TLS towards the source for rtsps) and reads every message the source sends:
  a redirect (3xx) is refused, since its target would be reached unchecked;
- HTTP and HTTPS (`HttpGuard`): the guard is FFmpeg's HTTP proxy (`http_proxy`), so every request, the first, any
  redirect, every playlist reload and segment, comes to it with its host: each is checked and sent to the
  address checked (HTTPS through CONNECT), and a refused one gets 403;
- both resolve the host at each connection and connect to the address they checked, so a name that resolves to
  a public address at the check and an internal one at the connection (DNS rebinding) reaches nothing.
Every refusal is kept (`refusals`) so the stream can say why it failed. Closing a guard closes its connections,
which ends a read or an open FFmpeg is blocked in. The guards of one replica share one event loop on a thread of
its own (`EgressLoop`), so relaying never waits for the replica's loop, nor holds it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from serve_app.decoding import InputError
from serve_app.stream_sources import AddressPolicy, Source, redact

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

# FFmpeg options, per kind of source: only the protocols each needs (a file may not fetch URLs, an RTSP source
# may not open UDP or a file, an HTTP one nothing but HTTP(S)), RTSP over TCP, HTTP through the guard.
FILE_OPTIONS = {"protocol_whitelist": "file"}
RTSP_OPTIONS = {"rtsp_transport": "tcp", "protocol_whitelist": "rtsp,tcp"}
HTTP_OPTIONS = {"protocol_whitelist": "http,https,tls,tcp,httpproxy,crypto", "http_persistent": "0",
                "multiple_requests": "0"}
_HEAD_LIMIT = 64 * 1024
_STATUS = re.compile(rb"^RTSP/\d\.\d\s+(\d{3})")


class EgressLoop:
    """An asyncio loop on a thread of its own, for every guard of the replica."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stream-egress", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:  # the replica is stopping: nothing more runs here
            work.close()
            done: concurrent.futures.Future[T] = concurrent.futures.Future()
            done.cancel()
            return done
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """`work` on the egress loop, awaited from another loop."""
        return await asyncio.wrap_future(self.submit(work))

    def close(self) -> None:
        """Cancel what still runs here (relays, guard closes), then stop and close the loop."""
        if self._closed:
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(timeout=5)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


class Guard:
    """One stream's listener and the connections through it."""

    def __init__(self, source: Source, policy: AddressPolicy, connect_timeout_s: float) -> None:
        self.source = source
        self._policy = policy
        self._timeout = connect_timeout_s
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refusals: list[InputError] = []  # appended on the egress loop, read anywhere

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=_HEAD_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def reader_url(self) -> str:
        raise NotImplementedError

    def reader_options(self) -> dict[str, str]:
        raise NotImplementedError

    def refuse(self, error: InputError) -> InputError:
        self.refusals.append(error)
        logger.warning("stream source %s: %s", self.source.shown, error.message)
        return error

    async def _connect(self, host: str, port: int, tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to `host`:`port` at an address the policy allows (resolved now, connected to as checked)."""
        what = f"{self.source.shown}" if host == self.source.host else f"{host}:{port}, reached by {self.source.shown}"
        try:
            addresses = await asyncio.to_thread(self._policy.addresses, host, port, what)
        except InputError as exc:
            raise self.refuse(exc) from None
        context = None
        if tls:  # as FFmpeg's own TLS did by default: encrypted, the certificate not verified (cameras sign their own)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        failure: BaseException | None = None
        for address in addresses:
            try:
                opened = asyncio.open_connection(str(address), port, ssl=context,
                                                 server_hostname=host if tls else None, limit=_HEAD_LIMIT)
                reader, writer = await asyncio.wait_for(opened, self._timeout)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                failure = exc
                continue
            self._writers.add(writer)
            return reader, writer
        raise ConnectionError(f"cannot connect to {host}:{port}: {failure or 'no address'}")

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, InputError,
                TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    async def _until_one_ends(*work: Coroutine[Any, Any, None]) -> None:
        tasks = [asyncio.ensure_future(w) for w in work]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class RtspGuard(Guard):
    """RTSP(S): FFmpeg speaks to the guard over TCP; the guard relays to the source and refuses its redirects."""

    def reader_url(self) -> str:
        parts = urlsplit(self.source.target)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(("rtsp", f"{user}127.0.0.1:{self.port}", parts.path, parts.query, ""))

    def reader_options(self) -> dict[str, str]:
        return dict(RTSP_OPTIONS)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = self.source
        try:
            up_reader, up_writer = await self._connect(source.host, source.port, tls=source.scheme == "rtsps")
        except ConnectionError as exc:
            self.refuse(InputError(422, "source_unavailable", f"{source.shown}: {exc}"))
            return
        try:
            await self._until_one_ends(self._pipe(reader, up_writer), self._answers(up_reader, writer))
        finally:
            up_writer.close()
            self._writers.discard(up_writer)

    async def _answers(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """The source's side: interleaved RTP (`$`, channel, length) passes as it is; each RTSP message is read
        whole (head, and body by its Content-Length) and passed on, unless it is a redirect."""
        while True:
            first = await source.readexactly(1)
            if first == b"$":
                frame = await source.readexactly(3)
                data = await source.readexactly(int.from_bytes(frame[1:3], "big"))
                sink.write(first + frame + data)
            else:
                head = first + await source.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                body = await source.readexactly(int(length.group(1))) if length else b""
                status = _STATUS.match(head)
                if status is not None and status.group(1).startswith(b"3"):
                    location = re.search(rb"(?im)^location:\s*(\S+)\s*$", head)
                    target = redact(location.group(1).decode("latin-1")) if location else "nowhere"
                    self.refuse(InputError(422, "source_not_allowed",
                                           f"{self.source.shown} answered {status.group(1).decode()} redirecting to "
                                           f"{target}; stream sources may not redirect (the target would be reached "
                                           "unchecked): name the final URL"))
                    return
                sink.write(head + body)
            await sink.drain()


class HttpGuard(Guard):
    """HTTP(S): the guard is FFmpeg's proxy; each request's host is checked, then reached at the checked address."""

    def reader_url(self) -> str:
        return self.source.target

    def reader_options(self) -> dict[str, str]:
        return {**HTTP_OPTIONS, "http_proxy": f"http://127.0.0.1:{self.port}"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
        request, *headers = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = (request.split(" ") + ["", ""])[:3]
        if method == "CONNECT":  # HTTPS: a tunnel to the checked address; FFmpeg speaks TLS through it
            host, _, port = target.rpartition(":")
            upstream = await self._reach(writer, host.strip("[]"), int(port or 443))
            if upstream is None:
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:
            parts = urlsplit(target)
            if parts.scheme != "http" or not parts.hostname:
                await self._refused(writer, f"a request for {redact(target)!r} is no absolute http URL")
                return
            upstream = await self._reach(writer, parts.hostname, parts.port or 80)
            if upstream is None:
                return
            path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
            kept = [h for h in headers if not h.lower().startswith(("proxy-", "connection:"))]
            upstream[1].write("\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
                              .encode("latin-1"))
        up_reader, up_writer = upstream
        try:
            await self._until_one_ends(self._pipe(reader, up_writer),
                                       self._pipe(up_reader, writer))
        finally:
            up_writer.close()
            self._writers.discard(up_writer)

    async def _reach(self, writer: asyncio.StreamWriter,
                     host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await self._connect(host, port, tls=False)
        except InputError as exc:
            await self._refused(writer, exc.message)
        except ConnectionError as exc:
            self.refuse(InputError(422, "source_unavailable", f"{self.source.shown}: {exc}"))
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        return None

    async def _refused(self, writer: asyncio.StreamWriter, why: str) -> None:
        if not self.refusals or self.refusals[-1].message != why:
            self.refuse(InputError(422, "source_not_allowed", why))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()


def guard_for(source: Source, policy: AddressPolicy, connect_timeout_s: float) -> Guard | None:
    """The guard a network source goes through (None for a file in the media directory)."""
    if source.is_file:
        return None
    if source.scheme in ("rtsp", "rtsps"):
        return RtspGuard(source, policy, connect_timeout_s)
    return HttpGuard(source, policy, connect_timeout_s)
