"""What the patient's own page shows, read from the timeline.

:func:`load_home` reads, in the caller's connection, what is next for one patient: upcoming
appointments (with the patient's latest request about each and whether they wait for an
earlier time), medication orders whose refill is due (and when the supply runs out, the way the
outreach planner computes it), the care-plan activities ahead, the surveys sent and not yet
answered, and the patient's contact preferences. It returns plain data for the template.

Deliberately narrow, like the touch page: coded names of services, places, medications and
activities, and times. Never results, notes or values: those stay in the hospital's own portal
(``[organization] results_link``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, tzinfo
from typing import Any

from babel.dates import format_date, format_time
from sqlalchemy import Connection, func, select

from integration.logs import get_logger
from integration.models import (
    patient_preferences,
    patient_requests,
    patients,
    timeline_entries,
    touches,
    waitlist_entries,
)
from integration.outreach.pathways import Trigger
from integration.outreach.planner import Entry, moments
from integration.outreach.sender import _display, _location
from integration.outreach.state import (
    OutreachConfig,
    aware,
    entry_time_key,
    load_snapshot,
)
from integration.portal.i18n import N_
from integration.portal.view import (
    Preferences,
    _locale,
    _preferences,
    _recipient,
    appointment_status,
    is_survey,
    page_language,
)

__all__ = [
    "HOME_DONE",
    "CarePlanStep",
    "HomeAppointment",
    "HomePage",
    "OpenSurvey",
    "Refill",
    "birth_date",
    "home_appointment",
    "load_home",
    "patient_ids",
    "scheduling_mode",
    "survivor",
]

log = get_logger("careloop.portal")

HOME_DONE = {
    "waitlist": N_("You are on the waitlist. We will send you a message if an earlier time "
                   "becomes free."),
    "leave-waitlist": N_("You are no longer on the waitlist for this appointment."),
    "rebook-requested": N_("We asked the care team to move your appointment to the time you "
                           "chose. They will confirm it with you."),
}
"""What the page says after the waitlist actions (the others: view.DONE_MESSAGES)."""

_CANCELLED = frozenset({"cancelled", "entered-in-error", "deleted", "noshow"})
_OPEN = frozenset({"booked", "pending", "proposed", "waitlist"})
_GONE = frozenset({"cancelled", "entered-in-error", "deleted", "stopped", "completed",
                   "revoked", "replaced", "ended", "on-hold"})
_DONE_ACTIVITY = frozenset({"completed", "cancelled", "stopped", "entered-in-error"})
_LIMIT = 20


@dataclass(frozen=True)
class HomeAppointment:
    entry_id: str
    service: str
    start: datetime | None
    """In the patient's time zone."""
    date_text: str
    time_text: str
    location: str
    status: str
    """A key of :data:`integration.portal.view.STATUS_LABELS`."""
    actionable: bool
    on_waitlist: bool = False


@dataclass(frozen=True)
class Refill:
    entry_id: str
    name: str
    due: datetime | None
    due_text: str


@dataclass(frozen=True)
class CarePlanStep:
    entry_id: str
    plan: str
    activity: str
    when: datetime
    when_text: str


@dataclass(frozen=True)
class OpenSurvey:
    touch_id: int
    visit_text: str
    """The day of the visit it asks about (empty when unknown)."""


@dataclass(frozen=True)
class HomePage:
    patient_id: str
    language: str
    timezone: tzinfo
    given_name: str
    preferences: Preferences
    version: str
    """Changes with every request, preference or waitlist change of the patient: a double
    submit of one form is one event, the same answer given again later is a new one."""
    appointments: list[HomeAppointment] = field(default_factory=list)
    refills: list[Refill] = field(default_factory=list)
    steps: list[CarePlanStep] = field(default_factory=list)
    surveys: list[OpenSurvey] = field(default_factory=list)
    quiet_hours: tuple[str, str] | None = None
    """The hours no message is sent (from ``[outreach] quiet_hours``), as the page shows them."""


