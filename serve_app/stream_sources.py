"""What a client may name as a live stream source, how it is shown back, and which addresses it may reach.

- `parse_source`: a URL of an allowed scheme, or a file in the media directory; control characters and white
  space are refused (they would end up in FFmpeg's RTSP and HTTP requests as extra header lines).
- `redact`: a URL with its password (and secret-looking query values) replaced by `***`, for every answer, error
  and log line; the credentials themselves stay in `Source.target`, for the connection only.
- `AddressPolicy`: a host's addresses, checked: loopback, private, link-local, multicast, reserved and this host's
  own addresses are refused unless the operator lists the host or its network in `allowed_hosts`. The egress
  guard (serve_app/egress.py) asks it at every connection a source makes and connects to the checked address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from serve_app.config import StreamsConfig
from serve_app.decoding import InputError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # control characters and white space
_SECRET_KEYS = re.compile(r"pass|pwd|secret|token|key|auth|signature|sig$|credential", re.IGNORECASE)


def redact(url: str) -> str:
    """`url` without its secrets: the password of its user information, and the values of query parameters whose
    name looks like a secret (`password`, `token`, `key`, ...), become `***`. A bare user name stays (it names the
    account); text that is no URL is returned as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_KEYS.search(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*/:,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def shown(text: str) -> str:
    """How a source is named in a message: redacted, control characters escaped, at most 300 characters."""
    quoted = repr(redact(text))
    return quoted if len(quoted) <= 300 else quoted[:297] + "..."


@dataclass(frozen=True)
class Source:
    """A source as the client named it: what the reader opens, and how it is shown."""

    target: str  # the file's path, or the URL with its credentials: for the connection only
    shown: str  # the redacted URL, or the file name as given: for answers, errors and logs
    is_file: bool
    scheme: str = ""
    host: str = ""
    port: int = 0


def parse_source(text: str, config: StreamsConfig) -> Source:
    """The source `text` names, or a 422 saying why it is refused (nothing is resolved or opened here)."""
    unsafe = _UNSAFE.search(text)
    if unsafe is not None:
        raise InputError(422, "invalid_source",
                         f"the source holds a control character or white space ({unsafe.group()!r} at position "
                         f"{unsafe.start()}); percent-encode it: {shown(text)}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InputError(422, "invalid_source", f"source {shown(text)} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme:
        if scheme not in config.url_schemes:
            raise InputError(422, "invalid_source",
                             f"source scheme {scheme!r} is not allowed; allowed: {', '.join(config.url_schemes)}, "
                             "or a file name in the media directory")
        if not parts.hostname:
            raise InputError(422, "invalid_source", f"source {shown(text)} names no host")
        return Source(text, redact(text), False, scheme, parts.hostname, port or DEFAULT_PORTS.get(scheme, 0))
    if config.media_dir is None:
        raise InputError(422, "invalid_source", "file sources are off: set ingress.streams.media_dir")
    root = Path(config.media_dir).resolve()
    path = (root / text).resolve()
    if not path.is_relative_to(root):
        raise InputError(422, "invalid_source", f"source {shown(text)} is outside the media directory")
    if not path.is_file():
        raise InputError(422, "invalid_source", f"no file {shown(text)} in the media directory")
    return Source(str(path), text, True)


def own_addresses() -> set[Address]:
    """Every address of this host's interfaces."""
    import psutil

    found = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(address.address.split("%")[0]))
                except ValueError:
                    continue
    return found


def _internal(address: Address, own: set[Address]) -> str | None:
    """Why `address` is internal, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if address in own:
        return "one of this host's own"
    return None


class AddressPolicy:
    """Which addresses a stream source may reach: public ones, and those the operator allows by host name or CIDR."""

    def __init__(self, allowed_hosts: Iterable[str], resolve: Callable[..., list[Any]] = socket.getaddrinfo,
                 own: Callable[[], set[Address]] = own_addresses) -> None:
        allowed = list(allowed_hosts)
        self._names = {h.lower() for h in allowed if "/" not in h}
        self._networks = [ipaddress.ip_network(h, strict=False) for h in allowed if "/" in h]
        self._resolve = resolve
        self._own = own

    def addresses(self, host: str, port: int, what: str) -> list[Address]:
        """`host`'s addresses if every one of them may be reached, else a 422 naming the first that may not.
        Blocking (name resolution): call it off the event loop. `what`: how messages name the connection."""
        try:
            infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise InputError(422, "source_unavailable", f"cannot resolve the host of {what}: {exc}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if host.lower() in self._names:
            return addresses
        own = self._own()
        for address in addresses:
            if any(address in network for network in self._networks):
                continue
            why = _internal(address, own)
            if why is not None:
                raise InputError(422, "source_not_allowed",
                                 f"{what} resolves to {address}, a {why} address; stream sources may only reach "
                                 "public addresses unless ingress.streams.allowed_hosts lists the host or its network")
        return addresses

