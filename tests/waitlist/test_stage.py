"""The waitlist stage: cancellations in, offers out, on a thread."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from tests.outreach.support import NY, ny
from tests.waitlist.support import (
    T0,
    FakeScheduling,
    book,
    cancel,
    channels,
    join_waitlist,
    make_settings,
    offers,
    sent,
    slots,
)

EARLY = ny(2026, 3, 5, 10, 0)


def _setup(engine: Engine, db_url: str, tmp_path: Path) -> None:
    settings = make_settings(db_url, tmp_path)
    entry = book(engine, filler="FA", mrn="MRNA", start=ny(2026, 3, 20, 10, 0))
    join_waitlist(engine, settings, entry)
    book(engine, filler="FD", mrn="MRND", start=EARLY, phone="5550104")
    cancel(engine, filler="FD", mrn="MRND", start=EARLY, at=T0 + timedelta(minutes=5),
           phone="5550104")


class TestWaitlistStage:
    def test_run_once(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        from integration.waitlist import WaitlistStage

        _setup(engine, db_url, tmp_path)
        stage = WaitlistStage(engine, make_settings(db_url, tmp_path), channels(tmp_path),
                              FakeScheduling())
        freed, result = stage.run_once(T0 + timedelta(minutes=6))
        assert (freed, result.offered) == (1, 1)
        assert stage.run_once(T0 + timedelta(minutes=7))[0] == 0
        (offer,) = offers(engine)
        outcome = asyncio.run(stage.accept(offer.id, now=T0 + timedelta(minutes=8)))
        assert outcome.status == "requested"  # an HL7 v2 slot: staff book it

    def test_thread(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        """Started on the real clock, the stage finds the cancellation and sends the offer
        without being asked; stopped, it stops."""
        from integration.waitlist import WaitlistStage

        now = datetime.now(NY).replace(microsecond=0)
        settings = make_settings(db_url, tmp_path, outreach={
            "outbox_dir": tmp_path / "outbox", "quiet_hours": "off"})
        entry = book(engine, filler="FA", mrn="MRNA", start=now + timedelta(days=20), at=now)
        join_waitlist(engine, settings, entry, now)
        book(engine, filler="FD", mrn="MRND", start=now + timedelta(days=3), phone="5550104",
             at=now)
        cancel(engine, filler="FD", mrn="MRND", start=now + timedelta(days=3),
               at=now + timedelta(seconds=1), phone="5550104")
        stage = WaitlistStage(engine, settings, channels(tmp_path), interval_s=0.05)
        stage.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not sent(tmp_path, "offer:"):
                time.sleep(0.05)
            stage.poke()
        finally:
            stage.stop()
        assert _consumed(engine) and stage._ticker._thread is None
        assert [m["key"] for m in sent(tmp_path, "offer:")] == ["offer:1"]
        assert [s.status for s in slots(engine)] == ["offering"]


def _consumed(engine: Engine) -> bool:
    from sqlalchemy import select

    from integration.models import outreach_cursors

    with engine.connect() as conn:
        row = conn.execute(select(outreach_cursors.c.last_id).where(
            outreach_cursors.c.name == "waitlist")).first()
    return row is not None and row.last_id > 0
