"""The one table of options: names, defaults, checks, ini conversions, docs.

Everything that accepts options goes through :func:`validate` (Python values)
or :func:`from_strings` (ini values, then :func:`validate`). The README's
configuration table is :func:`markdown_table`; a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _dsn as _dsn_module
from . import _paths as _paths_module
from .errors import ConfigError

POOL = "pool"
MIDDLEWARE = "middleware"


class _Bad(Exception):
    """A value is wrong; the message says what was expected."""


@dataclass(frozen=True)
class Option:
    name: str
    scope: str  # POOL or MIDDLEWARE
    default: Any
    check: Callable[[Any], Any]  # Python value -> normalised value, or raise _Bad
    parse: Callable[[str], Any] | None  # ini string -> Python value; None: Python only
    kind: str  # what the README calls the type
    doc: str


# -- checks (Python values) --------------------------------------------------


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(expected)
        if value < low or (high is not None and value > high):
            raise _Bad(expected)
        return value

    return check


# A longer wait makes threading's waits raise OverflowError (and leave a ghost waiter).
_SECONDS_MAX = threading.TIMEOUT_MAX


def _seconds(low: float = 0.0, *, above: bool = False) -> Callable[[Any], float]:
    expected = f"a number of seconds {'>' if above else '>='} {low:g}, at most {_SECONDS_MAX:.0f}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(expected)
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            raise _Bad(expected) from None
        if not low <= number <= _SECONDS_MAX or (above and number == low):
            raise _Bad(expected)
        return number

    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    expected = "one of " + ", ".join(repr(c) for c in choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise _Bad(expected)
        return value.strip().lower()

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("True or False")
    return value


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty string or None")
    return value.strip()


def _name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,40}", value):
        raise _Bad("1-40 letters, digits, '_', '-' or '.'")
    return value


def _path_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Bad("a URL path starting with '/', or None")
    return value


def _paths(value: Any) -> tuple[str, ...]:
    expected = "a list of URL path prefixes, each starting with '/' (whole segments; '*' only at the end)"
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _Bad(expected)
    paths = tuple(value)
    if not all(isinstance(p, str) and p.startswith("/") and "*" not in p[:-1] for p in paths):
        raise _Bad(expected)
    return paths


def _addresses_or_none(value: Any) -> tuple[str, ...] | None:
    expected = "a non-empty list of IP addresses or networks, e.g. ['127.0.0.1', '10.0.0.0/8', '::1'], or None"
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _Bad(expected)
    specs = tuple(value)
    if not specs or not all(isinstance(s, str) for s in specs):
        raise _Bad(expected)
    try:
        _paths_module.networks(specs)
    except ValueError as exc:
        raise _Bad(f"{expected} ({exc})") from None
    return specs


def _mapping_or_none(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _Bad("a dict of keyword arguments for psycopg2.connect, or None")
    return dict(value)


def _callable_or_none(value: Any) -> Callable[[Any], Any] | None:
    if value is not None and not callable(value):
        raise _Bad("a callable taking the new connection, or None")
    return value  # type: ignore[no-any-return]


_POOL_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")
_RESERVED_NAMES = {"conn", "handle"}


def _pools(value: Any) -> dict[str, Any] | None:
    # Values may hold DSNs: the messages show names and types, never values.
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _Bad(f"a {type(value).__name__}; expected a dict of {{name: ConnectionPool or dict of pool options}}")
    for name, spec in value.items():
        if not isinstance(name, str) or not _POOL_NAME.fullmatch(name) or name in _RESERVED_NAMES:
            raise _Bad(f"a pool named {_dsn_module.mask(repr(name))}; expected a name of lowercase letters, "
                       "digits and '_' (at most 31, not 'conn' or 'handle')")
        if not isinstance(spec, Mapping) and not hasattr(spec, "getconn"):
            raise _Bad(f"a {type(spec).__name__} for pool {name!r}; expected a ConnectionPool or a dict of "
                       "pool options")
    return dict(value)


def _dsn(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Bad("a libpq connection string or postgresql:// URL")
    if value:
        _dsn_module.parse(value)  # raises ConfigError, password masked
    return value or None


# -- ini conversions (strings) -----------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)")


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Bad("true/false, yes/no, on/off or 1/0")


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _Bad("an integer") from None


def parse_seconds(text: str) -> float:
    """``"5"``, ``"2.5s"``, ``"250ms"``, ``"10min"``, ``"1h"``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or match.group(2) not in {"", *_UNITS}:
        raise _Bad("a number of seconds, optionally with a unit: ms, s, min or h")
    return float(match.group(1)) * _UNITS.get(match.group(2), 1.0)


