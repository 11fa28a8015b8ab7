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
from sqlalchemy import Engine, select

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
