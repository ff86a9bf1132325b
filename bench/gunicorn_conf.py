"""gunicorn configuration for ``bench/e2e.py``: build each variant's pool after the fork.

Only the hook lives here; workers, threads and the address come from the
command line.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def post_fork(server: Any, worker: Any) -> None:
    import e2e_app

    e2e_app.post_fork()
