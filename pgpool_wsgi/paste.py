"""PasteDeploy entry point: ``use = egg:pgpool_wsgi#pgpool`` (or ``egg:pgpool_wsgi``).

Options come from the filter's own section, and from ``[DEFAULT]`` with a
``pgpool.`` prefix; the section's own keys win. Strings are converted and
checked here, once, when the ini file is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .config import from_strings, validate
from .middleware import PgPoolMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

PREFIX = "pgpool."


def settings(global_conf: Mapping[str, Any], local_conf: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``[DEFAULT]`` ``pgpool.*`` keys and the section's keys; convert and check them."""
    merged = {k[len(PREFIX):]: v for k, v in global_conf.items() if k.startswith(PREFIX)}
    merged.update(local_conf)
    options = from_strings(merged)
    validate(options)
    return options


def filter_factory(global_conf: Mapping[str, Any], **local_conf: Any) -> Callable[[WSGIApplication], PgPoolMiddleware]:
    """``paste.filter_factory``: returns a function wrapping an app in the middleware."""
    options = settings(global_conf, local_conf)

    def make_filter(app: WSGIApplication) -> PgPoolMiddleware:
        return PgPoolMiddleware(app, **options)

    return make_filter
