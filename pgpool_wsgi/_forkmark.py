"""Are we still the process that made this state? Answered without a system call.

Linux (4.14+) wipes a private anonymous page marked ``MADV_WIPEONFORK`` to
zeros in every child, however the child was made: ``os.fork``, a C
``fork()`` (uWSGI, ctypes), multiprocessing. So a state holds this process's
page and the checkout path reads one byte of it: 1 in the process that made
it, 0 in any child. That is about a tenth of an ``os.getpid()``, which is a
real system call in these VMs.

Where the kernel refuses the advice (another OS, an old kernel, a seccomp
filter answering EINVAL or ENOSYS), the mark falls back to comparing the pid.

Nothing is made at import time: each process makes its own page on first use,
so a master's page reads 0 in its workers and they make theirs.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Union

# The advice's number on Linux; Python's mmap module may lack the constant.
_MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18)


class PidMark:
    """The fallback mark: ``mark[0]`` is true only in the process that made it."""

    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __getitem__(self, index: int) -> bool:
        return os.getpid() == self.pid


Mark = Union[mmap.mmap, PidMark, bytes]

# What a state that belongs to no process holds: reads 0 everywhere.
NOWHERE: Mark = b"\x00"

_mark: Mark = NOWHERE
_mark_pid = 0
_refused = False


def current() -> Mark:
    """This process's mark, made on the first call in each process.

    Two threads racing here in a new process may each make a page; either
    is right (both read 1 here and 0 in children), so no lock is needed.
    """
    global _mark, _mark_pid
    pid = os.getpid()
    if _mark_pid != pid:
        _mark = _new_mark()
        _mark_pid = pid
    return _mark


def mechanism() -> str:
    """``"wipeonfork"`` or ``"pid"``: what this process's mark uses."""
    return "pid" if isinstance(current(), PidMark) else "wipeonfork"


def refuse() -> None:
    """Use the pid comparison from now on in this process, as a kernel that refuses would.

    For tests of the fallback; marks already handed out keep working.
    """
    global _refused, _mark_pid
    _refused = True
    _mark_pid = 0


def _new_mark() -> Mark:
    if not _refused and sys.platform.startswith("linux"):
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError, AttributeError):
            return PidMark()
        try:
            page.madvise(_MADV_WIPEONFORK)
        except (OSError, ValueError, AttributeError):  # EINVAL: kernel < 4.14; ENOSYS/EPERM: seccomp
            page.close()
            return PidMark()
        page[0] = 1
        return page
    return PidMark()
