"""PasteDeploy: every composition form, served through webtest against the real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import webtest
from paste.deploy import loadapp

from pgpool_wsgi import ConfigError, PgPoolMiddleware
from pgpool_wsgi.paste import filter_factory

HERE = Path(__file__).parent / "sample_configs"


def load(name: str, dsn: str) -> PgPoolMiddleware:
    return loadapp(f"config:{name}", relative_to=str(HERE), global_conf={"test_dsn": dsn})


def find_middleware(app: object) -> PgPoolMiddleware:
    assert isinstance(app, PgPoolMiddleware), f"expected the middleware outermost, got {app!r}"
    return app


@pytest.mark.parametrize(
    ("ini", "max_size", "name"),
    [
        pytest.param("pipeline.ini", 3, "pgpool", id="pipeline-egg#pgpool"),
        pytest.param("main_entry_point.ini", 4, "via-main", id="egg-main-entry-point"),
        pytest.param("filter_app.ini", 5, "pgpool", id="filter-app"),
        pytest.param("filter_with.ini", 6, "pgpool", id="filter-with"),
        pytest.param("defaults_prefix.ini", 7, "from-defaults", id="DEFAULT-pgpool-prefix-local-wins"),
    ],
)
def test_each_composition_form_serves_requests(dsn, ini, max_size, name):
    middleware = find_middleware(load(ini, dsn))
    try:
        client = webtest.TestApp(middleware)
        body = client.get("/page?token-123").json
        assert body == {"echo": "token-123", "backend": body["backend"], "max_size": max_size, "name": name}
        assert middleware.pool.stats()["in_use"] == 0 and middleware.pool.stats()["checkouts"] == 1
    finally:
        middleware.pool.close()


def test_ini_values_are_converted(dsn):
    middleware = find_middleware(load("pipeline.ini", dsn))
    assert middleware.pool.timeout == 2.5 and middleware.transaction == "commit"
    middleware.pool.close()
    with_paths = find_middleware(load("filter_with.ini", dsn))
    assert with_paths.exclude_paths == ("/static/", "/health")
    with_paths.pool.close()


def test_bad_ini_value_fails_at_load_time(dsn):
    with pytest.raises(ConfigError, match=r"leak_debug: got 'ture', expected true/false"):
        load("bad_value.ini", dsn)


def test_factory_opens_nothing(pg):
    before = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgpool_wsgi%'")
    make_filter = filter_factory({"pgpool.max_size": "2"}, dsn=pg.dsn())
    middleware = make_filter(lambda environ, start_response: [])
    after = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgpool_wsgi%'")
    assert before == after and middleware.pool.max_size == 2
    middleware.pool.close()


def test_named_pools_from_ini(pg):
    app = loadapp("config:named_pools.ini", relative_to=str(HERE),
                  global_conf={"test_dsn": pg.dsn(), "replica_dsn": pg.dsn(user="app")})
    middleware = find_middleware(app)
    try:
        replica = middleware.pools["replica"]
        assert (replica.name, replica.max_size, replica.check) == ("replica", 2, "ping")
        client = webtest.TestApp(middleware)
        assert client.get("/").json == {"replica_user": "app"}
        stats = client.get("/_pool").json
        assert stats["checkouts"] == 1 and stats["pools"]["replica"]["checkouts"] == 1
        assert stats["pools"]["replica"]["in_use"] == 0
    finally:
        middleware.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"replica.max_sise": "3"}, "replica.max_sise: unknown option; did you mean 'max_size'",
                     id="unknown-option"),
        pytest.param({"replica.max_size": "many"}, "replica.max_size: got 'many', expected an integer",
                     id="bad-value"),
        pytest.param({"replica.transaction": "commit"}, "replica.transaction: unknown option",
                     id="middleware-option-in-a-pool"),
        pytest.param({"Replica.dsn": "host=x"}, "Replica.dsn: 'Replica' is not a pool name", id="bad-name"),
        pytest.param({"handle.dsn": "host=x"}, "handle.dsn: 'handle' is not a pool name", id="reserved-name"),
    ],
)
def test_named_pool_errors_name_the_key(settings, message):
    with pytest.raises(ConfigError) as info:
        filter_factory({}, **settings)
    assert str(info.value).startswith(message)


# -- [DEFAULT] shadowing (#13.5) ---------------------------------------------------

def test_section_keys_that_default_also_defines_still_win(dsn):
    middleware = find_middleware(load("shadowed.ini", dsn))
    try:
        assert (middleware.pool.timeout, middleware.pool.max_size) == (2.0, 3)
        with middleware.pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT current_setting('application_name')")
            assert cur.fetchone()[0] == "web"
    finally:
        middleware.close()


def test_section_key_referring_to_its_default_namesake_is_explained(dsn):
    with pytest.raises(ConfigError) as info:
        load("shadowed_self.ini", dsn)
    message = str(info.value)
    assert message.startswith("dsn: ") and "[filter:pgpool]" in message and "[DEFAULT]" in message, message


def test_two_filters_shadowed_differently_is_an_error_not_a_guess(dsn):
    with pytest.raises(ConfigError, match=r"^max_size: .*\[filter:first\].*\[filter:second\]"):
        load("shadowed_two.ini", dsn)


def test_default_keys_the_section_does_not_set_are_not_ours(dsn):
    middleware = find_middleware(load("default_not_ours.ini", dsn))
    assert middleware.pool.timeout == 30.0
    middleware.close()


def test_percent_escapes_in_an_ini_url_are_doubled(pg):
    # configparser interpolation: "%40" must be written "%%40" (the README says so).
    app = loadapp("config:percent_url.ini", relative_to=str(HERE), global_conf={"test_port": str(pg.port)})
    middleware = find_middleware(app)
    try:
        assert "app@127.0.0.1" in repr(middleware.pool) and "pa@ss" not in repr(middleware.pool.target)
        with middleware.pool.connection() as conn:
            assert conn.get_dsn_parameters()["user"] == "app"
    finally:
        middleware.close()


def test_shadowing_that_cannot_be_checked_is_an_error(tmp_path):
    elsewhere = tmp_path / "other.ini"
    elsewhere.write_text("[app:main]\nuse = call:tests.pasteapp:app_factory\n")
    with pytest.raises(ConfigError, match=r"^timeout: \[DEFAULT\] defines timeout.*not in"):
        filter_factory({"__file__": str(elsewhere), "here": str(tmp_path), "timeout": "60"}, max_size="2")
    # Not from an ini file: global keys without the prefix are simply not ours.
    assert filter_factory({"timeout": "60"}, max_size="2")(lambda e, s: []).pool.timeout == 30.0
