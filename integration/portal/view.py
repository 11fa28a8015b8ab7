"""What the patient page shows, read from the database.

:func:`load_page` reads everything one page needs in the caller's connection (the touch, its
timeline entry, the patient as outreach sees them, the patient's earlier requests) and returns a
:class:`PortalPage`: plain data that the template renders and the actions check. The rest are
pure functions: which language, which kind of page, the appointment's status in words.

What the page may show is deliberately narrow: the patient's given name, the coded service,
time and place of the appointment, the instruction text the outreach template writes for the
portal, and the patient's own contact preferences. Never notes, values or other patients' data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from babel.core import Locale, UnknownLocaleError
from babel.dates import format_date, format_time
from sqlalchemy import Connection, func, select

from integration.logs import get_logger
from integration.models import patient_preferences, patient_requests, patients, timeline_entries
from integration.models import touches as touches_table
from integration.outreach.pathways import CHANNELS, Trigger
from integration.outreach.planner import Entry, Touch
from integration.outreach.policy import Recipient
from integration.outreach.sender import message_values
from integration.outreach.state import (
    OutreachConfig,
    StoredTouch,
    aware,
    entry_time_key,
    load_snapshot,
    recipient_for,
)
from integration.outreach.templates import TemplateCatalog
from integration.portal.i18n import N_, available_languages, normalize
from integration.portal.links import PortalLink
from integration.replies.effects import CONFIRMED_TAG

__all__ = [
    "APPOINTMENT_ACTIONS",
    "CHANNEL_LABELS",
    "DONE_MESSAGES",
    "HEADINGS",
    "OPT_OUT_LABELS",
    "STATUS_LABELS",
    "Appointment",
    "PortalPage",
    "Preferences",
    "appointment_status",
    "form_version",
    "is_survey",
    "load_language",
    "load_page",
    "page_kind",
    "page_language",
]

log = get_logger("careloop.portal")

APPOINTMENT_ACTIONS = ("confirm", "cancel", "reschedule")

HEADINGS = {
    "appointment": N_("Your appointment"),
    "survey": N_("How was your visit?"),
    "followup": N_("After your visit"),
    "medication": N_("Your medication"),
    "careplan": N_("Your care plan"),
    "patient": N_("Your contact preferences"),
}

STATUS_LABELS = {
    "booked": N_("Booked"),
    "confirmed": N_("Confirmed"),
    "cancel-requested": N_("You asked to cancel"),
    "reschedule-requested": N_("You asked for a new time"),
    "cancelled": N_("Cancelled"),
    "pending": N_("Not yet booked"),
    "checked-in": N_("Checked in"),
    "completed": N_("Completed"),
    "missed": N_("Missed"),
}

CHANNEL_LABELS = {
    "sms": N_("Text message (SMS)"),
    "email": N_("Email"),
    "voice": N_("Phone call"),
    "portal": N_("This patient page"),
}

OPT_OUT_LABELS = {
    "sms": N_("Stop text messages"),
    "email": N_("Stop emails"),
    "voice": N_("Stop phone calls"),
    "portal": N_("Stop messages that link to this page"),
}

DONE_MESSAGES = {
    "confirm": N_("Thank you. Your appointment is confirmed."),
    "cancel": N_("We have your request to cancel. The clinic will contact you if needed."),
    "reschedule": N_("We have your request for a new time. The clinic will contact you to "
                     "agree on one."),
    "survey": N_("Thank you for your answer."),
    "preferences": N_("Your preferences are saved."),
}

_CANCELLED = frozenset({"cancelled", "entered-in-error", "deleted"})
_OPEN = frozenset({"booked", "pending", "proposed", "waitlist"})
_DONE = {"fulfilled": "completed", "noshow": "missed", "arrived": "checked-in",
         "checked-in": "checked-in"}
_REQUESTED = {"confirm": "confirmed", "cancel": "cancel-requested",
              "reschedule": "reschedule-requested"}


@dataclass(frozen=True)
class Appointment:
    service: str
    start: datetime | None
    """In the patient's time zone."""
    date_text: str
    time_text: str
    location: str
    status: str
    """A key of :data:`STATUS_LABELS`."""
    actionable: bool
    """Confirm, cancel and reschedule are offered (still open, not yet started)."""
    passed: bool


