"""What a patient's answer changes, in the caller's transaction (SMS, voice and the portal page
share these).

* :func:`opt_out` / :func:`opt_in`: a number (or email address) leaves or rejoins one channel
  (``address_optouts``; CTIA: STOP opts that number out of that channel only). The planner
  passes over an opted-out address (:mod:`integration.outreach.state` loads them), and the
  scheduled touches to it are cancelled at once.
* :func:`set_preferences`: what the patient chose on the portal page (``patient_preferences``:
  channel, language, channels opted out of).
* :func:`record_request`: confirm, cancel, reschedule or survey answers about one entry
  (``patient_requests``), with their effects: a confirmation marks the patient participant
  ``accepted`` on the timeline; a cancel or reschedule request stops the entry's reminders
  (now, and in every later plan: :mod:`integration.outreach.state` holds the entry); then the
  EHR write is owed (:func:`integration.writeback.enqueue_request`).

Each change that the planner must act on (a channel freed or closed, a new preference) also
writes a ``timeline_changes`` row for the patient (kind ``patient``, change ``updated``), so the
outreach reconciler re-plans their entries: after STOP, the next reminder goes by email if the
pathway allows it; after START, the reminders cancelled by the opt-out come back.

On SQLite the caller holds :func:`integration.db.write_lock`.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from integration.db import dialect_insert
from integration.logs import get_logger
from integration.metrics import count_patient_request
from integration.models import (
    address_optouts,
    patient_preferences,
    patient_requests,
    timeline_changes,
    timeline_entries,
    touches,
)
from integration.outreach.policy import normal_address
from integration.outreach.state import entry_time_key
from integration.replies.matching import address_expr, address_key
from integration.settings import Settings
from integration.writeback import enqueue_request

__all__ = [
    "ACTIONS",
    "CONFIRMED_TAG",
    "OPTED_OUT_REASON",
    "REQUEST_REASONS",
    "opt_in",
    "opt_out",
    "record_request",
    "set_preferences",
]

log = get_logger("careloop.replies")

ACTIONS = ("confirm", "cancel", "reschedule", "survey")
OPTED_OUT_REASON = "opted out by reply"
REQUEST_REASONS = {"cancel": "the patient asked to cancel",
                   "reschedule": "the patient asked to reschedule"}
CONFIRMED_TAG = {"system": "urn:careloop:patient-request", "code": "confirmed",
                 "display": "Confirmed by the patient"}
"""Tag put on an Appointment the patient confirmed (its patient participant is ``accepted``
too, but HL7 v2 feeds often say ``accepted`` from the start)."""
_NUDGE_LIMIT = 50


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)



def _patients_of(conn: Connection, channel: str, address: str) -> list[str]:
    """The (current) patients careloop ever planned or sent a touch to this address for."""
    t, e = touches, timeline_entries
    rows = conn.execute(
        select(e.c.patient_id)
        .select_from(t.join(e, e.c.id == t.c.entry_id))
        .where(t.c.channel == channel, address_expr(t.c.address) == address_key(address))
        .group_by(e.c.patient_id)
        .limit(_NUDGE_LIMIT)
    )
    return sorted(r.patient_id for r in rows)


def _nudge(conn: Connection, patient_ids: Iterable[str], now: datetime) -> None:
    """A ``patient`` change per patient: the reconciler re-plans their current entries."""
    ids = sorted(set(patient_ids))
    if not ids:
        return
    e = timeline_entries
    records = {r.patient_id: r for r in conn.execute(
        select(e.c.id, e.c.patient_id, e.c.status)
        .where(e.c.patient_id.in_(ids), e.c.kind == "patient")
        .order_by(e.c.updated_at)
    )}
    rows = []
    for pid in ids:
        record = records.get(pid)
        rows.append({"entry_id": record.id if record is not None else pid, "patient_id": pid,
                     "kind": "patient", "change": "updated",
                     "status": record.status if record is not None else "", "at": now})
    conn.execute(insert(timeline_changes), rows)


def opt_out(conn: Connection, channel: str, address: str, *, event_id: int | None,
            now: datetime) -> bool:
    """Opt ``address`` out of ``channel``; ``True`` when it was not opted out before (the
    caller confirms only then, once). Scheduled touches to that address on that channel are
    cancelled ("opted out by reply"), whoever they are for."""
    now = _utc(now)
    wanted = normal_address(channel, address)
    if not wanted:
        return False
    inserted = conn.execute(
        dialect_insert(conn, address_optouts)
        .values(channel=channel, address=wanted, at=now, event_id=event_id)
        .on_conflict_do_nothing(index_elements=["channel", "address"])
        .returning(address_optouts.c.channel)
    ).first() is not None
    t = touches
    cancelled = conn.execute(
        update(t)
        .where(t.c.channel == channel, t.c.status == "scheduled",
               address_expr(t.c.address) == address_key(wanted))
        .values(status="cancelled", reason=OPTED_OUT_REASON, updated_at=now)
    ).rowcount
    if inserted:
        _nudge(conn, _patients_of(conn, channel, wanted), now)
    log.info("address_opted_out", source=channel, status="new" if inserted else "again",
             count=cancelled)
    return inserted


def opt_in(conn: Connection, channel: str, address: str, *, now: datetime) -> bool:
    """Remove an opt-out of ``address`` from ``channel``; ``True`` when there was one. The
    patients sent to that address are re-planned, so cancelled reminders come back."""
    now = _utc(now)
    wanted = normal_address(channel, address)
    o = address_optouts
    removed = conn.execute(
        delete(o).where(o.c.channel == channel, o.c.address == wanted)
    ).rowcount > 0
    if removed:
        _nudge(conn, _patients_of(conn, channel, wanted), now)
    log.info("address_opted_in", source=channel, status="removed" if removed else "none")
    return removed


def set_preferences(
    conn: Connection,
    patient_id: str,
    *,
    channel: str | None = None,
    language: str | None = None,
    opted_out: Collection[str] | None = None,
    now: datetime,
) -> None:
    """Upsert the patient's ``patient_preferences`` row; ``None`` leaves a field as it is
    (``channel=""`` or ``language=""`` clears it). The patient's entries are re-planned."""
    now = _utc(now)
    p = patient_preferences
    values: dict[str, Any] = {}
    if channel is not None:
        values["preferred_channel"] = channel or None
    if language is not None:
        values["language"] = language or None
    if opted_out is not None:
        values["opted_out"] = sorted(set(opted_out))
    existing = conn.execute(
        select(p.c.preferred_channel, p.c.language, p.c.opted_out).where(
            p.c.patient_id == patient_id)
    ).first()
    if existing is not None and all(
        (existing.opted_out or []) == v if k == "opted_out" else getattr(existing, k) == v
        for k, v in values.items()
    ):
        return  # nothing changes: no write, no re-plan
    stmt = dialect_insert(conn, p).values(patient_id=patient_id, updated_at=now, **values)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["patient_id"], set_={**values, "updated_at": now}))
    _nudge(conn, [patient_id], now)


