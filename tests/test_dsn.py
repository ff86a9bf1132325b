"""Connection strings: DSN sources (S2) and a password that never shows (S3)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import webtest

from pgpool_wsgi import ConfigError, ConnectionPool, PgPoolMiddleware, PoolError
from pgpool_wsgi._dsn import Target
from tests.pgserver import PASSWORD, PASSWORD_USER


def whoami(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    with environ["pgpool.conn"].cursor() as cur:
        cur.execute("SELECT current_user")
        user = cur.fetchone()[0]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [user.encode()]


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    return caplog


def assert_never_shown(texts: list[str]) -> None:
    leaks = [t for t in texts if PASSWORD in t]
    assert leaks == [], leaks


@pytest.mark.parametrize("form", ["url", "keyword"])
def test_password_never_appears_anywhere(pg, monkeypatch, everything_logged, form):
    if form == "url":
        good = pg.url(user=PASSWORD_USER, password=PASSWORD)
        bad = pg.url(user=PASSWORD_USER, password=PASSWORD + "-wrong")
    else:
        good = pg.dsn(user=PASSWORD_USER, password=PASSWORD)
        bad = pg.dsn(user=PASSWORD_USER, password=PASSWORD + "-wrong")
    shown: list[str] = []

    # A full request cycle, with the stats endpoint and a leak warning.
    app = PgPoolMiddleware(whoami, dsn=good, stats_path="/_pool", leak_timeout=0.001, max_size=2)
    client = webtest.TestApp(app)
    assert client.get("/").text == PASSWORD_USER
    shown += [client.get("/_pool").text, repr(app), repr(app.pool), str(app.pool.target),
              json.dumps(app.pool.stats())]
    app.pool.close()

    # A failed connect with a wrong password: the 503, the exception, the logs.
    failing = PgPoolMiddleware(whoami, dsn=bad, max_size=1)
    response = webtest.TestApp(failing).get("/", status=503)
    shown.append(response.text)
    with pytest.raises(PoolError) as info:
        ConnectionPool(bad, max_size=1).getconn()
    shown += [str(info.value), repr(info.value)]
    assert "password authentication failed" in str(info.value)
    failing.pool.close()

    # A bad configuration that carries the password.
    with pytest.raises(ConfigError) as bad_config:
        PgPoolMiddleware(whoami, dsn=good.replace("dbname=", "dbname ") if form == "keyword" else good + "&bogus=1")
    shown.append(str(bad_config.value))
    with pytest.raises(ConfigError) as bad_size:
        PgPoolMiddleware(whoami, dsn=good, max_size="many")
    shown.append(str(bad_size.value))

    shown += [r.getMessage() for r in everything_logged.records]
    shown += [r.exc_text or "" for r in everything_logged.records]
    assert any("password authentication failed" in t for t in shown)  # we did log the failure
    assert_never_shown(shown)


def test_pgpassword_is_masked_too(pg, monkeypatch, everything_logged):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    app = PgPoolMiddleware(whoami, dsn=pg.dsn(user=PASSWORD_USER), max_size=1)
    assert webtest.TestApp(app).get("/").text == PASSWORD_USER
    target = app.pool.target
    assert target.scrub(f"echo {PASSWORD} back") == "echo *** back"
    assert_never_shown([repr(app.pool), str(target), *[r.getMessage() for r in everything_logged.records]])
    app.pool.close()


def test_unparsable_dsn_error_hides_password_words():
    with pytest.raises(ConfigError) as info:
        Target("host=x password=abc def")  # libpq: missing "=" after "def"
    assert "def" not in str(info.value) and "abc" not in str(info.value)
    assert str(info.value).startswith("dsn: cannot parse")


def test_dsn_falls_back_to_database_url_then_pg_variables(pg, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", pg.url(user="app"))
    with ConnectionPool(max_size=1).connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone()[0] == "app"
    monkeypatch.delenv("DATABASE_URL")
    for key, value in {"PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": "app",
                       "PGDATABASE": "postgres", "PGSSLMODE": "disable"}.items():
        monkeypatch.setenv(key, value)
    pool = ConnectionPool(max_size=1)
    assert "app@127.0.0.1" in repr(pool)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, inet_server_port()")
        assert cur.fetchone() == ("app", pg.port)


def test_explicit_dsn_wins_over_database_url(pg, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing")
    with ConnectionPool(pg.dsn(user="app"), max_size=1).connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone()[0] == "app"


def test_connect_timeout_default_and_dsn_override(pg):
    pool = ConnectionPool(pg.dsn(), max_size=1, connect_timeout=7)
    with pool.connection() as conn:
        assert conn.get_dsn_parameters()["connect_timeout"] == "7"
    own = ConnectionPool(pg.dsn(connect_timeout=3), max_size=1, connect_timeout=7)
    with own.connection() as conn:
        assert conn.get_dsn_parameters()["connect_timeout"] == "3"


def test_capacity_warning_when_max_size_exceeds_the_server(pg, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    available = pg.execute("SELECT current_setting('max_connections')::int"
                           " - current_setting('superuser_reserved_connections')::int")[0][0]
    too_big = ConnectionPool(pg.dsn(), max_size=available + 1)
    for _ in range(2):
        with too_big.connection():
            pass
    fits = ConnectionPool(pg.dsn(), max_size=available)
    with fits.connection():
        pass
    quiet = ConnectionPool(pg.dsn(), max_size=available + 1, check_capacity=False)
    with quiet.connection():
        pass
    warnings = [r.getMessage() for r in caplog.records if "this deployment may open" in r.getMessage()]
    assert len(warnings) == 1
    assert f"open {available + 1} connections" in warnings[0] and f"accepts {available}" in warnings[0]
    for pool in (too_big, fits, quiet):
        pool.close()
