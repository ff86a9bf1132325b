"""Connection strings: where they come from, what we add, and how we show them.

The password never leaves this module in clear text: :class:`Target`
renders itself masked, :func:`mask` hides secrets in any DSN-like text, and
:meth:`Target.scrub` removes known secrets from a libpq error message before
it is logged or raised.

Everything is read when a connection is opened, as libpq reads ``PG*`` and
service files: the ``dsn`` option, else ``DATABASE_URL``. The pool is built
only after the same string, plus ``connect_kwargs`` and our defaults, passed
libpq's parser and the value checks below (nothing connects then).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.extensions

from . import _service
from .errors import ConfigError

MASK = "***"
SECRET_KEYS = ("password", "sslpassword")
_NOT_LIBPQ = frozenset({"connection_factory", "cursor_factory", "async", "async_"})  # psycopg2's own

# libpq knows the GSSAPI encryption option from version 12 on.
_HAS_GSSENCMODE = psycopg2.extensions.libpq_version() >= 120000

# -- masking ------------------------------------------------------------------

_URL_QUERY_SECRET = re.compile(r"([?&](?:ssl)?password=)[^&#\s'\"]*", re.IGNORECASE)
_KV_SECRET = re.compile(r"(?<![\w?&])((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s'\"]*)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(://[^:/@\s'\"]*:)[^@\s/'\"]*(@)")


def mask(text: str) -> str:
    """``text`` with every password-like value of a DSN or URL replaced by ``***``."""
    text = _URL_QUERY_SECRET.sub(rf"\g<1>{MASK}", text)
    text = _KV_SECRET.sub(rf"\g<1>{MASK}", text)
    return _URL_USERINFO.sub(rf"\g<1>{MASK}\g<2>", text)


def _scrub_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return mask(text)


def _secrets(*sources: Mapping[str, Any]) -> list[str]:
    found = {str(source[key]) for source in sources for key in SECRET_KEYS if source.get(key)}
    return sorted(found, key=len, reverse=True)


# -- parsing and checking (libpq's rules, without connecting) -------------------

_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslnegotiation": ("postgres", "direct"),
}
_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
             "tcp_user_timeout")
_INT = re.compile(r"\s*[-+]?[0-9]+\s*")
_INT_MAX = 2**31 - 1
# For "did you mean": libpq's parameters (the check itself is libpq's own parser).
_KNOWN = ("host", "hostaddr", "port", "dbname", "user", "password", "passfile", "require_auth", "options",
          "application_name", "fallback_application_name", "service", "target_session_attrs", "replication",
          "client_encoding", "krbsrvname", "gsslib", "gssdelegation", "requirepeer", "ssl_min_protocol_version",
          "ssl_max_protocol_version", "sslkey", "sslcert", "sslrootcert", "sslcrl", "sslcrldir", "sslsni",
          "sslcompression", "sslpassword", *_CHOICES, *_INTEGERS)


def _int_ok(text: str, low: int = -_INT_MAX - 1) -> bool:
    return bool(_INT.fullmatch(text)) and low <= int(text) <= _INT_MAX


def check_values(params: Mapping[str, str], source: str) -> None:
    """Values libpq would refuse at every connect: :class:`ConfigError` naming the key."""
    for key, value in params.items():
        expected = None
        if key in _CHOICES and value not in _CHOICES[key]:
            expected = "one of " + ", ".join(_CHOICES[key])
        elif key in _INTEGERS and not _int_ok(value):
            expected = f"an integer up to {_INT_MAX}"
        elif key == "port" and not all(p == "" or (_int_ok(p, 1) and int(p) <= 65535) for p in value.split(",")):
            expected = "a port number from 1 to 65535 (or a comma-separated list)"
        if expected is not None:
            raise ConfigError(f"{source}: {key}: got {mask(repr(value))}, expected {expected}")


def parse(dsn: str, source: str = "dsn") -> dict[str, str]:
    """The connection string's parameters; :class:`ConfigError` (password masked) if unparsable."""
    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error as exc:
        words = [w for s in _secret_words(dsn) for w in (s, *s.split()) if len(w) > 2]
        reason = _scrub_text(str(exc).strip(), sorted(set(words), key=len, reverse=True))
        raise ConfigError(
            f"{source}: cannot parse the connection string ({reason}); expected "
            "'key=value ...' pairs or a postgresql:// URL"
        ) from None


# Generous on purpose: in a string libpq cannot parse, a password may run up to the next "key=".
_KV_GENEROUS = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'?|.*?)(?=\s+\w+\s*=|\s*$)", re.IGNORECASE | re.S)


def _secret_words(text: str) -> list[str]:
    # The text of every password the masks would hide (also from a string libpq cannot parse).
    found = [m.group(1).strip("'") for m in _KV_GENEROUS.finditer(text)]
    for pattern in (_URL_QUERY_SECRET, _KV_SECRET, _URL_USERINFO):
        for match in pattern.finditer(text):
            start = match.end(1)
            end = match.start(2) if pattern is _URL_USERINFO else match.end()
            found.append(text[start:end].strip("'"))
    return [s for s in found if s]