async def scheduling_mode(runtime: Any, entry_id: str) -> str:
    """``slots`` when the patient can choose a new time for ``entry_id`` online
    (``runtime.scheduling``, an :class:`integration.scheduling.SchedulingService`), else
    ``request``."""
    service = getattr(runtime, "scheduling", None)
    if service is None:
        return "request"
    try:
        mode = await asyncio.to_thread(service.mode, entry_id)
        if inspect.isawaitable(mode):
            mode = await mode
    except Exception as exc:
        log.warning("portal_scheduling_mode_failed", entry_id=entry_id,
                    exc_type=type(exc).__name__)
        return "request"
    return "slots" if mode == "slots" else "request"


def survivor(conn: Connection, patient_id: str) -> str | None:
    """The current patient for ``patient_id`` (itself unless merged), None when unknown."""
    if not patient_id or len(patient_id) > 64:
        return None
    current = patient_id
    for _ in range(8):
        row = conn.execute(select(patients.c.merged_into).where(
            patients.c.id == current)).first()
        if row is None:
            return None
        if not row.merged_into:
            return current
        current = str(row.merged_into)
    return current


def patient_ids(conn: Connection, patient_id: str) -> list[str]:
    """The patient and the patients merged into them (their touches keep the old id)."""
    merged = conn.execute(select(patients.c.id).where(
        patients.c.merged_into == patient_id)).scalars().all()
    return [patient_id, *sorted(str(m) for m in merged)]


def _record(conn: Connection, patient_id: str) -> Mapping[str, Any]:
    t = timeline_entries
    best: tuple[tuple[bool, datetime], Mapping[str, Any]] | None = None
    for r in conn.execute(select(t.c.status, t.c.updated_at, t.c.resource).where(
            t.c.patient_id == patient_id, t.c.kind == "patient")):
        rank = (r.status not in ("replaced", "deleted", "entered-in-error"),
                aware(r.updated_at) or datetime.min.replace(tzinfo=UTC))
        if best is None or rank > best[0]:
            best = (rank, r.resource or {})
    return best[1] if best else {}


def birth_date(conn: Connection, patient_id: str) -> str | None:
    """The ``birthDate`` of the patient's record on the timeline (as the EHR wrote it)."""
    value = _record(conn, patient_id).get("birthDate")
    return str(value) if value else None


def _version(conn: Connection, ids: Sequence[str]) -> str:
    last = conn.execute(select(func.max(patient_requests.c.id)).where(
        patient_requests.c.patient_id.in_(ids))).scalar()
    prefs = conn.execute(select(func.max(patient_preferences.c.updated_at)).where(
        patient_preferences.c.patient_id.in_(ids))).scalar()
    waits = conn.execute(select(func.max(waitlist_entries.c.updated_at)).where(
        waitlist_entries.c.patient_id.in_(ids))).scalar()
    stamps = [stamp.isoformat() if (stamp := aware(v)) is not None else ""
              for v in (prefs, waits)]
    raw = f"{last or 0}|{'|'.join(stamps)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _floating(moment: datetime) -> bool:
    """A date without a time (the planner reads it in a "floating" zone)."""
    return moment.tzinfo is not None and moment.tzinfo.tzname(None) == "floating"


def _local(moment: datetime, tz: tzinfo) -> datetime:
    if _floating(moment):
        return moment.replace(tzinfo=tz)
    return moment.astimezone(tz)


def _appointment(  # noqa: PLR0917
    entry: Entry, summary: str, requests: Sequence[tuple[str, Mapping[str, Any] | None]],
    tz: tzinfo, language: str, org_name: str, now: datetime, *, on_waitlist: bool,
) -> HomeAppointment:
    res = entry.resource
    locale = _locale(language)
    start = entry.time.astimezone(tz) if entry.time is not None else None
    status = appointment_status(entry.status, res, requests,
                                entry_time_key(entry.time) if entry.time else None)
    passed = start is not None and start <= now
    service = (_display(res.get("serviceType")) or _display(res.get("appointmentType"))
               or _display(res.get("reasonCode")) or _display(res.get("type")) or summary)
    return HomeAppointment(
        entry_id=entry.id, service=service, start=start,
        date_text=format_date(start, "full", locale=locale) if start else "",
        time_text=format_time(start, "short", tzinfo=tz, locale=locale) if start else "",
        location=_location(res) or org_name, status=status,
        actionable=entry.status in _OPEN and not passed, on_waitlist=on_waitlist,
    )


