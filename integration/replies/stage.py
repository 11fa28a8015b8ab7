"""The replies stage in ``careloop serve`` without a broker: a thread that processes stored
channel events (delivery receipts, SMS replies) every ``interval_s`` and at once when a webhook
stored one (:meth:`ReplyStage.poke`, the runtime's ``on_channel_event``). With Celery,
``careloop.replies.process`` does the same on the ``outreach`` queue. Claims are the database's,
so several runners are safe; ``after_run`` lets the runtime wake the write-back stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy import Engine

from adapters.channels import Channel
from integration.replies.processor import ProcessResult, process_events
from integration.settings import Settings
from integration.ticker import Ticker

__all__ = ["ReplyStage"]

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
        self._ticker = Ticker("replies", interval_s, self._turn)

    def run_once(self) -> ProcessResult:
        return process_events(self.engine, self.settings, self.channels)

    def start(self) -> None:
        self._ticker.start()

    def poke(self, _event_id: int | None = None) -> None:
        self._ticker.poke()

    def stop(self, timeout: float = 10.0) -> None:
        self._ticker.stop(timeout)

    def _turn(self) -> None:
        result = self.run_once()
        if result.processed and self._after_run is not None:
            self._after_run()