def _libpq_kwargs(connect_kwargs: Mapping[str, Any]) -> dict[str, str]:
    """The keyword arguments psycopg2 turns into connection parameters, checked one by one."""
    params: dict[str, str] = {}
    for key, value in connect_kwargs.items():
        if key in _NOT_LIBPQ or value is None:
            continue
        try:
            params.update(psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(**{key: value})))
        except psycopg2.Error:
            close = difflib.get_close_matches(key, _KNOWN, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"connect_kwargs: {mask(repr(key))} is not a libpq connection parameter{hint}") from None
    check_values(params, "connect_kwargs")
    return params


# -- the target -------------------------------------------------------------------


class Target:
    """Where a pool connects: the ``dsn`` option (else ``DATABASE_URL``), ``connect_kwargs``, our defaults.

    Our defaults never override what libpq would take from the connection
    string, ``connect_kwargs``, a service file, ``options``/``PGOPTIONS`` or the
    environment: ``connect_timeout`` and ``gssencmode=disable`` are added only
    when nothing else sets them (and not at all under a service whose file we
    cannot read), the pid goes in ``fallback_application_name``.
    """

    __slots__ = ("_option", "_kwargs", "_libpq", "connect_timeout")

    def __init__(self, dsn: str | None, connect_kwargs: dict[str, Any] | None = None,
                 connect_timeout: int = 5) -> None:
        self._option = dsn or None
        self._kwargs = dict(connect_kwargs or {})
        self.connect_timeout = connect_timeout
        self._libpq = _libpq_kwargs(self._kwargs)
        raw, params, extra = self._plan(pid=os.getpid())
        check_values(params, self._source())
        try:  # libpq's own parser on the whole, as psycopg2.connect will hand it over
            psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(raw, **self._libpq, **extra))
        except psycopg2.Error as exc:
            raise ConfigError(f"{self._source()}: {self.scrub(str(exc).strip())}") from None

    def _source(self) -> str:
        return "dsn" if self._option else "DATABASE_URL"

    def _raw(self) -> str:
        # Read at each connect, like the PG* variables libpq reads itself.
        return self._option or os.environ.get("DATABASE_URL", "")

    def _resolve(self) -> tuple[dict[str, str], dict[str, str], str | None, bool]:
        """(explicit, as libpq resolves them, the service, whether we know what it sets)."""
        explicit = {**parse(self._raw(), self._source()), **self._libpq}
        service = _service.service_of(explicit)
        sets = _service.lookup(service) if service else {}
        return explicit, {**_service.from_environment(), **(sets or {}), **explicit}, service, sets is not None

    def _plan(self, pid: int) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(connection string, its parameters, the defaults we add)."""
        explicit, resolved, _, known = self._resolve()
        extra: dict[str, Any] = {}
        if not known:
            return self._raw(), explicit, extra  # a service we cannot read may set anything
        if "connect_timeout" not in resolved:
            extra["connect_timeout"] = self.connect_timeout
        if "application_name" not in resolved.get("options", "") and "fallback_application_name" not in resolved:
            # An explicit application_name beats it; "-c application_name" in options would not.
            extra["fallback_application_name"] = f"pgpool_wsgi pid={pid}"
        if _HAS_GSSENCMODE and "gssencmode" not in resolved:
            # libpq's GSSAPI set-up takes a lock that a fork can leave held.
            extra["gssencmode"] = "disable"
        return self._raw(), explicit, extra

    def connect(self, pid: int) -> Any:
        """Open a new connection (network I/O: never call under a lock)."""
        try:
            raw, _, extra = self._plan(pid)
        except ConfigError as exc:  # DATABASE_URL changed since the pool was built
            raise psycopg2.OperationalError(str(exc)) from None
        return psycopg2.connect(raw, **extra, **self._kwargs)  # extra holds no key the others set

    def scrub(self, text: str) -> str:
        """``text`` with every known password, and anything password-like, replaced by ``***``."""
        try:
            explicit, resolved, _, _ = self._resolve()
        except ConfigError:
            explicit = resolved = {}
        return _scrub_text(text, _secrets(explicit, resolved, self._kwargs))

    def describe(self) -> str:
        """Where we connect, as libpq will resolve it: ``user@host:port/dbname (service name)``."""
        try:
            _, p, service, _ = self._resolve()
        except ConfigError:
            return "(an unparsable DATABASE_URL)"
        host = p.get("host") or p.get("hostaddr") or "local socket"
        user = p.get("user") or "(default user)"
        text = f"{user}@{host}:{p.get('port') or '5432'}/{p.get('dbname') or user}"
        return mask(f"{text} (service {service})" if service else text)

    def masked(self) -> str:
        """The connection string and ``connect_kwargs`` as key=value pairs, secrets masked."""
        try:
            explicit = self._resolve()[0]
        except ConfigError:
            return "(an unparsable DATABASE_URL)"
        return mask(" ".join(f"{k}={MASK if k in SECRET_KEYS else v}" for k, v in explicit.items()))

    def __repr__(self) -> str:
        return f"<Target {self.masked()!r}>"
