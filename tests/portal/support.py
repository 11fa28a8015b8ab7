"""Builders for the patient page tests: a runtime whose settings have pathways, a portal
secret and a write-back connection; real touches made by pushing HL7 v2 messages through the
processing stage and the outreach reconciler (tests/outreach/support.py); signed links.

Appointments are in March 2030 (New York time), so they are still ahead whatever day the
tests run, and their dates read the same in every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine, insert, select

from integration.api import create_app
from integration.models import touches
from integration.outreach.stage import OutreachStage, file_channels
from integration.outreach.state import OutreachConfig
from integration.portal import page as portal_page
from integration.portal.links import LinkSigner, load_secret
from integration.runtime import Runtime
from integration.settings import Settings
from tests.helpers import settings_for
from tests.outreach.support import PATHWAYS, adt_a03, ny, rde, receive, siu

T0 = ny(2030, 3, 1, 9, 0)
START = ny(2030, 3, 12, 14, 0)  # a Tuesday, 14:00 in New York (EDT)
SECRET = "portal-test-secret-0123456789abcdef"


def portal_settings(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "inprocess_worker": False,
        "pathways": PATHWAYS,
        "timezone": "America/New_York",
        "base_url": "https://care.example",
        "keys_dir": tmp_path / "keys",
        "organization": {"name": "Example Clinic", "phone": "+1 555 0100",
                         "link": "https://portal.example/p"},
        "channels": {"portal": {"secret": SECRET, "link_ttl": "P14D"}},
        "outreach": {"max_per_day": 5, "max_per_week": 20, "outbox_dir": tmp_path / "outbox"},
        "connections": [{"name": "ehr", "fhir_base": "https://ehr.example/fhir",
                         "client_id": "careloop", "mode": "poll", "write_back": True}],
    }
    values.update(overrides)
    return settings_for(url, **values)


def portal_app(runtime: Runtime) -> FastAPI:
    """The real app, with the portal router (included here until the app includes it)."""
    app = create_app(runtime)
    paths = {getattr(r, "path", "") for r in app.routes}
    if "/p/{token}" not in paths:
        app.include_router(portal_page.router)
    return app


@dataclass
class Portal:
    settings: Settings
    runtime: Runtime
    tmp: Path
    _control: int = 0

    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    @property
    def signer(self) -> LinkSigner:
        portal = self.settings.channels.portal
        return LinkSigner(load_secret(portal.secret, self.settings.keys_dir),
                          self.settings.base_url, portal.link_ttl)

    def token(self, touch_id: int, *, now: datetime | None = None, kind: str = "t") -> str:
        return self.signer.token(kind, touch_id, now=now or datetime.now(UTC))

    def url(self, touch_id: int, *, now: datetime | None = None, kind: str = "t") -> str:
        return f"/p/{self.token(touch_id, now=now, kind=kind)}"

    def _next(self, prefix: str) -> str:
        self._control += 1
        return f"{prefix}{self._control}"

    def _reconcile(self, now: datetime) -> None:
        stage = OutreachStage(self.engine, OutreachConfig.from_settings(self.settings),
                              channels=file_channels(self.tmp / "outbox"))
        stage.reconcile(now)

    def _touch(self, prefix: str, entry_hint: str | None = None) -> Any:
        with self.engine.connect() as conn:
            rows = [r for r in conn.execute(select(touches).order_by(touches.c.id))
                    if r.key.startswith(prefix)]
        if entry_hint is not None:
            rows = [r for r in rows if r.entry_id == entry_hint]
        assert rows, prefix
        return rows[-1]

    def appointment(self, *, mrn: str = "MRN1", lang: str = "es^Spanish^HL70296",
                    filler: str = "F1", start: datetime = START) -> Any:
        """A SIU S12 booking; returns its 3-day reminder touch (row)."""
        receive(self.engine, siu("S12", self._next("C"), filler=filler, start=start, sent=T0,
                                 mrn=mrn, lang=lang), T0)
        self._reconcile(T0)
        with self.engine.connect() as conn:
            rows = [r for r in conn.execute(select(touches).order_by(touches.c.id))
                    if r.key.startswith("appointment-reminder|0|")]
        return rows[-1]

    def discharge(self, *, mrn: str = "MRN7", lang: str = "en^English^HL70296") -> Any:
        """An ADT A03 discharge; returns its survey touch (row)."""
        discharged = T0 + timedelta(hours=2)
        receive(self.engine, adt_a03(self._next("A"), visit=self._next("V"),
                                     admitted=T0, discharged=discharged, mrn=mrn, lang=lang),
                discharged)
        self._reconcile(discharged)
        return self._touch("survey|0|")

    def refill(self, *, mrn: str = "MRN8", lang: str = "en^English^HL70296") -> Any:
        """An RDE order with refills; returns its refill reminder touch (row)."""
        receive(self.engine, rde(self._next("R"), order=self._next("O"), authored=T0,
                                 refills=2, days=30, mrn=mrn, lang=lang), T0)
        self._reconcile(T0)
        return self._touch("refill-reminder|0|")


# --- the patient's own page, rebooking and waitlist offers ------------------------------------

BIRTH_DATE = {"day": "1", "month": "1", "year": "1980"}
"""The date of birth of every HL7 v2 patient these tests make (PID-7 19800101)."""


def with_self_service(app: FastAPI) -> FastAPI:
    """Put the patient-page and offer routers in front of the touch page's (which would
    otherwise take every ``/p/{token}``), unless the app already has them."""
    from integration.portal import home, offer

    def router_of(route: Any) -> Any:
        return getattr(route, "original_router", None)

    routes = app.router.routes
    if any(router_of(r) is home.router or getattr(r, "path", "") == "/p/{token:patient_token}"
           for r in routes):
        return app
    before = len(routes)
    app.include_router(home.router)
    app.include_router(offer.router)
    added = routes[before:]
    del routes[before:]
    first = next((i for i, r in enumerate(routes) if router_of(r) is portal_page.router
                  or str(getattr(r, "path", "")).startswith("/p/{token}")), before)
    routes[first:first] = added
    return app


def self_service_app(runtime: Runtime) -> FastAPI:
    return with_self_service(portal_app(runtime))


def patient_resource_id(engine: Engine, patient_id: str) -> str:
    """The id of the patient's record as the HL7 v2 mapping made it (``Patient/<id>``)."""
    from integration.models import timeline_entries

    with engine.connect() as conn:
        resource = conn.execute(select(timeline_entries.c.resource).where(
            timeline_entries.c.patient_id == patient_id,
            timeline_entries.c.kind == "patient")).scalar_one()
    return str(resource["id"])