@dataclass(frozen=True)
class Preferences:
    channel: str | None
    language: str
    opted_out: frozenset[str]
    channels: tuple[str, ...] = CHANNELS
    languages: tuple[str, ...] = ()
    """The configured languages (the patient's messages can be in any of these)."""


@dataclass(frozen=True)
class PortalPage:
    kind: str
    """A key of :data:`HEADINGS`."""
    language: str
    patient_id: str
    given_name: str
    preferences: Preferences
    version: str
    """Changes whenever the patient's requests or preferences do: sent back with each form,
    so a double submit of one form is one event, while the same answer given again later
    (confirm, ask to cancel, confirm again) is a new one."""
    touch: StoredTouch | None = None
    entry_id: str | None = None
    appointment: Appointment | None = None
    instruction: str = ""
    survey_answered: bool = False
    address: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def survey(self) -> bool:
        return self.kind == "survey"


def is_survey(pathway: str, template: str) -> bool:
    return "survey" in pathway.lower() or "survey" in template.lower()


def page_kind(config: OutreachConfig, touch: StoredTouch, entry: Entry) -> str:
    """What the touch is about, by its pathway's trigger (the entry's kind when the pathway is
    no longer configured): a reminder about a fulfilled appointment is a visit follow-up."""
    if is_survey(touch.pathway, touch.template):
        return "survey"
    pathway = config.by_name.get(touch.pathway)
    trigger = pathway.on if pathway is not None else None
    if trigger is Trigger.APPOINTMENT or (
        trigger is None and entry.kind == "appointment" and entry.status != "fulfilled"
    ):
        return "appointment"
    if trigger is Trigger.MEDICATION_REFILL or (trigger is None and entry.kind == "medication"):
        return "medication"
    if trigger is Trigger.CAREPLAN_ACTIVITY or (trigger is None and entry.kind == "careplan"):
        return "careplan"
    return "followup"


def page_language(
    override: str | None, touch_language: str | None, patient_language: str | None,
    default_language: str, languages: Sequence[str] | None = None,
) -> str:
    """``?lang=`` when the page has it, else the touch's language, else the patient's stated
    one, else the configured default (English when the page has none of these)."""
    offered = tuple(languages) if languages is not None else available_languages()
    for candidate in (override, touch_language, patient_language, default_language):
        code = normalize(candidate)
        if code in offered:
            return code
    return "en" if "en" in offered else offered[0]


