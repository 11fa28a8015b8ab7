"""The waitlist stage in ``careloop serve`` without a broker: a thread that, every
``interval_s`` and at once when poked (a cancellation landed on the timeline, a patient
declined an offer), frees the slots of new cancellations (:func:`consume_cancellations`) and
runs an offer round (:func:`offer_round`). With Celery a periodic task does the same. The
cursor and the slots are locked in the database, so several runners are safe."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import Engine

from adapters.channels import Channel
from integration.settings import Settings
from integration.ticker import Ticker
from integration.waitlist.freed import consume_cancellations
from integration.waitlist.offers import AcceptOutcome, OfferRound, Rebooker, accept, offer_round

__all__ = ["WaitlistStage"]

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
        self._ticker = Ticker("waitlist", interval_s, self.run_once)

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
        self._ticker.start()

    def poke(self, *_args: object) -> None:
        self._ticker.poke()

    def stop(self, timeout: float = 10.0) -> None:
        self._ticker.stop(timeout)
