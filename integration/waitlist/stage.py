"""The waitlist stage in ``careloop serve`` without a broker: a thread that, every
``interval_s`` and at once when poked (a cancellation landed on the timeline, a patient
declined an offer), frees the slots of new cancellations (:func:`consume_cancellations`) and
runs an offer round (:func:`offer_round`). With Celery a periodic task does the same. The
cursor and the slots are locked in the database, so several runners are safe."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import Engine

from adapters.channels import Channel
from integration.logs import get_logger
from integration.settings import Settings
from integration.waitlist.freed import consume_cancellations
from integration.waitlist.offers import AcceptOutcome, OfferRound, Rebooker, accept, offer_round

__all__ = ["WaitlistStage"]

log = get_logger("careloop.waitlist")


class WaitlistStage:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        channels: Mapping[str, Channel],
        scheduling: Rebooker | None = None,
        interval_s: float = 10.0,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.channels = channels
        self.scheduling = scheduling
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: datetime | None = None) -> tuple[int, OfferRound]:
        """``(slots freed from new cancellations, the offer round's counts)``."""
        freed = consume_cancellations(self.engine, self.settings, now=now)
        return freed, offer_round(self.engine, self.settings, self.channels, now=now)

    async def accept(self, offer_id: int, *, now: datetime | None = None) -> AcceptOutcome:
        """:func:`integration.waitlist.offers.accept` with this stage's channels and
        scheduling service."""
        return await accept(self.engine, self.settings, self.channels, self.scheduling,
                            offer_id=offer_id, now=now)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="waitlist", daemon=True)
            self._thread.start()

    def poke(self, *_args: object) -> None:
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
                self.run_once()
            except Exception as exc:  # the database decides; the next tick tries again
                log.warning("waitlist_failed", exc_type=type(exc).__name__, error=str(exc)[:200])
            self._wake.wait(self.interval_s)
