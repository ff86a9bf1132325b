"""The option table: validation of Python values and ini strings, and the README's copy of it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pgpool_wsgi import ConfigError, ConnectionPool, PgPoolMiddleware, config
from pgpool_wsgi.paste import filter_factory

README = Path(__file__).parents[1] / "README.md"


def noop_app(environ: Any, start_response: Any) -> list[bytes]:
    return []


BAD_KWARGS = [
    pytest.param({"max_sise": 3}, "max_sise", "did you mean 'max_size'", id="unknown-close-match"),
    pytest.param({"bogus": 1}, "bogus", "unknown option", id="unknown-no-match"),
    pytest.param({"max_size": 0}, "max_size", "expected an integer >= 1", id="max_size-zero"),
    pytest.param({"max_size": "10"}, "max_size", "expected an integer", id="max_size-string"),
    pytest.param({"max_size": 2.5}, "max_size", "expected an integer", id="max_size-float"),
    pytest.param({"max_size": True}, "max_size", "expected an integer", id="max_size-bool"),
    pytest.param({"min_size": -1}, "min_size", "expected an integer >= 0", id="min_size-negative"),
    pytest.param({"min_size": 5, "max_size": 2}, "min_size", "at most max_size", id="min-above-max"),
    pytest.param({"timeout": -1}, "timeout", "seconds >= 0", id="timeout-negative"),
    pytest.param({"timeout": float("nan")}, "timeout", "seconds", id="timeout-nan"),
    pytest.param({"timeout": "5"}, "timeout", "seconds", id="timeout-string"),
    # threading.TIMEOUT_MAX: a longer wait raises OverflowError inside the wait.
    pytest.param({"timeout": 1e10}, "timeout", "at most", id="timeout-above-TIMEOUT_MAX"),
    pytest.param({"max_lifetime": 1e10}, "max_lifetime", "at most", id="max_lifetime-above-TIMEOUT_MAX"),
    pytest.param({"max_idle": 1e300}, "max_idle", "at most", id="max_idle-huge"),
    pytest.param({"ping_after": 1e10}, "ping_after", "at most", id="ping_after-huge"),
    pytest.param({"leak_timeout": 1e10}, "leak_timeout", "at most", id="leak_timeout-huge"),
    # libpq's own limit (INT_MAX): 2**31 built, then failed every connect.
    pytest.param({"connect_timeout": 2**31}, "connect_timeout", "integer from 1 to 2147483647",
                 id="connect_timeout-above-INT_MAX"),
    pytest.param({"connect_timeout": 0}, "connect_timeout", "integer from 1", id="connect_timeout-zero"),
    pytest.param({"max_waiting": -2}, "max_waiting", "integer >= 0", id="max_waiting-negative"),
    pytest.param({"max_lifetime": -5}, "max_lifetime", "seconds", id="max_lifetime-negative"),
    pytest.param({"max_idle": "1h"}, "max_idle", "seconds", id="max_idle-string-in-python"),
    pytest.param({"check": "pong"}, "check", "'auto', 'ping', 'none'", id="check-unknown"),
    pytest.param({"ping_after": -1}, "ping_after", "seconds", id="ping_after-negative"),
    pytest.param({"reset_sql": ""}, "reset_sql", "non-empty string", id="reset_sql-empty"),
    pytest.param({"leak_timeout": -1}, "leak_timeout", "seconds", id="leak_timeout-negative"),
    pytest.param({"leak_debug": "yes"}, "leak_debug", "True or False", id="leak_debug-string"),
    pytest.param({"name": "has space"}, "name", "letters", id="name-space"),
    pytest.param({"connect_kwargs": ["x"]}, "connect_kwargs", "dict", id="connect_kwargs-list"),
    pytest.param({"configure": "not callable"}, "configure", "callable", id="configure-not-callable"),
    pytest.param({"dsn": 42}, "dsn", "connection string", id="dsn-not-string"),
    pytest.param({"dsn": "host=x port"}, "dsn", "cannot parse", id="dsn-unparsable"),
    pytest.param({"transaction": "comit"}, "transaction", "'manual', 'commit', 'autocommit'", id="transaction"),
    pytest.param({"checkout": "later"}, "checkout", "'eager', 'lazy'", id="checkout-unknown"),
    pytest.param({"exclude_paths": "/static"}, "exclude_paths", "list of URL path prefixes", id="paths-string"),
    pytest.param({"exclude_paths": ["static"]}, "exclude_paths", "starting with '/'", id="paths-no-slash"),
    pytest.param({"stats_path": "stats"}, "stats_path", "starting with '/'", id="stats_path-relative"),
    pytest.param({"retry_after": -1}, "retry_after", "integer from 0 to 3600", id="retry_after-negative"),
]

BAD_INI = [
    pytest.param({"leak_debug": "ture"}, "leak_debug", "got 'ture', expected true/false", id="ini-bool-typo"),
    pytest.param({"max_size": "ten"}, "max_size", "got 'ten', expected an integer", id="ini-int-word"),
    pytest.param({"max_size": "0"}, "max_size", "got 0, expected an integer >= 1", id="ini-int-range"),
    pytest.param({"timeout": "5 parsecs"}, "timeout", "unit: ms, s, min or h", id="ini-unknown-unit"),
    pytest.param({"timeout": "-3s"}, "timeout", "expected a number of seconds", id="ini-negative-seconds"),
    pytest.param({"timeout": "1e10"}, "timeout", "at most", id="ini-timeout-above-TIMEOUT_MAX"),
    pytest.param({"connect_timeout": "2147483648"}, "connect_timeout", "to 2147483647", id="ini-connect_timeout-big"),
    pytest.param({"connect_kwargs": "{}"}, "connect_kwargs", "only be given from Python", id="ini-python-only"),
    pytest.param({"configure": "nosuchmodule_xyz:fn"}, "configure", "can be imported", id="ini-import-fails"),
    pytest.param({"configure": "os.path"}, "configure", "'package.module:function'", id="ini-no-colon"),
    pytest.param({"maxsize": "3"}, "maxsize", "did you mean 'max_size'", id="ini-unknown-key"),
    pytest.param({"check": "sometimes"}, "check", "got 'sometimes'", id="ini-check"),
    pytest.param({"min_size": "4", "max_size": "2"}, "min_size", "at most max_size", id="ini-min-above-max"),
    pytest.param({"dsn": "postgresql://u:hunter2@h:5432/db?bogus_opt=1"}, "dsn", "cannot parse", id="ini-bad-dsn"),
]


@pytest.mark.parametrize(("options", "key", "expected"), BAD_KWARGS)
def test_bad_python_options_name_the_key(options, key, expected):
    with pytest.raises(ConfigError) as info:
        PgPoolMiddleware(noop_app, **options)
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    assert expected in message


@pytest.mark.parametrize(("settings", "key", "expected"), BAD_INI)
def test_bad_ini_settings_name_the_key(settings, key, expected):
    with pytest.raises(ConfigError) as info:
        filter_factory({}, **settings)
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    assert expected in message
    assert "hunter2" not in message


def test_every_seconds_option_is_capped_at_timeout_max():
    import threading

    seconds = [o.name for o in config.OPTIONS if o.kind == "seconds"]
    assert len(seconds) >= 5
    for name in seconds:
        assert config.validate({name: threading.TIMEOUT_MAX})[name] == threading.TIMEOUT_MAX
        with pytest.raises(ConfigError, match=rf"^{name}: got .*at most"):
            config.validate({name: threading.TIMEOUT_MAX * 2})


def test_there_are_at_least_25_bad_configurations():
    assert len(BAD_KWARGS) + len(BAD_INI) >= 25


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 5.0), ("2.5", 2.5), ("250ms", 0.25), ("3s", 3.0), ("1.5 min", 90.0), ("2h", 7200.0), ("10m", 600.0)],
)
def test_durations(text, seconds):
    assert config.parse_seconds(text) == seconds


@pytest.mark.parametrize(("text", "value"), [("true", True), ("Yes", True), ("on", True), ("1", True),
                                             ("false", False), ("NO", False), ("off", False), ("0", False)])
def test_strict_booleans(text, value):
    assert config.parse_bool(text) is value


def test_ini_conversion_builds_the_right_values():
    options = config.from_strings({
        "max_size": "12", "timeout": "750ms", "leak_debug": "yes", "exclude_paths": "/a /b\n/c",
        "stats_path": "/_pool", "reset_sql": "DISCARD ALL", "configure": "tests.test_config:noop_app",
        "dsn": "none",
    })
    assert options == {"max_size": 12, "timeout": 0.75, "leak_debug": True, "exclude_paths": ("/a", "/b", "/c"),
                       "stats_path": "/_pool", "reset_sql": "DISCARD ALL", "configure": noop_app, "dsn": None}


def test_pool_option_and_pool_argument_conflict():
    pool = ConnectionPool(max_size=2)
    with pytest.raises(ConfigError, match=r"^timeout: a pool option cannot be combined with pool="):
        PgPoolMiddleware(noop_app, pool=pool, timeout=3)
    with pytest.raises(ConfigError, match=r"^pool: got dict"):
        PgPoolMiddleware(noop_app, pool={})  # type: ignore[arg-type]


def test_nothing_half_built_on_error(monkeypatch):
    from pgpool_wsgi import _fork

    before = len(_fork._pools)
    with pytest.raises(ConfigError):
        PgPoolMiddleware(noop_app, max_size=3, transaction="bogus")
    with pytest.raises(ConfigError):
        ConnectionPool(max_size=3, check="bogus")
    assert len(_fork._pools) == before


def test_readme_table_matches_the_code():
    text = README.read_text()
    match = re.search(r"<!-- options:start -->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert match, "README.md lacks the options table markers"
    assert match.group(1).strip() == config.markdown_table().strip(), (
        "README's options table is out of date; paste the output of "
        "`python -c 'from pgpool_wsgi import config; print(config.markdown_table())'`"
    )
    for option in config.OPTIONS:
        assert f"`{option.name}`" in match.group(1)
