"""The processing stage's work phase in a separate process, for ``careloop serve``.

Parsing, converting and validating a message is pure CPU work (``mappings`` does no I/O). Run
in a thread of the serving process it would hold the GIL for long stretches and slow every ACK.
In ``serve`` it runs instead in a child process at lower CPU priority (``nice``), fed the rows'
bytes and returning plain results; the serving process keeps the database writes, so SQLite
still has a single writing process. If the child dies, the pool is rebuilt and the rows are
retried one by one (a message that kills the child fails on its own after ``max_attempts``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime

from integration.conversion import ContextFactory
from integration.logs import configure_logging, get_logger
from integration.pipeline import Outcome, WorkRow, _Result, _work
from integration.senders import SenderSnapshot
from integration.settings import Settings

__all__ = ["WorkPool"]

log = get_logger("careloop.workpool")

_contexts: ContextFactory | None = None
_PR_SET_PDEATHSIG = 1


def _exit_with_parent(parent: int) -> None:
    """A child must not outlive ``careloop serve`` (even one killed with SIGKILL).

    ``parent`` is the serving process's pid as it gave it: if it died while this child was
    still starting, ``os.getppid()`` already differs and the child leaves at once.
    """
    with contextlib.suppress(Exception):  # Linux: be told at once
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:  # everywhere else: notice within a second
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_child(settings: Settings, niceness: int, parent: int) -> None:
    global _contexts  # noqa: PLW0603 - one per child process, set once at its start
    _exit_with_parent(parent)
    if niceness:
        os.nice(niceness)
    configure_logging(settings.log_level, settings.log_format)
    _contexts = ContextFactory(settings)


def _child_work(
    rows: list[WorkRow], max_attempts: int, now: datetime, senders: SenderSnapshot
) -> tuple[list[Outcome], list[_Result]]:
    assert _contexts is not None, "the work process was not initialised"
    _contexts.adopt(senders)  # the console's sender rules, as the serving process has them
    return _work(rows, max_attempts, now, _contexts)


class WorkPool:
    """A :data:`integration.pipeline.WorkRunner` backed by child processes."""

    def __init__(self, settings: Settings, *, processes: int = 1, niceness: int = 10) -> None:
        self._settings = settings
        self._processes = processes
        self._niceness = niceness
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_child,
                    initargs=(self._settings, self._niceness, os.getpid()),
                )
            return self._pool

    def __call__(
        self,
        rows: list[WorkRow],
        max_attempts: int,
        now: datetime,
        contexts: ContextFactory,
    ) -> tuple[list[Outcome], list[_Result]]:
        pool = self._get()
        try:
            return pool.submit(_child_work, rows, max_attempts, now,
                               contexts.snapshot()).result()
        except BrokenProcessPool:
            log.error("work_process_died", count=len(rows))
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
