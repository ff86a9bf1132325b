"""Request-derived text made safe to log: one line, no control characters, bounded length.

``PATH_INFO`` arrives percent-decoded and ``REQUEST_METHOD`` is whatever the
client sent: a CR or LF in either would forge a log line of its own, an ESC
would drive the terminal of whoever reads the log. Everything we log that a
client chose goes through :func:`for_log` (or :func:`request_line`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

LIMIT = 200  # characters of the original text kept; the rest is counted, not logged

# Anything but printable ASCII, and the backslash (so an escape we write cannot be forged).
_SUSPECT = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    if char.isprintable():  # é, ß, 中: printable outside ASCII stays as it is
        return char
    code = ord(char)
    # C0, DEL, C1, line/paragraph separators, bidi and other format characters.
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def for_log(value: object, limit: int = LIMIT) -> str:
    """``value`` as one printable line: control characters escaped (``\\x0a``), at most ``limit`` characters kept."""
    text = value if isinstance(value, str) else str(value)
    more = len(text) - limit
    if more > 0:
        text = text[:limit]
    if _SUSPECT.search(text) is not None:
        text = _SUSPECT.sub(_escape, text)
    return f"{text}…({more} more)" if more > 0 else text


def _from_wsgi(value: str) -> str:
    # WSGI hands over the request's bytes decoded as latin-1; most clients sent UTF-8.
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def request_line(environ: Mapping[str, Any]) -> str:
    """``"GET /path"`` of a WSGI environ, safe to log."""
    method = environ.get("REQUEST_METHOD")
    path = environ.get("PATH_INFO", "")
    method_text = for_log(_from_wsgi(method), 20) if isinstance(method, str) else for_log(method, 20)
    path_text = for_log(_from_wsgi(path)) if isinstance(path, str) else for_log(path)
    return f"{method_text} {path_text}"
