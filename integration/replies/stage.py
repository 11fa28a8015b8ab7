"""The replies stage in ``careloop serve`` without a broker: a thread that processes stored
channel events (delivery receipts, SMS replies) every ``interval_s`` and at once when a webhook
stored one (:meth:`ReplyStage.poke`, the runtime's ``on_channel_event``). With Celery,
``careloop.replies.process`` does the same on the ``outreach`` queue. Claims are the database's,
so several runners are safe; ``after_run`` lets the runtime wake the write-back stage."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from sqlalchemy import Engine

from adapters.channels import Channel
from integration.logs import get_logger
from integration.replies.processor import ProcessResult, process_events
from integration.settings import Settings

__all__ = ["ReplyStage"]

log = get_logger("careloop.replies")


class ReplyStage:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        channels: Mapping[str, Channel],
        *,
        interval_s: float = 5.0,
        after_run: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.channels = channels
        self.interval_s = interval_s
        self._after_run = after_run
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> ProcessResult:
        return process_events(self.engine, self.settings, self.channels)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="replies", daemon=True)
            self._thread.start()

    def poke(self, _event_id: int | None = None) -> None:
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
                result = self.run_once()
                if result.processed and self._after_run is not None:
                    self._after_run()
            except Exception as exc:  # the database decides; the next tick tries again
                log.warning("replies_failed", exc_type=type(exc).__name__, error=str(exc)[:200])
            self._wake.wait(self.interval_s)
