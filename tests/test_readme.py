"""The README's examples, as written: every ```ini block loads with PasteDeploy, every ```python block runs.

Blocks are found here, not listed, so new examples are covered as they land.
Only the DSN is substituted (a ``dsn`` key in ini, a ``postgresql://``
string literal in Python, both pointing at the session's server) and, in ini
files, the inner app (every ``[app:...]`` section's ``use``). Python blocks
run with a plain WSGI ``app`` predefined, for the snippets that wrap "your
app". A block that cannot run on its own (another program's config file)
carries ``<!-- not run: reason -->`` on the line before its fence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import webtest
from paste.deploy import loadapp, loadfilter

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware

README = Path(__file__).parents[1] / "README.md"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
PASTE_SECTIONS = re.compile(r"^\[(app|filter|pipeline|composite|filter-app)(:[^\]]*)?\]", re.M)
MAIN = re.compile(r"^\[(?:app|pipeline|composite|filter-app)(?::\s*main\s*)?\]", re.M)


@dataclass
class Block:
    lang: str
    line: int  # of the opening fence, 1-based
    text: str
    not_run: str | None  # the reason given in the marker


def blocks(text: str) -> Iterator[Block]:
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = NOT_RUN.search(previous)
        yield Block(fence.group(1), start + 1, "\n".join(body) + "\n", marker.group(1) if marker else None)
        i += 1


ALL = list(blocks(README.read_text()))


def params(lang: str) -> list[Any]:
    return [pytest.param(b, id=f"README.md:{b.line}") for b in ALL if b.lang == lang]


def test_the_readme_has_examples_and_few_exceptions():
    assert len([b for b in ALL if b.lang == "ini"]) >= 3 and len([b for b in ALL if b.lang == "python"]) >= 4
    skipped = [b for b in ALL if b.not_run]
    assert len(skipped) <= 4, [(b.line, b.not_run) for b in skipped]


# -- ini --------------------------------------------------------------------------


def inner_app_factory(global_conf: dict[str, Any], **local_conf: Any) -> Any:
    """The app behind the README's filters: one query through the request's handle."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with environ["pgpool.handle"].conn.cursor() as cur:
            cur.execute("SELECT 'served'")
            body = cur.fetchone()[0].encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    return app


def substitute_ini(text: str, dsn: str) -> str:
    out: list[str] = []
    section = ""
    skipping = False  # continuation lines of a replaced value
    for line in text.splitlines():
        if skipping and line[:1].isspace() and line.strip():
            continue
        skipping = False
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            section = header.group(1).strip()
        elif re.match(r"^(?:[\w-]+\.)*dsn\s*=", line):
            line = line.split("=", 1)[0] + "= " + dsn.replace("%", "%%")
            skipping = True
        elif section.startswith("app") and re.match(r"^(use|paste\.app_factory)\s*=", line):
            line = "use = call:tests.test_readme:inner_app_factory"
            skipping = True
        out.append(line)
    return "\n".join(out) + "\n"


def _serve(middleware: Any) -> None:
    assert isinstance(middleware, PgPoolMiddleware), f"expected the middleware outermost, got {middleware!r}"
    try:
        assert webtest.TestApp(middleware).get("/").text == "served"
    finally:
        middleware.close()


@pytest.mark.parametrize("block", params("ini"))
def test_ini_block_loads_with_pastedeploy(block: Block, dsn: str, tmp_path: Path) -> None:
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    assert PASTE_SECTIONS.search(block.text), (
        "not a PasteDeploy file: mark it with <!-- not run: reason --> on the line before the fence")
    path = tmp_path / "readme.ini"
    path.write_text(substitute_ini(block.text, dsn))
    if MAIN.search(block.text):
        _serve(loadapp(f"config:{path}"))
        return
    filters = re.findall(r"^\[filter:([^\]]+)\]", block.text, re.M)
    assert filters, "no main app and no [filter:...] section to load"
    for name in filters:
        _serve(loadfilter(f"config:{path}", name=name.strip())(inner_app_factory({})))


# -- python -----------------------------------------------------------------------

URL_LITERAL = re.compile(r"""(["'])postgres(?:ql)?://[^"'\s]*\1""")


def your_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"your app"]


@pytest.mark.parametrize("block", params("python"))
def test_python_block_runs(block: Block, pg: Any) -> None:
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    code, substituted = URL_LITERAL.subn(repr(pg.url(user="app")), block.text)
    namespace: dict[str, Any] = {"__name__": "readme_example", "app": your_app}
    try:
        exec(compile(code, f"README.md:{block.line}", "exec"), namespace)
        app = namespace.get("app")
        if substituted and isinstance(app, PgPoolMiddleware) and app.app is not your_app:
            assert webtest.TestApp(app).get("/").status_int == 200  # the example's own app, served
    finally:
        for value in list(namespace.values()):
            if isinstance(value, (ConnectionPool, PgPoolMiddleware)):
                value.close()
