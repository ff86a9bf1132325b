"""The fork mark: a page that reads 1 in its process and 0 in every child, or the pid fallback."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import pytest

from pgpool_wsgi import _forkmark


@pytest.fixture
def fresh_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test starts as a process that has made no mark yet.
    monkeypatch.setattr(_forkmark, "_mark", _forkmark.NOWHERE)
    monkeypatch.setattr(_forkmark, "_mark_pid", 0)
    monkeypatch.setattr(_forkmark, "_refused", False)


def _libc_fork() -> int:
    return int(ctypes.CDLL(None).fork())


FORKS = [pytest.param(os.fork, id="os.fork"), pytest.param(_libc_fork, id="ctypes-fork")]


def in_child(fork: Callable[[], int], probe: Callable[[], bytes]) -> bytes:
    """Run ``probe`` in a child made by ``fork``; return what it wrote (bounded wait)."""
    read_end, write_end = os.pipe()
    pid = fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        try:
            os.write(write_end, probe())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        out = os.read(read_end, 100)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return out


@pytest.mark.parametrize("fork", FORKS)
def test_page_reads_one_here_and_zero_in_a_child(fresh_marks: None, fork: Callable[[], int]) -> None:
    mark = _forkmark.current()
    assert _forkmark.mechanism() == "wipeonfork"
    assert mark[0] == 1

    def probe() -> bytes:
        inherited = mark[0]
        own = _forkmark.current()
        return bytes([inherited, own[0], own is not mark])

    assert in_child(fork, probe) == bytes([0, 1, 1])
    assert mark[0] == 1  # the parent's page is untouched


def test_a_childs_own_page_reads_zero_in_the_grandchild(fresh_marks: None) -> None:
    def probe() -> bytes:
        own = _forkmark.current()
        return in_child(os.fork, lambda: bytes([own[0]])) + bytes([own[0]])

    _forkmark.current()
    assert in_child(os.fork, probe) == bytes([0, 1])


def test_nothing_is_made_before_first_use(fresh_marks: None) -> None:
    assert _forkmark._mark is _forkmark.NOWHERE
    assert _forkmark.NOWHERE[0] == 0


@pytest.mark.parametrize("fork", FORKS)
def test_a_kernel_that_refuses_the_advice_gives_the_pid_fallback(
        fresh_marks: None, monkeypatch: pytest.MonkeyPatch, fork: Callable[[], int]) -> None:
    # An advice number the kernel does not know: madvise fails with EINVAL,
    # as it does before Linux 4.14 or under a seccomp filter.
    monkeypatch.setattr(_forkmark, "_MADV_WIPEONFORK", 0x7FFF)
    mark = _forkmark.current()
    assert isinstance(mark, _forkmark.PidMark)
    assert _forkmark.mechanism() == "pid"
    assert mark[0]

    def probe() -> bytes:
        own = _forkmark.current()
        return bytes([bool(mark[0]), bool(own[0]), own is not mark])

    assert in_child(fork, probe) == bytes([0, 1, 1])


def test_refuse_switches_this_process_to_the_pid_comparison(fresh_marks: None) -> None:
    page = _forkmark.current()
    _forkmark.refuse()
    assert _forkmark.mechanism() == "pid"
    assert page[0] == 1  # marks already handed out keep working