def _medication_name(res: Mapping[str, Any], summary: str) -> str:
    return (_display(res.get("medicationCodeableConcept"))
            or str((res.get("medicationReference") or {}).get("display") or "") or summary)


def _refill(entry: Entry, summary: str, tz: tzinfo, language: str) -> Refill | None:
    """An active order with refills left; with the day its supply runs out when known."""
    res = entry.resource
    if entry.status != "active":
        return None
    refills = (res.get("dispenseRequest") or {}).get("numberOfRepeatsAllowed")
    if not isinstance(refills, int) or refills <= 0:
        return None
    found = moments(Trigger.MEDICATION_REFILL, entry)
    due = _local(found[0][1], tz) if isinstance(found, list) and found else None
    if due is None and found == "the prescription expires before the supply runs out":
        return None
    text = format_date(due, "long", locale=_locale(language)) if due else ""
    return Refill(entry.id, _medication_name(res, summary), due, text)


def _steps(entry: Entry, summary: str, tz: tzinfo, language: str,
           today: datetime) -> list[CarePlanStep]:
    res = entry.resource
    found = moments(Trigger.CAREPLAN_ACTIVITY, entry)
    if not isinstance(found, list):
        return []
    plan = str(res.get("title") or "") or _display(res.get("category")) or summary
    locale = _locale(language)
    out: list[CarePlanStep] = []
    for suffix, moment in found:
        try:
            index = int(suffix.split(":")[1])
            detail = (res.get("activity") or [])[index].get("detail") or {}
        except (IndexError, ValueError, AttributeError):
            continue
        if detail.get("status") in _DONE_ACTIVITY:
            continue
        when = _local(moment, tz)
        if when < today:
            continue
        day = format_date(when, "full", locale=locale)
        text = day if _floating(moment) else (
            f"{day}, {format_time(when, 'short', tzinfo=tz, locale=locale)}")
        activity = _display(detail.get("code")) or str(detail.get("description") or "")
        out.append(CarePlanStep(entry.id, plan, activity or plan, when, text))
    return out


def _surveys(conn: Connection, ids: Sequence[str], tz: tzinfo,
             language: str) -> list[OpenSurvey]:
    t = touches
    rows = conn.execute(
        select(t.c.id, t.c.entry_id, t.c.pathway, t.c.template, t.c.moment)
        .where(t.c.patient_id.in_(ids), t.c.status == "sent").order_by(t.c.id.desc())
        .limit(200)
    ).all()
    wanted = [r for r in rows if is_survey(r.pathway, r.template)]
    if not wanted:
        return []
    answered = set(conn.execute(
        select(patient_requests.c.entry_id).where(
            patient_requests.c.entry_id.in_({r.entry_id for r in wanted}),
            patient_requests.c.action == "survey")
    ).scalars())
    out: list[OpenSurvey] = []
    seen: set[str] = set()
    for r in wanted:
        if r.entry_id in answered or r.entry_id in seen:
            continue
        seen.add(r.entry_id)
        moment = aware(r.moment)
        text = format_date(moment.astimezone(tz), "long", locale=_locale(language)) if (
            moment is not None) else ""
        out.append(OpenSurvey(int(r.id), text))
    return out[:_LIMIT]


def _quiet_hours(config: OutreachConfig, language: str) -> tuple[str, str] | None:
    window = config.outreach.quiet_window
    if window is None:
        return None
    locale = _locale(language)
    return tuple(format_time(t, "short", locale=locale) for t in window)  # type: ignore[return-value]


def _waiting(conn: Connection, ids: Sequence[str]) -> set[str]:
    w = waitlist_entries
    return {str(e) for e in conn.execute(select(w.c.entry_id).where(
        w.c.patient_id.in_(ids), w.c.status == "active", w.c.entry_id.is_not(None))).scalars()}


