"""Connection strings: where they come from, what we add, and how we show them.

The password never leaves this module in clear text: :class:`Target`
renders itself masked and :meth:`Target.scrub` removes secrets from any text
(a libpq error message, say) before it is logged or raised.
"""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg2
import psycopg2.extensions

from .errors import ConfigError

MASK = "***"

# libpq knows the GSSAPI encryption option from version 12 on.
_HAS_GSSENCMODE = psycopg2.extensions.libpq_version() >= 120000

# Text after "password=" (quoted, or up to the next "key="), and a URL's password.
_KV_SECRET = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'?|.*?)(?=\s+\w+\s*=|\s*$)", re.IGNORECASE | re.S)
_URL_SECRET = re.compile(r"://[^:/@\s]*:([^@\s]*)@")


def _secret_words(text: str) -> list[str]:
    found = [m.group(1).strip("'") for m in _KV_SECRET.finditer(text)]
    found += [m.group(1) for m in _URL_SECRET.finditer(text)]
    words = set()
    for secret in found:
        if secret:
            words.add(secret)
            words.update(w for w in secret.split() if len(w) > 2)
    return sorted(words, key=len, reverse=True)


def _scrub_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def parse(dsn: str) -> dict[str, str]:
    """The connection string's parameters; :class:`ConfigError` (password masked) if unparsable."""
    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error as exc:
        reason = _scrub_text(str(exc).strip(), _secret_words(dsn))
        raise ConfigError(
            f"dsn: cannot parse the connection string ({reason}); expected "
            "'key=value ...' pairs or a postgresql:// URL"
        ) from None


def resolve(dsn: str | None) -> str:
    """The ``dsn`` option, else ``DATABASE_URL``, else "" (libpq's ``PG*`` variables)."""
    if dsn:
        return dsn
    return os.environ.get("DATABASE_URL", "")


class Target:
    """A parsed, validated connection string plus the defaults we add to it."""

    __slots__ = ("_dsn", "_params", "_kwargs", "_secrets", "connect_timeout")

    def __init__(self, dsn: str | None, connect_kwargs: dict[str, Any] | None = None,
                 connect_timeout: int = 5) -> None:
        raw = resolve(dsn)
        self._dsn = raw
        self._params = parse(raw)
        self._kwargs = dict(connect_kwargs or {})
        self.connect_timeout = connect_timeout
        secrets = [self._params.get("password"), self._kwargs.get("password"), os.environ.get("PGPASSWORD")]
        self._secrets = sorted({str(s) for s in secrets if s}, key=len, reverse=True)

    def _is_set(self, key: str, env: str) -> bool:
        return key in self._params or key in self._kwargs or bool(os.environ.get(env))

    def connect(self, pid: int) -> Any:
        """Open a new connection (network I/O: never call under a lock)."""
        extra: dict[str, Any] = {}
        if not self._is_set("connect_timeout", "PGCONNECT_TIMEOUT"):
            extra["connect_timeout"] = self.connect_timeout
        if not self._is_set("application_name", "PGAPPNAME"):
            extra["application_name"] = f"pgpool_wsgi pid={pid}"
        if _HAS_GSSENCMODE and not self._is_set("gssencmode", "PGGSSENCMODE"):
            # libpq's GSSAPI set-up takes a lock that a fork can leave held.
            extra["gssencmode"] = "disable"
        return psycopg2.connect(self._dsn, **extra, **self._kwargs)

    def scrub(self, text: str) -> str:
        """``text`` with every known password replaced by ``***``."""
        return _scrub_text(text, self._secrets) if self._secrets else text

    def describe(self) -> str:
        """Where we connect, for messages: ``user@host:port/dbname``."""
        p = {**self._params, **{k: str(v) for k, v in self._kwargs.items() if isinstance(v, (str, int))}}
        host = p.get("host") or p.get("hostaddr") or os.environ.get("PGHOST") or "local socket"
        port = p.get("port") or os.environ.get("PGPORT") or "5432"
        user = p.get("user") or os.environ.get("PGUSER") or "(default user)"
        dbname = p.get("dbname") or os.environ.get("PGDATABASE") or user
        return f"{user}@{host}:{port}/{dbname}"

    def masked(self) -> str:
        """The connection string as key=value pairs with the password masked."""
        shown = {k: (MASK if k == "password" else v) for k, v in self._params.items()}
        return " ".join(f"{k}={v}" for k, v in shown.items())

    def __repr__(self) -> str:
        return f"<Target {self.masked()!r}>"