def _patient_participant(resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for participant in resource.get("participant") or []:
        if not isinstance(participant, dict):
            continue
        actor = participant.get("actor") or {}
        if str(actor.get("reference", "")).startswith("Patient/"):
            return participant
    return None


def _confirmed(resource: Mapping[str, Any]) -> bool:
    """Marked confirmed by the patient (:data:`CONFIRMED_TAG`, which a newer version from the
    EHR replaces), or, on a FHIR resource, its patient participant ``accepted``. The HL7 v2
    mapping marks every booked patient ``accepted`` (SIU carries no patient answer), so there
    that means nothing."""
    meta = resource.get("meta") or {}
    for tag in meta.get("tag") or []:
        if isinstance(tag, dict) and tag.get("system") == CONFIRMED_TAG["system"] and (
                tag.get("code") == CONFIRMED_TAG["code"]):
            return True
    participant = _patient_participant(resource)
    mapped_from_v2 = str(meta.get("source", "")).startswith("urn:careloop:hl7v2")
    return participant is not None and participant.get("status") == "accepted" and (
        not mapped_from_v2)


def appointment_status(
    entry_status: str, resource: Mapping[str, Any],
    requests: Sequence[tuple[str, Mapping[str, Any] | None]], time_key: str | None,
) -> str:
    """The appointment's state as the patient should read it.

    The EHR's word wins when the appointment is over or cancelled. Otherwise the patient's
    latest confirm, cancel or reschedule request (from any channel, oldest first in
    ``requests``) says where it stands, as the outreach planner reads it: a reschedule request
    only while the appointment keeps the time it was asked about (``time_key``), a confirmation
    only while the appointment carries the patient's confirmation.
    """
    if entry_status in _CANCELLED:
        return "cancelled"
    if entry_status in _DONE:
        return _DONE[entry_status]
    latest = next(((a, d) for a, d in reversed(requests) if a in _REQUESTED), None)
    if latest is not None:
        action, detail = latest
        asked_about = (detail or {}).get("entry_time") if isinstance(detail, Mapping) else None
        if action == "cancel":
            return "cancel-requested"
        if action == "reschedule" and (not asked_about or asked_about == time_key):
            return "reschedule-requested"
    if entry_status in ("pending", "proposed", "waitlist"):
        return "pending"
    return "confirmed" if _confirmed(resource) else "booked"


def form_version(last_request_id: int | None, preferences_at: datetime | None) -> str:
    stamp = aware(preferences_at)
    raw = f"{last_request_id or 0}|{stamp.isoformat() if stamp else ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _locale(language: str) -> Locale:
    try:
        return Locale.parse(language.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse("en")


def _survivor(conn: Connection, patient_id: str) -> str | None:
    row = conn.execute(
        select(patients.c.id, patients.c.merged_into).where(patients.c.id == patient_id)
    ).first()
    if row is None:
        return None
    return str(row.merged_into or row.id)


def _recipient(conn: Connection, config: OutreachConfig, patient_id: str) -> Recipient:
    """The patient as outreach sees them (record, then stored preferences, merged ids too)."""
    t = timeline_entries
    best: tuple[tuple[bool, datetime], Mapping[str, Any]] | None = None
    for r in conn.execute(select(t.c.status, t.c.updated_at, t.c.resource).where(
            t.c.patient_id == patient_id, t.c.kind == "patient")):
        rank = (r.status not in ("replaced", "deleted", "entered-in-error"),
                aware(r.updated_at) or datetime.min.replace(tzinfo=UTC))
        if best is None or rank > best[0]:
            best = (rank, r.resource or {})
    merged = select(patients.c.id).where(patients.c.merged_into == patient_id)
    p = patient_preferences
    prefs = list(conn.execute(select(p).where(
        (p.c.patient_id == patient_id) | p.c.patient_id.in_(merged))))
    return recipient_for(config, patient_id, best[1] if best else {}, prefs)


def _versions(conn: Connection, patient_id: str, entry_id: str | None) -> str:
    last = None
    if entry_id is not None:
        last = conn.execute(
            select(func.max(patient_requests.c.id)).where(patient_requests.c.entry_id == entry_id)
        ).scalar()
    at = conn.execute(select(patient_preferences.c.updated_at).where(
        patient_preferences.c.patient_id == patient_id)).scalar()
    return form_version(last, at)


def _preferences(config: OutreachConfig, recipient: Recipient) -> Preferences:
    return Preferences(
        channel=recipient.preferred_channel if recipient.preferred_channel in CHANNELS else None,
        language=normalize(recipient.language) or config.default_language,
        opted_out=frozenset(c for c in recipient.opted_out if c in CHANNELS),
        languages=config.languages,
    )


def _touch(conn: Connection, ident: str) -> tuple[StoredTouch, str] | None:
    """The touch a link names, with the message as it was sent (empty before it was)."""
    if not ident.isdigit() or len(ident) > 18:
        return None
    row = conn.execute(select(touches_table).where(touches_table.c.id == int(ident))).first()
    return (StoredTouch.from_row(row), row.body or "") if row is not None else None


def load_language(
    conn: Connection, config: OutreachConfig, link: PortalLink, *, override: str | None = None
) -> str | None:
    """The language a page for ``link`` would be in, or None when it names nothing (for the
    pages that say an expired link cannot be used)."""
    if link.kind == "t":
        found = _touch(conn, link.ident)
        if found is None:
            return None
        touch = found[0]
        patient_id = _survivor(conn, touch.patient_id) or touch.patient_id
        touch_language: str | None = touch.language
    else:
        patient_id = _survivor(conn, link.ident) or ""
        if not patient_id:
            return None
        touch_language = None
    pref = conn.execute(select(patient_preferences.c.language).where(
        patient_preferences.c.patient_id == patient_id)).scalar()
    return page_language(override, touch_language, pref, config.default_language)


def load_page(
    conn: Connection,
    config: OutreachConfig,
    catalog: TemplateCatalog,
    link: PortalLink,
    *,
    now: datetime,
    override: str | None = None,
) -> PortalPage | None:
    """Everything the page for ``link`` shows; None when the link names nothing we hold."""
    if link.kind == "p":
        patient_id = _survivor(conn, link.ident)
        if patient_id is None:
            return None
        recipient = _recipient(conn, config, patient_id)
        language = page_language(override, None, recipient.language, config.default_language)
        return PortalPage(
            kind="patient", language=language, patient_id=patient_id,
            given_name=recipient.given_name, preferences=_preferences(config, recipient),
            version=_versions(conn, patient_id, None),
        )
    found = _touch(conn, link.ident)
    if found is None:
        return None
    touch, body = found
    snap = load_snapshot(conn, config, [touch.entry_id], now)
    entry = snap.entries.get(touch.entry_id)
    if entry is None:
        return None
    recipient = snap.recipient(config, entry.patient_id)
    language = page_language(override, touch.language, recipient.language,
                             config.default_language)
    kind = page_kind(config, touch, entry)
    requests = [(r.action, r.detail) for r in conn.execute(
        select(patient_requests.c.action, patient_requests.c.detail)
        .where(patient_requests.c.entry_id == entry.id).order_by(patient_requests.c.id))]
    values: dict[str, Any] = {}
    try:
        planned = Touch(
            key=touch.key, pathway=touch.pathway, step=touch.step, entry_id=entry.id,
            patient_id=entry.patient_id, due_at=touch.due_at or now,
            moment=touch.moment or entry.time or now, channel="portal", address=touch.address,
            language=language, template=touch.template,
        )
        values = message_values(config, snap, entry, planned, recipient)
    except KeyError:  # the pathway is no longer configured: the coded summary must do
        values = {}
    appointment = None
    instruction = ""
    if kind == "appointment":
        appointment = _appointment(entry, values, snap.summaries.get(entry.id, ""), requests,
                                   recipient, language, now)
    else:
        instruction = _instruction(catalog, touch, body, entry, values, recipient, language,
                                   snap.summaries.get(entry.id, ""))
    return PortalPage(
        kind=kind, language=language, patient_id=entry.patient_id,
        given_name=recipient.given_name, preferences=_preferences(config, recipient),
        version=_versions(conn, entry.patient_id, entry.id), touch=touch, entry_id=entry.id,
        appointment=appointment, instruction=instruction,
        survey_answered=any(action == "survey" for action, _ in requests),
        address=touch.address,
    )


def _appointment(  # noqa: PLR0917
    entry: Entry, values: Mapping[str, Any], summary: str,
    requests: Sequence[tuple[str, Mapping[str, Any] | None]],
    recipient: Recipient, language: str, now: datetime,
) -> Appointment:
    locale = _locale(language)
    tz = recipient.timezone
    start = entry.time.astimezone(tz) if entry.time is not None else None
    status = appointment_status(entry.status, entry.resource, requests,
                                entry_time_key(entry.time) if entry.time else None)
    passed = start is not None and start <= now
    return Appointment(
        service=str(values.get("service") or "") or summary,
        start=start,
        date_text=format_date(start, "full", locale=locale) if start else "",
        time_text=format_time(start, "short", tzinfo=tz, locale=locale) if start else "",
        location=str(values.get("location") or ""),
        status=status,
        actionable=entry.status in _OPEN and not passed,
        passed=passed,
    )


def _instruction(  # noqa: PLR0917
    catalog: TemplateCatalog, touch: StoredTouch, body: str, entry: Entry,
    values: Mapping[str, Any], recipient: Recipient, language: str, summary: str,
) -> str:
    """The touch's own words for the portal (its template's ``portal`` block, in the page's
    language); else the message as it was sent, when it was sent in this language; else the
    entry's coded summary."""
    if values and touch.template:
        try:
            rendered = catalog.render(touch.template, "portal", language, recipient.timezone,
                                      values)
            if rendered.parts.get("portal"):
                return rendered.parts["portal"]
        except Exception as exc:  # a template that cannot render must not break the page
            log.warning("portal_template_failed", entry_id=entry.id, exc_type=type(exc).__name__)
    if body and normalize(touch.language) == language:
        return body
    return summary