def _requests(conn: Connection,
              entry_ids: Sequence[str]) -> dict[str, list[tuple[str, Mapping[str, Any] | None]]]:
    out: dict[str, list[tuple[str, Mapping[str, Any] | None]]] = {}
    if not entry_ids:
        return out
    r = patient_requests
    for row in conn.execute(select(r.c.entry_id, r.c.action, r.c.detail).where(
            r.c.entry_id.in_(list(entry_ids))).order_by(r.c.id)):
        out.setdefault(row.entry_id, []).append((row.action, row.detail))
    return out


def load_home(
    conn: Connection,
    config: OutreachConfig,
    patient_id: str,
    *,
    now: datetime,
    override: str | None = None,
) -> HomePage | None:
    """What is next for the patient (``patient_id`` is the current one: see :func:`survivor`);
    None when careloop holds nothing about them."""
    recipient = _recipient(conn, config, patient_id)
    language = page_language(override, None, recipient.language, config.default_language)
    tz = recipient.timezone
    ids = patient_ids(conn, patient_id)
    t = timeline_entries
    today = datetime.combine(now.astimezone(tz).date(), time(0), tz)
    rows = conn.execute(
        select(t.c.id, t.c.kind, t.c.status, t.c.time)
        .where(t.c.patient_id == patient_id, t.c.kind.in_(("appointment", "medication",
                                                           "careplan")))
        .order_by(t.c.time, t.c.id)
    ).all()
    wanted: list[str] = []
    for r in rows:
        start = aware(r.time)
        if r.kind == "appointment":
            if r.status in _CANCELLED or start is None or start < now:
                continue
        elif r.status in _GONE:
            continue
        wanted.append(r.id)
    snap = load_snapshot(conn, config, wanted, now)
    waiting = _waiting(conn, ids)
    appointment_ids = [i for i in wanted if i in snap.entries
                       and snap.entries[i].kind == "appointment"]
    requests = _requests(conn, appointment_ids)
    org_name = config.organization.name
    page = HomePage(
        patient_id=patient_id, language=language, timezone=tz,
        given_name=recipient.given_name, preferences=_preferences(config, recipient),
        version=_version(conn, ids), quiet_hours=_quiet_hours(config, language),
        surveys=_surveys(conn, ids, tz, language),
    )
    for entry_id in wanted:
        entry = snap.entries.get(entry_id)
        if entry is None:
            continue
        summary = snap.summaries.get(entry_id, "")
        if entry.kind == "appointment" and len(page.appointments) < _LIMIT:
            page.appointments.append(_appointment(
                entry, summary, requests.get(entry_id, []), tz, language, org_name, now,
                on_waitlist=entry_id in waiting))
        elif entry.kind == "medication" and len(page.refills) < _LIMIT:
            refill = _refill(entry, summary, tz, language)
            if refill is not None:
                page.refills.append(refill)
        elif entry.kind == "careplan":
            page.steps.extend(_steps(entry, summary, tz, language, today))
    page.refills.sort(key=lambda r: (r.due is None, r.due or now))
    page.steps.sort(key=lambda s: s.when)
    del page.steps[_LIMIT:]
    return page


def home_appointment(
    conn: Connection, config: OutreachConfig, patient_id: str, entry_id: str, *,
    now: datetime, language: str,
) -> HomeAppointment | None:
    """One of the patient's appointments (None when it is not theirs, or not an appointment):
    what the rebooking pages show about the time being changed."""
    if not entry_id or len(entry_id) > 32:
        return None
    row = conn.execute(select(timeline_entries.c.patient_id, timeline_entries.c.kind).where(
        timeline_entries.c.id == entry_id)).first()
    if row is None or row.kind != "appointment" or str(row.patient_id) not in patient_ids(
            conn, patient_id):
        return None
    snap = load_snapshot(conn, config, [entry_id], now)
    entry = snap.entries.get(entry_id)
    if entry is None:
        return None
    recipient = _recipient(conn, config, patient_id)
    requests = _requests(conn, [entry_id]).get(entry_id, [])
    return _appointment(entry, snap.summaries.get(entry_id, ""), requests,
                        recipient.timezone, language, config.organization.name, now,
                        on_waitlist=entry_id in _waiting(conn, patient_ids(conn, patient_id)))
