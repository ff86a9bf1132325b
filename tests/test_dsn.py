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


# -- secrets on every path (#11.5) ---------------------------------------------

SECRET = "Zq9-S3cret"
SECRET_FORMS = (SECRET, "Zq9%2DS3cret", "Zq9@S3cret", "Zq9%40S3cret")  # as written and percent-decoded


def assert_no_secret(texts: list[str]) -> None:
    leaks = [t for t in texts if any(form in t for form in SECRET_FORMS)]
    assert leaks == [], leaks


def _middleware(**options: Any) -> Any:
    return PgPoolMiddleware(whoami, **options)


def _ini(**settings: str) -> Any:
    from pgpool_wsgi.paste import filter_factory

    return filter_factory({}, **settings)


SECRET_CONFIG_ERRORS = [
    pytest.param(lambda: _middleware(pools={"replica": f"postgresql://app:{SECRET}@replica/app"}),
                 "pools", id="pools-string-where-a-dict-belongs"),
    pytest.param(lambda: _middleware(pools={"replica": [f"postgresql://app:{SECRET}@replica/app"]}),
                 "pools", id="pools-list"),
    pytest.param(lambda: _middleware(pools=f"postgresql://app:{SECRET}@replica/app"), "pools", id="pools-string"),
    pytest.param(lambda: _middleware(pools={"Replica": {"dsn": f"host=r password={SECRET}"}}),
                 "pools", id="pools-bad-name"),
    pytest.param(lambda: _middleware(pools={"replica": {"dsn": f"host=r password={SECRET}", "max_sise": 2}}),
                 "replica.max_sise", id="pools-unknown-option"),
    pytest.param(lambda: _middleware(pools={"replica": {"dsn": f"host=r password={SECRET} port"}}),
                 "replica.dsn", id="pools-bad-dsn"),
    pytest.param(lambda: _ini(**{"read-replica.dsn": f"postgresql://app:{SECRET}@replica/app"}),
                 "read-replica.dsn", id="ini-bad-pool-name"),
    pytest.param(lambda: _ini(**{"replica.dsn": f"postgresql://app:{SECRET}@replica/app?bogus=1"}),
                 "replica.dsn", id="ini-pool-bad-dsn"),
    pytest.param(lambda: _ini(dsn=f"postgresql://app:{SECRET}@h/db", max_size="x"), "max_size", id="ini-bad-size"),
    pytest.param(lambda: _middleware(connect_kwargs=[f"password={SECRET}"]), "connect_kwargs", id="kwargs-list"),
    pytest.param(lambda: _middleware(connect_kwargs={"password": SECRET, "sslmod": "require"}),
                 "connect_kwargs", id="kwargs-unknown-key"),
    pytest.param(lambda: _middleware(connect_kwargs={"sslpassword": SECRET, "sslmode": "requir"}),
                 "connect_kwargs", id="kwargs-bad-value"),
    pytest.param(lambda: ConnectionPool("postgresql://app:Zq9%40S3cret@h/db?bogus=1"), "dsn", id="url-percent"),
    pytest.param(lambda: ConnectionPool(f"postgresql://app@h/db?password={SECRET}&bogus=1"), "dsn",
                 id="url-query-password"),
    pytest.param(lambda: ConnectionPool(f"postgresql://app@h/db?sslpassword={SECRET}&sslmode=requir"), "dsn",
                 id="url-query-sslpassword-bad-sslmode"),
    pytest.param(lambda: ConnectionPool(f"host=h sslpassword={SECRET} sslmode=requir"), "dsn", id="kv-sslpassword"),
    pytest.param(lambda: ConnectionPool(f"host=h password='{SECRET} x' port"), "dsn", id="kv-quoted-unparsable"),
    pytest.param(lambda: ConnectionPool(f"host=h password={SECRET}", max_size="x"), "max_size", id="other-key"),
    pytest.param(lambda: ConnectionPool(name=f"postgresql://app:{SECRET}@h/db"), "name", id="dsn-in-a-name"),
    pytest.param(lambda: ConnectionPool(reset_sql=f"postgresql://app:{SECRET}@h/db".encode()), "reset_sql",
                 id="dsn-bytes-in-reset_sql"),
    pytest.param(lambda: ConnectionPool(dsn=f"postgresql://app:{SECRET}@h/db".encode()), "dsn", id="dsn-bytes"),
    pytest.param(lambda: ConnectionPool(**{f"postgresql://app:{SECRET}@h/db": 1}), "postgresql://", id="dsn-as-key"),
]


