"""libpq's service files, read the way libpq reads them, to know what a service sets.

libpq looks up ``service=name`` (or ``PGSERVICE``) in ``PGSERVICEFILE`` (else
``~/.pg_service.conf``) and then in ``PGSYSCONFDIR/pg_service.conf`` (else a
directory compiled into libpq, which we cannot know). What a service sets
beats the environment and loses to the connection string itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# libpq's environment variables for the parameters we look at or show.
ENVIRONMENT = {
    "PGHOST": "host", "PGHOSTADDR": "hostaddr", "PGPORT": "port", "PGUSER": "user", "PGDATABASE": "dbname",
    "PGPASSWORD": "password", "PGAPPNAME": "application_name", "PGOPTIONS": "options",
    "PGCONNECT_TIMEOUT": "connect_timeout", "PGGSSENCMODE": "gssencmode", "PGSSLMODE": "sslmode",
    "PGSERVICE": "service", "PGTARGETSESSIONATTRS": "target_session_attrs",
}


def from_environment() -> dict[str, str]:
    """The parameters libpq would take from the environment (set, even if empty, counts)."""
    return {key: os.environ[var] for var, key in ENVIRONMENT.items() if var in os.environ}


def _section(path: Path, name: str) -> dict[str, str] | None:
    """``[name]``'s keys in one service file, or None when the file or the section is not there."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found: dict[str, str] | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if found is not None:
                break  # the next group: ours is complete
            if line == f"[{name}]":
                found = {}
            continue
        if found is not None and "=" in line:
            key, _, value = line.partition("=")  # as libpq: no trimming around "="
            found.setdefault(key, value)
    return found


def lookup(name: str) -> dict[str, str] | None:
    """What service ``name`` sets; None when we cannot find its definition.

    None means "unknown": the definition may sit in libpq's compiled-in
    directory, so the caller must assume it could set anything.
    """
    user_file = os.environ.get("PGSERVICEFILE")
    if user_file is not None:
        found = _section(Path(user_file), name)
    else:
        try:
            home = Path.home()  # HOME, else the password database: as libpq
        except (KeyError, RuntimeError):
            home = None
        found = None if home is None else _section(home / ".pg_service.conf", name)
    if found is not None:
        return found
    sysconfdir = os.environ.get("PGSYSCONFDIR")
    if sysconfdir is None:
        return None
    return _section(Path(sysconfdir) / "pg_service.conf", name)


def service_of(explicit: Mapping[str, str]) -> str | None:
    """The service libpq will use: the connection string's, else ``PGSERVICE``."""
    return explicit.get("service") or os.environ.get("PGSERVICE") or None
