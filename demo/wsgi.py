"""The demo's WSGI entry point: ``demo.wsgi:application`` (run from the repository root).

Loads the pipeline of demo/demo.ini, then - as real apps do - uses the
database while loading: the schema is set up through the pool. Under
``gunicorn --preload`` or a uWSGI master this happens before the fork;
pgpool_wsgi makes sure the master keeps no connection and every worker opens
its own.
"""

from __future__ import annotations

from pathlib import Path

from paste.deploy import loadapp

from demo.app import init_db

application = loadapp("config:demo.ini", relative_to=str(Path(__file__).parent))

with application.pool.connection() as conn:
    SERVER_VERSION = init_db(conn)