@pytest.mark.parametrize(("build", "key"), SECRET_CONFIG_ERRORS)
def test_config_errors_never_echo_a_secret(build, key, everything_logged):
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert message.startswith(key), message
    assert_no_secret([message, repr(info.value), *[r.getMessage() for r in everything_logged.records]])


def test_database_url_errors_never_echo_a_secret(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{SECRET}@h/db?sslmode=requir")
    with pytest.raises(ConfigError) as info:
        ConnectionPool()
    assert "sslmode" in str(info.value)
    assert_no_secret([str(info.value)])


def test_reprs_handles_and_debug_log_never_show_a_secret(pg, everything_logged):
    # Trust authentication for "app" on 127.0.0.1: the passwords are carried, never checked.
    main = pg.dsn(user="app", password=SECRET, sslpassword=SECRET)
    replica = (f"postgresql://app:Zq9%40S3cret@127.0.0.1:{pg.port}/postgres"
               f"?sslmode=disable&sslpassword={SECRET}")
    shown: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        replica_conn = environ["pgpool.replica"].conn
        for key in ("pgpool.handle", "pgpool.replica"):
            shown.extend([repr(environ[key]), str(environ[key])])
        shown.append(repr(environ["pgpool.handle"].pool))
        # Not repr(replica_conn): psycopg2's own repr masks password= but shows sslpassword=.
        assert replica_conn.closed == 0
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = PgPoolMiddleware(app, dsn=main, pools={"replica": {"dsn": replica}}, stats_path="/_pool",
                                  connect_kwargs={"sslpassword": SECRET})
    try:
        client = webtest.TestApp(middleware)
        assert client.get("/").text == "ok"
        shown.append(client.get("/_pool").text)
        for pool in (middleware.pool, middleware.pools["replica"]):
            shown += [repr(pool), str(pool), repr(pool.target), str(pool.target), pool.target.describe(),
                      pool.target.masked(), json.dumps(pool.stats())]
        shown += [repr(middleware), str(middleware)]
    finally:
        middleware.close()
    shown += [r.getMessage() for r in everything_logged.records]
    assert any("127.0.0.1" in t for t in shown)
    assert_no_secret(shown)


def test_mask_text_covers_each_form():
    from pgpool_wsgi._dsn import mask

    cases = [
        f"host=h password={SECRET} port=1",
        f"host=h password = '{SECRET} with space' port=1",
        f"host=h sslpassword={SECRET}",
        f"postgresql://app:{SECRET}@h/db",
        "postgresql://app:Zq9%40S3cret@h1:5432,h2/db",
        f"postgresql://app@h/db?sslmode=disable&password={SECRET}&x=1",
        f"postgres://h/db?sslpassword={SECRET}",
        f"{{'dsn': 'postgresql://app:{SECRET}@h/db'}}",
    ]
    masked = [mask(text) for text in cases]
    assert_no_secret(masked)
    assert all("***" in m for m in masked)
    assert mask("postgresql://app@h:5432/db?sslmode=disable") == "postgresql://app@h:5432/db?sslmode=disable"
    assert "sslmode=disable" in mask(f"postgresql://app@h/db?password={SECRET}&sslmode=disable")


# -- build-time validation (#14.5) ---------------------------------------------

BAD_TARGETS = [
    pytest.param({"dsn": "host=h sslmode=requir"}, "dsn: sslmode", id="sslmode-typo"),
    pytest.param({"dsn": "postgresql://h/db?gssencmode=always"}, "dsn: gssencmode", id="gssencmode"),
    pytest.param({"dsn": "host=h target_session_attrs=rw"}, "dsn: target_session_attrs", id="target_session_attrs"),
    pytest.param({"dsn": "host=h channel_binding=yes"}, "dsn: channel_binding", id="channel_binding"),
    pytest.param({"dsn": "host=h connect_timeout=2147483648"}, "dsn: connect_timeout", id="dsn-connect_timeout"),
    pytest.param({"dsn": "host=h connect_timeout=5s"}, "dsn: connect_timeout", id="dsn-connect_timeout-unit"),
    pytest.param({"dsn": "host=h port=abc"}, "dsn: port", id="port-word"),
    pytest.param({"dsn": "host=h,g port=5432,70000"}, "dsn: port", id="port-range"),
    pytest.param({"dsn": "host=h keepalives_idle=ten"}, "dsn: keepalives_idle", id="keepalives_idle"),
    pytest.param({"connect_kwargs": {"sslmod": "require"}}, "connect_kwargs: 'sslmod'", id="kwargs-unknown"),
    pytest.param({"connect_kwargs": {"sslmode": "requir"}}, "connect_kwargs: sslmode", id="kwargs-sslmode"),
    pytest.param({"connect_kwargs": {"port": 2**31}}, "connect_kwargs: port", id="kwargs-port"),
    pytest.param({"connect_kwargs": {"connect_timeout": "soon"}}, "connect_kwargs: connect_timeout",
                 id="kwargs-connect_timeout"),
]


@pytest.mark.parametrize(("options", "start"), BAD_TARGETS)
def test_values_libpq_would_refuse_fail_at_build_time(options, start):
    with pytest.raises(ConfigError) as info:
        ConnectionPool(**options)
    assert str(info.value).startswith(start), str(info.value)


def test_unknown_connect_kwarg_names_the_close_match():
    with pytest.raises(ConfigError, match=r"did you mean 'sslmode'"):
        ConnectionPool(connect_kwargs={"sslmod": "require"})


def test_good_values_build_and_psycopg2_arguments_pass(pg):
    import psycopg2.extras

    pool = ConnectionPool(pg.dsn(keepalives_idle=" 30 ", target_session_attrs="read-write",
                                 channel_binding="prefer", gssencmode="prefer"),
                          connect_kwargs={"cursor_factory": psycopg2.extras.RealDictCursor, "port": pg.port},
                          connect_timeout=2**31 - 1, max_size=1, check_capacity=False)
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone() == {"one": 1}
            assert conn.get_dsn_parameters()["connect_timeout"] == str(2**31 - 1)
    finally:
        pool.close()


def test_build_time_validation_opens_nothing(pg):
    count = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    before = pg.execute(count)
    pool = ConnectionPool(pg.dsn(), connect_kwargs={"sslmode": "disable"})
    assert pg.execute(count) == before and pool.stats()["connects"] == 0
    pool.close()


# -- DATABASE_URL and PG*: read when a connection is opened (#14.8) ------------

def test_database_url_is_read_when_connecting_like_pg_variables(pg, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", pg.url(user="postgres"))
    pool = ConnectionPool(max_size=1)
    try:
        monkeypatch.setenv("DATABASE_URL", pg.url(user="app"))  # e.g. set in a post_fork hook
        monkeypatch.setenv("PGAPPNAME", "from-env")
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_setting('application_name')")
            assert cur.fetchone() == ("app", "from-env")
        assert "app@" in repr(pool)
    finally:
        pool.close()


def test_database_url_broken_after_build_is_a_failed_connect(pg, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", pg.url(user="app"))
    pool = ConnectionPool(max_size=1)
    try:
        monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{SECRET}@h/db?sslmode=requir")
        with pytest.raises(PoolError) as info:
            pool.getconn()
        assert "sslmode" in str(info.value)
        assert_no_secret([str(info.value)])
        assert pool.stats()["connect_errors"] == 1
    finally:
        pool.close()


# -- libpq service files, options and PGOPTIONS win over our defaults (#14.2) ----

@pytest.fixture
def service_file(pg, tmp_path, monkeypatch):
    """Write ``[name]`` sections to a service file named by PGSERVICEFILE; returns a writer."""
    path = tmp_path / "pg_service.conf"
    monkeypatch.setenv("PGSERVICEFILE", str(path))
    for var in ("PGSERVICE", "PGAPPNAME", "PGCONNECT_TIMEOUT", "PGGSSENCMODE", "PGOPTIONS", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)

    def write(**sections: dict[str, object]) -> None:
        lines = []
        for name, params in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k}={v}" for k, v in params.items()]
        path.write_text("\n".join(lines) + "\n")

    return write


def _base(pg) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": pg.port, "user": "app", "dbname": "postgres", "sslmode": "disable"}


def _session(pool: ConnectionPool) -> tuple[str, str]:
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        return cur.fetchone()[0], conn.get_dsn_parameters().get("connect_timeout", "")


def test_service_file_settings_win_over_our_defaults(pg, service_file, monkeypatch):
    service_file(mysvc={**_base(pg), "application_name": "from_service", "connect_timeout": 17,
                        "gssencmode": "prefer"})
    for pool in (ConnectionPool("service=mysvc", max_size=1), ConnectionPool(max_size=1, name="env")):
        monkeypatch.setenv("PGSERVICE", "mysvc")  # the second pool finds the service in the environment
        try:
            assert _session(pool) == ("from_service", "17")
            described = pool.target.describe()
            assert "app@127.0.0.1" in described and "mysvc" in described, described
        finally:
            pool.close()


def test_service_file_gssencmode_require_is_never_downgraded(pg, service_file):
    service_file(secure={**_base(pg), "gssencmode": "require"})
    import psycopg2

    with pytest.raises(psycopg2.OperationalError) as plain:
        psycopg2.connect("service=secure")
    pool = ConnectionPool("service=secure", max_size=1)
    try:
        with pytest.raises(PoolError) as ours:
            pool.getconn()
        assert "GSSAPI" in str(plain.value) and "GSSAPI" in str(ours.value), (str(plain.value), str(ours.value))
        assert pool.stats()["connects"] == 0
    finally:
        pool.close()


def test_without_service_our_defaults_still_apply(pg, service_file):
    pool = ConnectionPool(pg.dsn(user="app"), max_size=1, connect_timeout=9)
    try:
        name, timeout = _session(pool)
        assert name.startswith("pgpool_wsgi pid=") and timeout == "9"
    finally:
        pool.close()


@pytest.mark.parametrize("where", ["dsn", "connect_kwargs", "PGOPTIONS", "service"])
def test_application_name_in_options_wins(pg, service_file, monkeypatch, where):
    options = "-c application_name=myapp"
    dsn = pg.dsn(user="app")
    kwargs: dict[str, Any] = {}
    if where == "dsn":
        dsn += f" options='{options}'"
    elif where == "connect_kwargs":
        kwargs["options"] = options
    elif where == "PGOPTIONS":
        monkeypatch.setenv("PGOPTIONS", options)
    else:
        service_file(opts={"options": options})
        dsn += " service=opts"
    pool = ConnectionPool(dsn, max_size=1, connect_kwargs=kwargs or None)
    try:
        assert _session(pool)[0] == "myapp"
    finally:
        pool.close()


def test_application_name_from_environment_wins(pg, service_file, monkeypatch):
    monkeypatch.setenv("PGAPPNAME", "from-env")
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "11")
    pool = ConnectionPool(pg.dsn(user="app"), max_size=1)
    try:
        assert _session(pool) == ("from-env", "11")
    finally:
        pool.close()
