"""Small real servers on 127.0.0.1 for the stream tests, each answering what a test needs and recording what
reached it: an RTSP server that redirects, a port that accepts and never answers, an HTTP server of files."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler


class _Threaded(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def _serving(server: _Threaded, seen: list[str]) -> Iterator[tuple[int, list[str]]]:
    """`server` serving on a thread for the block; yields its port and what it records."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def rtsp_redirector(location: str) -> Iterator[tuple[int, list[str]]]:
    """An RTSP server answering OPTIONS, and DESCRIBE with `302 Moved Temporarily` to `location`; yields its port
    and the request lines it received."""
    seen: list[str] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                head = []
                while (line := self.rfile.readline()) not in (b"\r\n", b""):
                    head.append(line.decode("latin-1").strip())
                if not head:
                    return
                seen.append(head[0])
                cseq = next((h.split(":", 1)[1].strip() for h in head if h.lower().startswith("cseq")), "0")
                if head[0].startswith("OPTIONS"):
                    self.wfile.write(f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: DESCRIBE, SETUP, PLAY\r\n\r\n".encode())
                else:
                    self.wfile.write(f"RTSP/1.0 302 Moved Temporarily\r\nCSeq: {cseq}\r\nLocation: {location}\r\n"
                                     "Content-Length: 0\r\n\r\n".encode())

    with _serving(_Threaded(("127.0.0.1", 0), Handler), seen) as served:
        yield served


class Silent:
    """A port that accepts connections, reads what they send, and never answers; counts the connections and how
    many the other side has not closed."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.listen(256)
        self.port = self._socket.getsockname()[1]
        self.accepted = 0
        self._open = 0
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._open += 1
                self._connections.append(connection)
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection: socket.socket) -> None:
        try:
            while connection.recv(65536):
                pass
        except OSError:
            pass
        with self._lock:
            self._open -= 1

    def still_open(self) -> int:
        """Connections the other side has not closed."""
        with self._lock:
            return self._open

    def close(self) -> None:
        self._socket.close()
        with self._lock:
            for connection in self._connections:
                connection.close()


@contextmanager
def silent() -> Iterator[Silent]:
    server = Silent()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def http_files(files: Mapping[str, bytes], host: str = "127.0.0.1") -> Iterator[tuple[int, list[str]]]:
    """An HTTP server of `files` (path -> bytes; 404 otherwise); yields its port and each request as
    "<path> Host: <host header>"."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(f"{self.path} Host: {self.headers.get('Host')}")
            body = files.get(self.path.split("?")[0])
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    with _serving(_Threaded((host, 0), Handler), seen) as served:
        yield served
