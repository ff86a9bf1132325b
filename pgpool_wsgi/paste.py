"""PasteDeploy entry point: ``use = egg:pgpool_wsgi#pgpool`` (or ``egg:pgpool_wsgi``).

Options come from the filter's own section, and from ``[DEFAULT]`` with a
``pgpool.`` prefix; the section's own keys win. Strings are converted and
checked here, once, when the ini file is loaded.

PasteDeploy leaves a section's key out of ``local_conf`` when ``[DEFAULT]``
defines the same key. So when ``[DEFAULT]`` holds an option name, the
section's own value is read back from the ini file (``global_conf["__file__"]``)
with PasteDeploy's parser; when that cannot be told apart (two of our
filters setting it differently) or resolved, it is a :class:`ConfigError`,
never a silent fallback.
"""

from __future__ import annotations

import configparser
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._dsn import mask
from .config import BY_NAME, POOL, POOL_OPTIONS, from_strings, validate
from .errors import ConfigError
from .middleware import PgPoolMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

PREFIX = "pgpool."
_FILTER_SECTIONS = ("filter:", "filter-app:")
_MISSING = object()


def _is_option(key: str) -> bool:
    _, dot, option = key.partition(".")
    return key in BY_NAME or (bool(dot) and option in POOL_OPTIONS)


def _our_sections(path: str, global_conf: Mapping[str, Any]) -> tuple[configparser.ConfigParser, list[str]]:
    """PasteDeploy's parser for the file, and its filter sections that use pgpool_wsgi."""
    from paste.deploy.loadwsgi import NicerConfigParser  # type: ignore[import-untyped]

    defaults = {k: v for k, v in global_conf.items() if isinstance(v, str)}
    parser: configparser.ConfigParser = NicerConfigParser(path, defaults=defaults)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # as PasteDeploy: keys keep their case
    with open(path) as f:
        parser.read_file(f)
    ours = [s for s in parser.sections() if s.startswith(_FILTER_SECTIONS)
            and "pgpool_wsgi" in parser.get(s, "use", raw=True, fallback="")]
    return parser, ours


def _own_value(parser: configparser.ConfigParser, section: str, key: str) -> object:
    """The section's own value of ``key`` (not [DEFAULT]'s), interpolated as PasteDeploy would."""
    if key not in parser._sections.get(section, {}):  # type: ignore[attr-defined]
        return _MISSING
    try:
        return parser.get(section, key)
    except configparser.InterpolationDepthError:
        raise ConfigError(
            f"{key}: [{section}] sets {key} = ...%({key})s...: PasteDeploy hides a filter key that [DEFAULT] "
            f"also defines, and the value refers to itself. Name the [DEFAULT] value differently "
            f"(e.g. db_{key} = ...) and write {key} = %(db_{key})s ..."
        ) from None
    except configparser.Error as exc:
        raise ConfigError(f"{key}: [{section}] cannot interpolate the value ({type(exc).__name__}); "
                          "write a literal '%' as '%%' in an ini file, e.g. %%40 in a URL") from None


def _holds(parser: configparser.ConfigParser, section: str, local_conf: Mapping[str, Any]) -> bool:
    try:
        return all(_own_value(parser, section, k) == v for k, v in local_conf.items())
    except ConfigError:  # another section's value that does not resolve: not ours
        return False


def shadowed(global_conf: Mapping[str, Any], local_conf: Mapping[str, Any]) -> dict[str, str]:
    """Our section's keys that PasteDeploy dropped because [DEFAULT] defines them too."""
    names = [k for k in global_conf if _is_option(k) and not k.startswith(PREFIX) and k not in local_conf]
    path = global_conf.get("__file__")
    if not names or not isinstance(path, str):
        return {}  # not loaded from an ini file: there is no section to shadow
    parser, sections = _our_sections(path, global_conf)
    # Our section is one whose own values are exactly what PasteDeploy handed us.
    sections = [s for s in sections if _holds(parser, s, local_conf)]
    if not sections:
        raise ConfigError(
            f"{names[0]}: [DEFAULT] defines {', '.join(names)}, which PasteDeploy hides from a filter section "
            f"that sets them too, and this filter's section is not in {path} to look: rename those "
            "[DEFAULT] keys or give them the pgpool. prefix"
        )
    found: dict[str, str] = {}
    for key in names:
        values = {s: _own_value(parser, s, key) for s in sections}
        distinct = {id(v) if v is _MISSING else v for v in values.values()}
        if len(distinct) > 1:
            raise ConfigError(
                f"{key}: [DEFAULT] defines {key}, so PasteDeploy hides it from {', '.join(f'[{s}]' for s in values)}, "
                "which set it differently: rename the [DEFAULT] key or use a pgpool. prefix there"
            )
        value = next(iter(values.values()), _MISSING)
        if isinstance(value, str):
            found[key] = value
    return found


def settings(global_conf: Mapping[str, Any], local_conf: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``[DEFAULT]`` ``pgpool.*`` keys and the section's keys; convert and check them.

    ``<name>.<option>`` keys configure a named pool (``replica.dsn = ...``).
    """
    merged = {k[len(PREFIX):]: v for k, v in global_conf.items() if k.startswith(PREFIX)}
    merged.update(shadowed(global_conf, local_conf))
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
        validate({"pools": {name: {}}}, ("middleware",))
    except ConfigError:
        raise ConfigError(f"{mask(name)}.{next(iter(values))}: {mask(repr(name))} is not a pool name: use "
                          "lowercase letters, digits and '_' (not 'conn' or 'handle')") from None
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
