"""The network under the image fetcher: which addresses it may connect to, and for how long.

Task data comes from whoever can create tasks, so an image URL may point anywhere: at the cloud
metadata service (``169.254.169.254``), at Redis or this backend on loopback, at a private network.
The check runs where no redirect or DNS answer can get around it: on the *resolved* address of every
new connection (every redirect hop opens its own), and the socket then connects to the address that
was checked, so a DNS name that answers differently a second time (rebinding) gains nothing. Host
name and TLS server name stay those of the URL.

A fetch also has a total deadline, kept in a context variable for the calling thread: every connect
and every socket read or write waits at most the time left, so a server that trickles one byte a
second is cut off when the deadline passes instead of holding a download thread for hours.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

__all__ = ["AddressPolicy", "AddressRefused", "GuardedTransport", "fetch_deadline", "time_left"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_SETTING = "DINOLABEL_FETCH_ALLOW"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the low 32 bits are the IPv4 address
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT

_deadline: ContextVar[float | None] = ContextVar("dinolabel_fetch_deadline", default=None)


class AddressRefused(Exception):
    """A connection the address policy does not allow; ``reason`` is fit for users (no resolved IP)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def fetch_deadline(seconds: float) -> Iterator[None]:
    """Everything this thread sends or receives inside the block must end within ``seconds``."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float | None:
    """Seconds left before this thread's fetch deadline (may be negative); None outside a fetch."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses always; others only for listed hosts, networks and origins (or ``*``: all)."""

    allow_all: bool = False
    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    origins: frozenset[tuple[str, int]] = frozenset()  # (host, port): Label Studio's own

    @classmethod
    def parse(cls, entries: Iterable[str], *, origins: Iterable[tuple[str, int]] = ()) -> AddressPolicy:
        """Build from ``DINOLABEL_FETCH_ALLOW`` entries: host names, IP addresses, CIDRs or ``*``.

        Raises ValueError naming the first entry that is none of these.
        """
        allow_all, hosts, networks = False, set(), []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                allow_all = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not name or any(c in name for c in "/:@ *?#"):
                raise ValueError(f"{entry!r} is not a host name, an IP address, a CIDR network or '*'")
            hosts.add(name)
        return cls(
            allow_all=allow_all,
            hosts=frozenset(hosts),
            networks=tuple(networks),
            origins=frozenset((host.lower().rstrip("."), port) for host, port in origins),
        )

    def trusts_host(self, host: str, port: int) -> bool:
        """True when ``host:port`` may be reached whatever it resolves to."""
        name = host.lower().rstrip(".")
        return self.allow_all or name in self.hosts or (name, port) in self.origins

    def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be reached (its kind, e.g. "loopback"), or None when it may."""
        if any(address in network for network in self.networks):
            return None
        for candidate in _embedded(address):
            kind = _kind(candidate)
            if kind is not None and not any(candidate in network for network in self.networks):
                return kind
        return None


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The address and the IPv4 addresses it carries (mapped, 6to4, NAT64), each checked on its own."""
    if not isinstance(address, ipaddress.IPv6Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address, address.sixtofour]
    return [address]


def _kind(address: IPAddress) -> str | None:
    """The kind of a non-public address, in words; None for a public one."""
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("shared (carrier-grade NAT)", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-public", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def _clamped(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` shortened to the time left before the fetch deadline; raises ``expired`` past it."""
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise expired("the fetch deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every wait ends by the fetch deadline of the thread that uses it."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clamped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clamped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, _clamped(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves, checks every address against the policy, connects to a checked one."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._plain = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = [host] if self._policy.trusts_host(host, port) else self._permitted(host, port)
        error: Exception | None = None
        for address in addresses:
            try:
                stream = self._plain.connect_tcp(
                    address,
                    port,
                    timeout=_clamped(timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return _DeadlineStream(stream)
        raise error or httpcore.ConnectError(f"{host} has no address")

    def _permitted(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that the policy allows, in resolver order; refuses when none is."""
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            found = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
            found = [ipaddress.ip_address(info[4][0]) for info in infos]
        allowed, kinds = [], []
        for address in found:
            kind = self._policy.refusal(address)
            if kind is None:
                allowed.append(str(address))
            elif kind not in kinds:
                kinds.append(kind)
        if allowed:
            return list(dict.fromkeys(allowed))
        what = f"{host} is {_a(kinds)}" if literal is not None else f"{host} resolves to {_a(kinds)}"
        raise AddressRefused(
            f"refused to connect: {what}; loopback, private, link-local and other non-public addresses are "
            f"not fetched unless {ALLOW_SETTING} names the host or network"
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise AddressRefused("refused to connect to a unix socket")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _a(kinds: list[str]) -> str:
    words = " or ".join(kinds)
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words} address"


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport over the guarded network backend (no proxies from the environment)."""

    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        # httpx has no argument for a network backend: the pool it built is replaced by the same
        # pool over ours (same TLS context and limits as httpx's defaults).
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(policy),
        )
