"""The outreach stage as one unit: reconcile timeline changes, then sweep due touches.

``careloop serve`` without a broker runs it in a thread (:meth:`OutreachStage.start`) every
``outreach.interval_s`` and promptly after each processing batch (:meth:`OutreachStage.poke`);
with Celery, beat schedules ``careloop.outreach.reconcile`` and ``careloop.outreach.send_due``
on the ``outreach`` queue, which call the same :meth:`reconcile` and :meth:`send_due`. Either
way the database decides who does what (cursor row lock, ``SKIP LOCKED`` claims), so several
runners are safe.

Channels: the runtime passes the classes ``[channels.*]`` picks and the :class:`Delivery`
(links, write-back) from :mod:`integration.delivery`; without them (tests, previews) every
channel writes through :class:`adapters.channels.FileChannel` under
``outreach.outbox_dir/<channel>/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine

from adapters.channels import Channel, FileChannel
from integration.outreach.pathways import CHANNELS
from integration.outreach.reconciler import ReconcileResult, reconcile
from integration.outreach.sender import Delivery, SweepResult, send_due
from integration.outreach.state import OutreachConfig
from integration.outreach.templates import TemplateCatalog
from integration.ticker import Ticker

__all__ = ["OutreachStage", "catalog_for", "file_channels"]



def file_channels(folder: Path) -> dict[str, Channel]:
    """Every channel name → the development file channel under ``folder/<channel>/``."""
    return {name: FileChannel(folder / name) for name in CHANNELS}


def catalog_for(config: OutreachConfig) -> TemplateCatalog:
    return TemplateCatalog(
        config.outreach.templates_dir,
        default_language=config.default_language,
        max_sms_segments=config.outreach.max_sms_segments,
    )


class OutreachStage:
    def __init__(
        self,
        engine: Engine,
        config: OutreachConfig,
        *,
        channels: Mapping[str, Channel] | None = None,
        catalog: TemplateCatalog | None = None,
        delivery: Delivery | None = None,
        after_run: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.channels = channels if channels is not None else file_channels(
            config.outreach.outbox_dir)
        self.catalog = catalog or catalog_for(config)
        self.delivery = delivery or Delivery()
        self._after_run = after_run
        """Called after each loop turn (the runtime pokes the write-back stage)."""
        self._ticker = Ticker("outreach", config.outreach.interval_s, self._turn)

    def reconcile(self, now: datetime | None = None) -> ReconcileResult:
        return reconcile(self.engine, self.config, now=now, record=self.delivery.record)

    def send_due(self, now: datetime | None = None) -> SweepResult:
        return send_due(self.engine, self.config, self.channels, self.catalog, now=now,
                        delivery=self.delivery)

    def run_once(self, now: datetime | None = None) -> tuple[ReconcileResult, SweepResult]:
        return self.reconcile(now), self.send_due(now)

    # -- the in-process loop -----------------------------------------------------------------
    def start(self) -> None:
        self._ticker.start()

    def poke(self) -> None:
        """New timeline changes were committed: run soon rather than at the next tick."""
        self._ticker.poke()

    def stop(self, timeout: float = 10.0) -> None:
        self._ticker.stop(timeout)

    def _turn(self) -> None:
        self.run_once()
        if self._after_run is not None:
            self._after_run()
