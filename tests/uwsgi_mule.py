"""A uWSGI mule script (``--mule=tests/uwsgi_mule.py``): checkouts through the master's pool, then idle."""

import time

from tests.uwsgi_extras import run_checkouts

run_checkouts("mule")
while True:  # a mule that returns is respawned; stay until uWSGI stops us
    time.sleep(60)
