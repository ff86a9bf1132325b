"""PasteDeploy entry point: ``use = egg:pgpool_wsgi#pgpool`` (or ``egg:pgpool_wsgi``).

Options come from the filter's own section, and from ``[DEFAULT]`` with a
``pgpool.`` prefix; the section's own keys win. Strings are converted and
checked here, once, when the ini file is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .config import POOL, from_strings, validate
from .errors import ConfigError
from .middleware import PgPoolMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

PREFIX = "pgpool."


def settings(global_conf: Mapping[str, Any], local_conf: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``[DEFAULT]`` ``pgpool.*`` keys and the section's keys; convert and check them.

    ``<name>.<option>`` keys configure a named pool (``replica.dsn = ...``).
    """
    merged = {k[len(PREFIX):]: v for k, v in global_conf.items() if k.startswith(PREFIX)}
    merged.update(local_conf)
    named: dict[str, dict[str, Any]] = {}
    for key in [k for k in merged if "." in k]:
        name, option = key.split(".", 1)
        named.setdefault(name, {})[option] = merged.pop(key)
    options = from_strings(merged)
    if named:
        options["pools"] = {name: _pool_settings(name, values) for name, values in named.items()}
    validate(options)
    return options


def _pool_settings(name: str, values: dict[str, Any]) -> dict[str, Any]:
    try:
        converted = from_strings(values)
        validate(converted, (POOL,))
    except ConfigError as exc:
        raise ConfigError(f"{name}.{exc}") from None
    return converted


def filter_factory(global_conf: Mapping[str, Any], **local_conf: Any) -> Callable[[WSGIApplication], PgPoolMiddleware]:
    """``paste.filter_factory``: returns a function wrapping an app in the middleware."""
    options = settings(global_conf, local_conf)

    def make_filter(app: WSGIApplication) -> PgPoolMiddleware:
        return PgPoolMiddleware(app, **options)

    return make_filter