def _is_patient_actor(actor: object) -> bool:
    if not isinstance(actor, Mapping):
        return False
    reference = str(actor.get("reference") or "")
    return reference.startswith("Patient/") or "/Patient/" in reference or (
        not reference and actor.get("type") == "Patient")


def confirmed_resource(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The Appointment with its patient participant ``accepted`` (added if it has none) and
    :data:`CONFIRMED_TAG` in ``meta.tag``."""
    out = copy.deepcopy(dict(resource))
    participants = [p for p in out.get("participant") or [] if isinstance(p, dict)]
    mine = next((p for p in participants if _is_patient_actor(p.get("actor"))), None)
    if mine is None:
        mine = {"actor": {"type": "Patient"}, "required": "required"}
        participants.append(mine)
    mine["status"] = "accepted"
    out["participant"] = participants
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag") or []
            if not (isinstance(t, Mapping) and t.get("system") == CONFIRMED_TAG["system"])]
    meta["tag"] = [*tags, dict(CONFIRMED_TAG)]
    out["meta"] = meta
    return out


def _entry(conn: Connection, entry_id: str) -> Any:
    e = timeline_entries
    query = select(e.c.id, e.c.patient_id, e.c.kind, e.c.status, e.c.time, e.c.resource_type,
                   e.c.resource).where(e.c.id == entry_id)
    if conn.dialect.name == "postgresql":
        # The sender holds FOR SHARE on the entries it is sending about: a cancel request
        # commits either before its check or after its send, never in between.
        query = query.with_for_update()
    return conn.execute(query).first()


def record_request(
    conn: Connection,
    settings: Settings,
    *,
    entry_id: str,
    patient_id: str,
    action: str,
    source: str,
    event_id: int | None,
    touch_key: str | None,
    detail: Mapping[str, Any] | None,
    now: datetime,
) -> int | None:
    """Record what the patient asked about ``entry_id`` and apply it (module docstring).

    ``None`` when this ``(event_id, action)`` was recorded before (a redelivered webhook, a
    reprocessed event): nothing is applied twice. Returns the ``patient_requests`` id.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    now = _utc(now)
    entry = _entry(conn, entry_id)
    stored = dict(detail or {})
    if action == "reschedule" and entry is not None and entry.time is not None:
        # Held only while the entry keeps this time: once the clinic moves it, the reminders
        # for the new time go out (integration.outreach.state).
        stored["entry_time"] = entry_time_key(_utc(entry.time))
    r = patient_requests
    request_id = conn.execute(
        dialect_insert(conn, r)
        .values(entry_id=entry_id, patient_id=patient_id, action=action, source=source,
                event_id=event_id, touch_key=touch_key, detail=stored or None, created_at=now)
        .on_conflict_do_nothing(index_elements=["event_id", "action"])
        .returning(r.c.id)
    ).scalar()
    if request_id is None:
        return None
    if entry is not None and action == "confirm" and entry.resource_type == "Appointment":
        _confirm(conn, entry, now)
    elif action in REQUEST_REASONS:
        t = touches
        cancelled = conn.execute(
            update(t)
            .where(t.c.entry_id == entry_id, t.c.status == "scheduled")
            .values(status="cancelled", reason=REQUEST_REASONS[action], updated_at=now)
        ).rowcount
        log.info("patient_request_held", entry_id=entry_id, count=cancelled)
    enqueue_request(conn, settings, request_id=int(request_id), action=action,
                    entry_id=entry_id, patient_id=patient_id, source=source,
                    detail=detail, now=now)
    log.info("patient_request_recorded", entry_id=entry_id, patient_id=patient_id,
             status=action, source=source)
    count_patient_request(action, source)
    return int(request_id)


def _confirm(conn: Connection, entry: Any, now: datetime) -> None:
    resource = entry.resource or {}
    changed = confirmed_resource(resource)
    if changed == resource:
        return
    e = timeline_entries
    # The ordinal stays: a newer version from the source still wins over this mark.
    conn.execute(update(e).where(e.c.id == entry.id).values(resource=changed, updated_at=now))
    conn.execute(insert(timeline_changes).values(
        entry_id=entry.id, patient_id=entry.patient_id, kind=entry.kind, change="updated",
        status=entry.status, at=now))
