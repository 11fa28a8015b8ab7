"""A stage's in-process loop: a daemon thread that runs one unit of work every ``interval_s``
seconds, and soon after :meth:`Ticker.poke` (new work was committed). A failing turn is logged
(type and a short text, no content) and the next turn tries again: the database says what is
left to do, so nothing is lost by a failed turn. Used by ``careloop serve`` without a broker for
the outreach, replies and waitlist stages; with Celery, beat ticks the same units of work."""

from __future__ import annotations

import threading
from collections.abc import Callable

from integration.logs import get_logger

__all__ = ["Ticker"]


class Ticker:
    def __init__(self, name: str, interval_s: float, work: Callable[[], object]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._work = work
        self._log = get_logger(f"careloop.{name}")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def poke(self) -> None:
        """Work was committed: run soon rather than at the next tick."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._work()
            except Exception as exc:  # the database decides; the next turn tries again
                self._log.warning(f"{self.name}_failed", exc_type=type(exc).__name__,
                                  error=str(exc)[:200])
            self._wake.wait(self.interval_s)
