"""Patients: ``GET /console/patients`` (role ``viewer``: a form) and
``GET /console/patients/{id}`` (PHI access needed; every view audited).

The form opens a patient by careloop id, or by identifier ``system|value`` (exact, as stored:
no fuzzy matching); a lookup by identifier needs PHI access too, since whether a person is
known is itself patient data. The patient page follows merges (a replaced id shows its
survivor, saying so) and shows the patient's identifiers, the ids merged into it, the
timeline (kind, status, time, summary, and where each entry came from, with a link to the
HL7 v2 message in the console), filtered by kind and in keyset pages, and the patient's
touches (pathway, step, channel, status, reason).

Before the page is answered, :func:`integration.console.auth.record_view` writes the
``console.phi_view`` audit row (target ``patient``, the survivor's id); a view that cannot be
audited is not shown (503). A person without PHI access gets a 403 page and nothing is
audited, as nothing was seen.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from integration.console.auth import Session, Viewer, now_for, record_view, require_phi, runtime_of
from integration.console.render import HEADERS, ConsoleError, render
from integration.identity import find_by_identifier, patient_summary, resolve_id
from integration.models import touches
from integration.timeline import KINDS, Cursor, CursorError, TimelineQuery, read_page

__all__ = ["PAGE_SIZE", "PatientView", "SourceLink", "load_patient", "router", "source_link"]

router = APIRouter(include_in_schema=False, tags=["console"])

PAGE_SIZE = 25
TOUCH_LIMIT = 100
TIMELINE_KINDS = tuple(sorted(set(KINDS.values())))
_INBOX_REF = re.compile(r"^inbox/(\d+)(?:#(.*))?$")
_MAX_ID = 64


@dataclass(frozen=True)
class SourceLink:
    """Where one version of an entry came from, as shown: a link for an HL7 v2 message."""

    system: str
    text: str
    href: str | None
    received_at: str | None


@dataclass(frozen=True)
class PatientView:
    asked: str
    """The id that was asked for (a replaced patient's, possibly)."""
    summary: dict[str, Any]
    """:func:`integration.identity.patient_summary` of the survivor."""
    entries: list[dict[str, Any]]
    sources: dict[str, list[SourceLink]]
    next_cursor: str | None
    touches: list[Any]

    @property
    def id(self) -> str:
        return str(self.summary["id"])


def source_link(source: dict[str, Any]) -> SourceLink:
    """An entry source (``entry_sources`` as :func:`read_page` gives it) as a link: an HL7 v2
    source's ref is ``inbox/<id>#<MSH-10>``, which the messages page shows."""
    ref = str(source.get("ref") or "")
    connection = str(source.get("connection") or "")
    system = str(source.get("system") or "")
    found = _INBOX_REF.match(ref) if system == "hl7v2" else None
    if found is not None:
        control = f" ({found.group(2)})" if found.group(2) else ""
        return SourceLink(system, f"HL7 v2 message {found.group(1)}{control} from {connection}",
                          f"/console/messages/{found.group(1)}", source.get("received_at"))
    return SourceLink(system, f"{system.upper() if system == 'fhir' else system} {ref} from "
                      f"{connection}", None, source.get("received_at"))


def _survivor(engine: Engine, patient_id: str) -> str | None:
    with engine.connect() as conn:
        return resolve_id(conn, patient_id)


def load_patient(engine: Engine, session: Session, patient_id: str, *, kind: str | None,
                 cursor: str | None, now: datetime) -> PatientView | None:
    """Resolve ``patient_id`` (following merges), audit the view, then read what the page
    shows; None when there is no such patient (nothing audited)."""
    survivor = _survivor(engine, patient_id)
    if survivor is None:
        return None
    after = None
    if cursor:
        try:
            after = Cursor.decode(cursor, survivor)
        except CursorError as exc:
            raise ConsoleError(400, "Bad page link", str(exc)) from None
    detail: dict[str, object] = {}
    if survivor != patient_id:
        detail["asked"] = patient_id
    if kind:
        detail["kind"] = kind
    if cursor:
        detail["page"] = "later"
    try:
        record_view(engine, session, "patient", survivor, now=now, detail=detail or None)
    except SQLAlchemyError:
        raise ConsoleError(503, "Not available",
                           "The view could not be recorded in the audit log, so it is not "
                           "shown. Try again in a moment.") from None
    with engine.connect() as conn:
        summary = patient_summary(conn, survivor)
        page = read_page(conn, TimelineQuery(patient_id=survivor, kinds=[kind] if kind else (),
                                             limit=PAGE_SIZE, after=after))
        ids = [survivor, *(m["id"] for m in summary["merged"])]
        t = touches
        rows = conn.execute(
            select(t.c.id, t.c.pathway, t.c.step, t.c.entry_id, t.c.channel, t.c.status,
                   t.c.reason, t.c.due_at, t.c.sent_at, t.c.delivery)
            .where(t.c.patient_id.in_(ids)).order_by(t.c.id.desc()).limit(TOUCH_LIMIT)
        ).all()
    sources = {item["id"]: [source_link(s) for s in item["sources"]] for item in page.items}
    return PatientView(
        asked=patient_id, summary=summary, entries=page.items, sources=sources,
        next_cursor=page.next.encode(survivor) if page.next is not None else None,
        touches=list(rows))


def _check_kind(kind: str | None) -> str | None:
    if not kind:
        return None
    if kind not in TIMELINE_KINDS:
        raise ConsoleError(400, "Unknown kind",
                           f"Kind is one of {', '.join(TIMELINE_KINDS)}.")
    return kind


def _find(engine: Engine, system: str, value: str) -> str | None:
    with engine.connect() as conn:
        return find_by_identifier(conn, system, value)


@router.get("/console/patients")
async def console_patients(
    request: Request, session: Viewer,
    patient: Annotated[str | None, Query(alias="id")] = None,
    identifier: str | None = None,
) -> Response:
    """The form (``id`` or ``identifier`` = ``system|value``); a filled form goes on to the
    patient's page (303), PHI access needed."""
    wanted = (patient or "").strip()
    ident = (identifier or "").strip()
    if not wanted and not ident:
        return render("patients.html", session=session, active="patients")
    require_phi(session)
    if wanted:
        if len(wanted) > _MAX_ID:
            raise ConsoleError(404, "No such patient", "No patient has this id.")
        return RedirectResponse(f"/console/patients/{quote(wanted, safe='')}", status_code=303,
                                headers=HEADERS)
    system, sep, value = ident.partition("|")
    if not sep or not system.strip() or not value.strip() or len(ident) > 800:
        return render("patients.html", 400, session=session, active="patients",
                      identifier=ident, error="Write the identifier as system|value, e.g. "
                      "http://hospital.example.org/mrn|12345.")
    found = await asyncio.to_thread(_find, runtime_of(request).engine, system.strip(),
                                    value.strip())
    if found is None:
        return render("patients.html", 404, session=session, active="patients",
                      identifier=ident, error="No patient has this identifier.")
    return RedirectResponse(f"/console/patients/{quote(found, safe='')}", status_code=303,
                            headers=HEADERS)


@router.get("/console/patients/{patient_id}")
async def console_patient(request: Request, session: Viewer, patient_id: str,
                          kind: str | None = None, cursor: str | None = None) -> Response:
    """One patient: identifiers, merges, the timeline (``kind`` filter, ``cursor`` pages) and
    the touches (tables ``identifiers``, ``merged``, ``timeline``, ``touches``). Audited."""
    require_phi(session)
    chosen = _check_kind(kind)
    if len(patient_id) > _MAX_ID or (cursor is not None and len(cursor) > 400):
        raise ConsoleError(404, "No such patient", "No patient has this id.")
    view = await asyncio.to_thread(load_patient, runtime_of(request).engine, session,
                                   patient_id, kind=chosen, cursor=cursor,
                                   now=now_for(request))
    if view is None:
        raise ConsoleError(404, "No such patient", "No patient has this id.")
    base = f"/console/patients/{quote(view.id, safe='')}"
    filters = {"kind": chosen} if chosen else {}
    next_href = (f"{base}?{urlencode({**filters, 'cursor': view.next_cursor})}"
                 if view.next_cursor else None)
    first_href = f"{base}?{urlencode(filters)}" if cursor else None
    return render("patient.html", session=session, active="patients", p=view,
                  kinds=TIMELINE_KINDS, kind=chosen or "", base=base, next_href=next_href,
                  first_href=first_href, when_text=_when_text, touch_limit=TOUCH_LIMIT)


def _when_text(value: object) -> str:
    """An ISO time from the timeline (``2025-03-04T09:00:00Z``) or a stored datetime, as the
    console shows times (UTC)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    text = str(value)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment.tzinfo else text