def add_care_plan(engine: Engine, patient_id: str, *, when: str = "2030-03-10T10:00:00-04:00",
                  activity: str = "Blood pressure check") -> None:
    """A CarePlan with one scheduled activity on the HL7 v2 patient's timeline (FHIR content
    referring to the patient as the HL7 v2 feed named them)."""
    from integration.db import write_lock
    from integration.timeline import SourceRef, apply

    plan = {
        "resourceType": "CarePlan", "id": f"cp-{patient_id[:8]}", "status": "active",
        "intent": "plan", "title": "Heart health",
        "subject": {"reference": f"Patient/{patient_resource_id(engine, patient_id)}"},
        "period": {"start": "2030-03-01"},
        "activity": [{"detail": {"status": "scheduled", "code": {"text": activity},
                                 "scheduledPeriod": {"start": when}}}],
    }
    source = SourceRef("hl7v2", "EPIC^MAIN", f"test/careplan/{patient_id}", "1",
                       T0.astimezone(UTC))
    with write_lock(engine), engine.begin() as conn:
        apply(conn, [plan], source, T0)


def free_slot(start: datetime, *, minutes: int = 30, ref: str = "Slot/s1") -> Any:
    from integration.scheduling import FreeSlot

    return FreeSlot(ref=ref, schedule_ref="Schedule/sch1", start=start.astimezone(UTC),
                    end=(start + timedelta(minutes=minutes)).astimezone(UTC), version="1",
                    service="Check-up", location="Main Street Clinic")


@dataclass
class FakeScheduling:
    """Stands in for :class:`integration.scheduling.SchedulingService` on ``runtime``: every
    entry is in ``mode``; ``free_slots`` answers from ``slots``; ``rebook`` answers
    ``outcome`` (a booked one also writes its ``bookings`` row, as the real one does)."""

    engine: Engine
    slots: list[Any]
    mode_value: str = "slots"
    outcome: str = "booked"
    alternatives: list[Any] | None = None
    record_booking: bool = True
    """False: a booked outcome without a ``bookings`` row (no booking id)."""
    searches: list[tuple[str, datetime, int]] | None = None
    rebooked: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.searches, self.rebooked = [], []

    def mode(self, entry_id: str) -> str:
        return self.mode_value

    async def free_slots(self, entry_id: str, *, start: datetime, days: int,
                         limit: int = 30) -> list[Any]:
        assert self.searches is not None
        self.searches.append((entry_id, start, days))
        end = start + timedelta(days=days)
        return [s for s in self.slots if start <= s.start < end][:limit]

    async def rebook(self, *, patient_id: str, entry_id: str | None, slot: Any, source: str,
                     now: datetime | None = None) -> Any:
        from integration.db import write_lock
        from integration.models import bookings
        from integration.scheduling import BookingOutcome

        assert self.rebooked is not None
        self.rebooked.append({"patient_id": patient_id, "entry_id": entry_id, "slot": slot,
                              "source": source})
        ref = slot if isinstance(slot, str) else slot.ref
        chosen = next(s for s in self.slots if s.ref == ref)
        if self.outcome == "conflict":
            return BookingOutcome("conflict", None, None, None,
                                  alternatives=list(self.alternatives or []))
        if self.outcome != "booked":
            return BookingOutcome(self.outcome, None, None, None, message="EHR said no")
        if not self.record_booking:
            return BookingOutcome("booked", None, "Appointment/new1", chosen.start)
        at = now or datetime.now(UTC)
        with write_lock(self.engine), self.engine.begin() as conn:
            booking_id = conn.execute(insert(bookings).values(
                patient_id=patient_id, old_entry_id=entry_id, connection="ehr",
                slot_ref=ref, start=chosen.start, end=chosen.end, source=source,
                method="transaction", status="booked", new_appointment_ref="Appointment/new1",
                started_at=at, finished_at=at).returning(bookings.c.id)).scalar_one()
        return BookingOutcome("booked", int(booking_id), "Appointment/new1", chosen.start)
