"""Which requests the middleware answers or lets through without a connection.

``exclude_paths`` match whole path segments (``/cpu`` is ``/cpu`` and
``/cpu/...``, not ``/cpu_report``); a trailing ``*`` asks for a plain prefix
(``/static*``). Configured paths are compared in WSGI's form of
``PATH_INFO``: the request's bytes decoded as latin-1, so ``/café`` is
written the way a UTF-8 client sends it. ``stats_allow`` is a list of client
addresses and networks checked against ``REMOTE_ADDR``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def wsgi_path(path: str) -> str:
    """A configured (Unicode) path as it appears in ``PATH_INFO``: UTF-8 bytes seen as latin-1."""
    return path.encode("utf-8").decode("latin-1")


class PathRules:
    """``rules(path)``: does ``PATH_INFO`` fall under one of the configured paths?"""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in map(wsgi_path, patterns):
            if pattern.endswith("*"):
                prefixes.append(pattern[:-1])
                continue
            segment = pattern.rstrip("/")
            if segment:
                exact.add(segment)
            prefixes.append(segment + "/")  # "/" alone: every path
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def __call__(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._prefixes)


def networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """``["127.0.0.1", "10.0.0.0/8", "::1"]`` -> networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(spec.strip()) for spec in specs)


class AddressList:
    """``allows(REMOTE_ADDR)``: is the client in one of these networks?"""

    __slots__ = ("_networks",)

    def __init__(self, specs: Iterable[str]) -> None:
        self._networks = networks(specs)

    def allows(self, remote_addr: object) -> bool:
        if not isinstance(remote_addr, str):
            return False  # a unix socket or a server that does not say: not a listed address
        try:
            address = ipaddress.ip_address(remote_addr.strip())
        except ValueError:
            return False
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)  # ::ffff:127.0.0.1 on a dual-stack socket
        return any(a in net for a in candidates for net in self._networks if a.version == net.version)