def parse_none(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() in {"", "none"} else text


def parse_paths(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def parse_words_or_none(text: str) -> tuple[str, ...] | None:
    words = tuple(text.split())
    return None if not words or words == ("none",) else words


def parse_callable(text: str) -> Callable[[Any], Any] | None:
    """``"package.module:function"`` -> that function."""
    spec = text.strip()
    if spec.lower() in {"", "none"}:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _Bad("'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise _Bad(f"'package.module:function' that can be imported ({exc})") from None
    return target  # type: ignore[no-any-return]


def _str(text: str) -> str:
    return text.strip()


# -- the table ------------------------------------------------------------------

OPTIONS: tuple[Option, ...] = (
    Option("dsn", POOL, None, _dsn, parse_none, "string",
           "libpq connection string or postgresql:// URL; unset: `DATABASE_URL`, then libpq's `PG*` variables "
           "and service file (all read when a connection is opened)"),
    Option("min_size", POOL, 0, _integer(0), parse_int, "int",
           "connections each process keeps open once it has used the pool; each return opens at most one "
           "missing connection, after that request's own connection is back"),
    Option("max_size", POOL, 10, _integer(1), parse_int, "int",
           "most connections one process may hold"),
    Option("timeout", POOL, 30.0, _seconds(), parse_seconds, "seconds",
           "how long a checkout waits for a free connection before `PoolTimeout` (the middleware answers 503)"),
    Option("max_waiting", POOL, 0, _integer(0), parse_int, "int",
           "refuse a checkout at once when this many are already waiting; 0 = no limit"),
    Option("connect_timeout", POOL, 5, _integer(1, 2**31 - 1), parse_int, "int seconds",
           "libpq `connect_timeout` unless the DSN, `connect_kwargs`, a service file or `PGCONNECT_TIMEOUT` "
           "sets one (libpq waits at least 2 s; at most 2147483647)"),
    Option("max_lifetime", POOL, 3600.0, _seconds(), parse_seconds, "seconds",
           "replace a connection this old (minus up to 10% jitter); 0 = never"),
    Option("max_idle", POOL, 600.0, _seconds(), parse_seconds, "seconds",
           "close a connection idle this long; 0 = never"),
    Option("check", POOL, "auto", _choice("auto", "ping", "none"), _str, "auto, ping, none",
           "liveness test at checkout: `auto` looks for input on the idle socket (no round trip; one "
           "poll() over all sockets serves a process for 1 ms), "
           "`ping` also runs `SELECT 1` after `ping_after` idle seconds, `none` skips it"),
    Option("ping_after", POOL, 10.0, _seconds(), parse_seconds, "seconds",
           "with `check = ping`: idle time after which a checkout pings"),
    Option("reset_sql", POOL, None, _text_or_none, parse_none, "string",
           "SQL run (in autocommit) when a connection comes back, e.g. `DISCARD ALL`; "
           "without it committed `SET`s survive"),
    Option("leak_timeout", POOL, 60.0, _seconds(), parse_seconds, "seconds",
           "warn once about a connection held longer than this; 0 = never"),
    Option("leak_debug", POOL, False, _boolean, parse_bool, "bool",
           "record where each connection was checked out and put it in the leak warning"),
    Option("check_capacity", POOL, True, _boolean, parse_bool, "bool",
           "warn once at startup when workers x `max_size` exceeds the server's `max_connections` "
           "(minus reserved); turn off behind PgBouncer"),
    Option("name", POOL, "pgpool", _name, _str, "string",
           "the pool's name in log lines, errors and stats"),
    Option("connect_kwargs", POOL, None, _mapping_or_none, None, "dict",
           "extra keyword arguments for `psycopg2.connect` (Python only), e.g. `connection_factory`"),
    Option("configure", POOL, None, _callable_or_none, parse_callable, "callable",
           "called with each new connection once; in ini: `package.module:function`"),
    Option("transaction", MIDDLEWARE, "manual", _choice("manual", "commit", "autocommit"), _str,
           "manual, commit, autocommit",
           "`manual`: roll back what the app left uncommitted; `commit`: commit when the response "
           "succeeded (< 400) else roll back; `autocommit`: autocommit for the request"),
    Option("checkout", MIDDLEWARE, "eager", _choice("eager", "lazy"), _str, "eager, lazy",
           "`eager`: a connection is in `environ['pgpool.conn']` before the app runs; "
           "`lazy`: checked out on first use of `environ['pgpool.handle'].conn`"),
    Option("exclude_paths", MIDDLEWARE, (), _paths, parse_paths, "paths",
           "URL paths that never check out, whole segments (`/cpu`: `/cpu` and `/cpu/...`, not "
           "`/cpu_report`); a trailing `*` for a plain prefix (`/static*`); whitespace-separated in ini"),
    Option("stats_path", MIDDLEWARE, None, _path_or_none, parse_none, "path",
           "serve this worker's `pool.stats()` as JSON at this path (GET and HEAD only); unset = off. "
           "It bypasses your app's authentication: see Security"),
    Option("stats_allow", MIDDLEWARE, None, _addresses_or_none, parse_words_or_none, "addresses",
           "client addresses/networks (`REMOTE_ADDR`) allowed to read `stats_path`, e.g. "
           "`127.0.0.1 10.0.0.0/8 ::1` (a list in Python); others get 403; unset = everyone"),
    Option("retry_after", MIDDLEWARE, 1, _integer(0, 3600), parse_int, "int seconds",
           "the `Retry-After` header of the 503 answer"),
    Option("pools", MIDDLEWARE, None, _pools, None, "dict",
           "more pools by name, e.g. a read replica: `{name: ConnectionPool or dict of pool options}`; "
           "in ini `<name>.<option>` keys; each request gets a lazy handle at `environ['pgpool.<name>']`"),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
POOL_OPTIONS = frozenset(o.name for o in OPTIONS if o.scope == POOL)
MIDDLEWARE_OPTIONS = frozenset(o.name for o in OPTIONS if o.scope == MIDDLEWARE)


_SECRET_BEARING = frozenset({"dsn", "pools", "connect_kwargs"})


def _problem(name: str, value: Any, bad: _Bad) -> ConfigError:
    """The message for a bad value: never the value of an option that may hold a DSN or a password."""
    if name == "pools":
        return ConfigError(f"{name}: got {bad}")
    shown = f"a {type(value).__name__}" if name in _SECRET_BEARING else _dsn_module.mask(repr(value))
    return ConfigError(f"{name}: got {shown}, expected {bad}")


def _unknown(name: str, allowed: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{_dsn_module.mask(name)}: unknown option{hint}")


def validate(options: Mapping[str, Any], scopes: Iterable[str] = (POOL, MIDDLEWARE)) -> dict[str, Any]:
    """Check Python values; return every option of ``scopes`` with defaults filled in.

    Raises :class:`ConfigError` naming the key, the value and what was expected.
    """
    wanted = [o for o in OPTIONS if o.scope in set(scopes)]
    allowed = {o.name for o in wanted}
    for name in options:
        if name not in allowed:
            raise _unknown(name, allowed)
    result: dict[str, Any] = {}
    for option in wanted:
        if option.name not in options:
            result[option.name] = option.default
            continue
        value = options[option.name]
        try:
            result[option.name] = option.check(value)
        except _Bad as bad:
            raise _problem(option.name, value, bad) from None
    if "min_size" in result and result["min_size"] > result["max_size"]:
        raise ConfigError(
            f"min_size: got {result['min_size']!r}, expected at most max_size ({result['max_size']!r})"
        )
    return result


def from_strings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Convert ini strings to Python values by the table (no defaults added).

    Values that are not strings (a dict put in by Python code) pass through.
    """
    converted: dict[str, Any] = {}
    for name, text in settings.items():
        option = BY_NAME.get(name)
        if option is None:
            raise _unknown(name, BY_NAME)
        if option.parse is None:
            raise ConfigError(f"{name}: can only be given from Python, not in an ini file")
        if not isinstance(text, str):
            converted[name] = text
            continue
        try:
            converted[name] = option.parse(text)
        except _Bad as bad:
            raise _problem(name, text, bad) from None
    return converted


def _default_text(option: Option) -> str:
    value = option.default
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table() -> str:
    """The README's configuration table, made from :data:`OPTIONS`."""
    rows = ["| option | applies to | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for o in OPTIONS:
        rows.append(f"| `{o.name}` | {o.scope} | {o.kind} | {_default_text(o)} | {o.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m pgpool_wsgi.config > the README's table
    print(markdown_table())
