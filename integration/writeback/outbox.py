"""Putting writes owed to an EHR into the outbox (``ehr_outbox``), in the caller's transaction.

Each function here runs inside the transaction that records what happened (a touch sent, a
reply processed, a request made), so the write-back is owed exactly when the fact is on record.
On SQLite the caller already holds :func:`integration.db.write_lock`. Nothing here talks to the
EHR: :mod:`integration.writeback.flusher` does, later.

The row's ``key`` is also the written resource's identifier value (system
:data:`WRITEBACK_SYSTEM`): one row per key, ever (``INSERT ... ON CONFLICT DO NOTHING``), and one
resource per key in the EHR (conditional create on that identifier).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from integration.logs import get_logger
from integration.models import ehr_outbox, entry_sources, timeline_entries
from integration.settings import Connection as EHRConnection
from integration.settings import Settings
from integration.writeback.references import (
    entry_fhir_connections,
    entry_reference,
    entry_resource_type,
    fhir_ref,
    patient_reference,
)
from integration.writeback.resources import (
    APPOINTMENT_CANCELLATION_REASON,
    WRITEBACK_SYSTEM,
    appointment_response,
    reply_communication,
    task,
    touch_communication,
)

__all__ = [
    "WRITEBACK_SYSTEM",
    "enqueue",
    "enqueue_reply",
    "enqueue_request",
    "enqueue_touch",
    "touch_key_of",
    "write_back_connection",
]

log = get_logger("careloop.writeback")

JSON = dict[str, Any]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def enqueue(
    conn: Connection,
    *,
    key: str,
    connection: str,
    resource_type: str,
    resource: dict[str, Any],
    operation: str = "create",
    target: str | None = None,
    touch_id: int | None = None,
    event_id: int | None = None,
    now: datetime,
) -> bool:
    """Owe the EHR behind ``connection`` one write, unless ``key`` is already owed (or written).

    ``create``: ``resource`` is the resource to create; its ``identifier`` gets
    ``{system: WRITEBACK_SYSTEM, value: key}`` first (other identifiers are kept).
    ``update``: ``resource`` is the change spec for ``target`` (``Type/id``), see
    :func:`integration.writeback.resources.apply_change`. ``True`` if a row was inserted.
    """
    if operation not in ("create", "update"):
        raise ValueError(f"operation must be create or update, not {operation!r}")
    if operation == "update" and not target:
        raise ValueError("an update needs its target (Type/id)")
    if len(key) > 255:
        raise ValueError("an outbox key is at most 255 characters")
    body = copy.deepcopy(resource)
    if operation == "create":
        others = [i for i in body.get("identifier") or []
                  if not (isinstance(i, Mapping) and i.get("system") == WRITEBACK_SYSTEM)]
        body["identifier"] = [{"system": WRITEBACK_SYSTEM, "value": key}, *others]
    at = _utc(now)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(ehr_outbox)
        .values(key=key, connection=connection, resource_type=resource_type,
                operation=operation, target=target, resource=body, status="pending",
                attempts=0, next_attempt_at=at, touch_id=touch_id, event_id=event_id,
                created_at=at, updated_at=at)
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(ehr_outbox.c.id)
    )
    return conn.execute(stmt).first() is not None


def touch_key_of(touch_key: str) -> str:
    """The outbox key (and Communication identifier value) of a touch: ``touch-<hash>``."""
    return "touch-" + hashlib.sha256(touch_key.encode()).hexdigest()[:40]


def write_back_connection(
    conn: Connection, settings: Settings, entry_id: str | None
) -> EHRConnection | None:
    """Where write-backs about ``entry_id`` go: the EHR it came from over FHIR (if that
    connection has write-back on), else ``write_back_connection`` / the first connection with
    write-back (:meth:`Settings.write_back_target`); ``None`` when nowhere."""
    source = None
    if entry_id:
        names = entry_fhir_connections(conn, entry_id)
        source = next((n for n in names if settings.connection(n) is not None), None)
    target = settings.write_back_target(source)
    if target is None or not target.write_back:
        return None
    return target


def _patient(conn: Connection, patient_id: str, target: str, what: str) -> JSON | None:
    try:
        return patient_reference(conn, patient_id, target)
    except ValueError:
        log.warning("writeback_skipped", patient_id=patient_id, connection=target,
                    reason=f"{what}: the patient has no identifier an EHR could know")
        return None


def enqueue_touch(
    conn: Connection, settings: Settings, touch: Mapping[Any, Any], *, now: datetime
) -> bool:
    """Owe the EHR the Communication for a touch (a ``touches`` row as a mapping) that was
    sent, failed, or skipped / cancelled for a reason. ``False`` when there is nothing to
    write (any other status), nowhere to write it (no write-back target), or it is owed
    already."""
    status = str(touch.get("status") or "")
    if status not in ("sent", "failed", "skipped", "cancelled"):
        return False
    if status in ("skipped", "cancelled") and not str(touch.get("reason") or "").strip():
        return False
    entry_id = str(touch["entry_id"])
    target = write_back_connection(conn, settings, entry_id)
    if target is None:
        return False
    entry_ref, _ = entry_reference(conn, entry_id, target.name)
    entry_type = entry_resource_type(conn, entry_id)
    patient = _patient(conn, str(touch["patient_id"]), target.name, "touch")
    if patient is None:
        return False
    resource = touch_communication(touch, patient=patient, entry_ref=entry_ref,
                                   entry_type=entry_type, sender=settings.organization.name)
    if resource is None:
        return False
    touch_id = touch.get("id")
    # A step skipped now may still go out later (a number added, an opt-in): the skip and the
    # delivery are two records, so the skip's key must not take the delivery's.
    key = touch_key_of(str(touch["key"])) + ("-skip" if status in ("skipped", "cancelled")
                                              else "")
    return enqueue(conn, key=key, connection=target.name,
                   resource_type="Communication", resource=resource,
                   touch_id=int(touch_id) if touch_id is not None else None, now=now)


def enqueue_reply(
    conn: Connection,
    settings: Settings,
    *,
    event_id: int,
    channel: str,
    patient_id: str,
    entry_id: str | None,
    touch_key: str | None,
    text: str,
    received_at: datetime,
    now: datetime,
) -> bool:
    """Owe the EHR the Communication for what a patient sent (key ``reply-<event_id>``),
    ``inResponseTo`` the touch's Communication: by its identifier, or literally once that
    Communication is written to the same EHR."""
    target = write_back_connection(conn, settings, entry_id)
    if target is None:
        return False
    patient = _patient(conn, patient_id, target.name, "reply")
    if patient is None:
        return False
    entry_ref: JSON | None = None
    entry_type: str | None = None
    if entry_id:
        entry_ref, _ = entry_reference(conn, entry_id, target.name)
        entry_type = entry_resource_type(conn, entry_id)
    in_response_to: JSON | None = None
    if touch_key:
        key = touch_key_of(touch_key)
        row = conn.execute(
            select(ehr_outbox.c.status, ehr_outbox.c.ehr_ref, ehr_outbox.c.connection)
            .where(ehr_outbox.c.key == key)
        ).first()
        if (row is not None and row.status == "written" and row.ehr_ref
                and row.connection == target.name):
            in_response_to = {"reference": str(row.ehr_ref)}
        else:
            in_response_to = {"identifier": {"system": WRITEBACK_SYSTEM, "value": key}}
    resource = reply_communication(
        channel=channel, patient=patient, text=text, received_at=received_at,
        in_response_to=in_response_to, entry_ref=entry_ref, entry_type=entry_type,
        recipient=settings.organization.name)
    return enqueue(conn, key=f"reply-{event_id}", connection=target.name,
                   resource_type="Communication", resource=resource, event_id=event_id,
                   now=now)


def _fhir_appointment(conn: Connection, entry_id: str, connection: str) -> str | None:
    """``Appointment/<id>`` when the entry came from ``connection`` over FHIR."""
    rows = conn.execute(
        select(entry_sources.c.ref).where(
            entry_sources.c.entry_id == entry_id, entry_sources.c.system == "fhir",
            entry_sources.c.connection == connection)
        .order_by(entry_sources.c.id.desc())
    )
    for r in rows:
        ref = fhir_ref(str(r.ref))
        if ref is not None and ref.startswith("Appointment/"):
            return ref
    return None


def _when(conn: Connection, entry_id: str, settings: Settings) -> str:
    row = conn.execute(
        select(timeline_entries.c.time, timeline_entries.c.summary)
        .where(timeline_entries.c.id == entry_id)
    ).first()
    if row is None:
        return ""
    at = _utc(row.time).astimezone(ZoneInfo(settings.timezone))
    return f" on {at.strftime('%Y-%m-%d %H:%M %Z')} ({row.summary})"


def enqueue_request(
    conn: Connection,
    settings: Settings,
    *,
    request_id: int,
    action: str,
    entry_id: str,
    patient_id: str,
    source: str,
    detail: Mapping[str, Any] | None,
    now: datetime,
) -> bool:
    """Owe the EHR what a patient asked for (key ``request-<id>-<action>``).

    * ``confirm``: where the connection has ``appointment_updates`` and the Appointment came
      from it over FHIR, an update of the Patient participant's status to ``accepted``; else an
      AppointmentResponse.
    * ``cancel``: likewise an update to ``cancelled`` (reason ``pat``); else a Task for staff.
    * ``reschedule``: always a Task (the patient's preferred times, ``detail["preferred"]``, in
      its description and note).
    * ``survey``: nothing here (the answers go as a reply Communication): ``False``.
    """
    if action not in ("confirm", "cancel", "reschedule"):
        return False
    target = write_back_connection(conn, settings, entry_id)
    if target is None:
        return False
    key = f"request-{request_id}-{action}"
    appointment = (_fhir_appointment(conn, entry_id, target.name)
                   if target.appointment_updates and action in ("confirm", "cancel") else None)
    patient = _patient(conn, patient_id, target.name, f"request {action}")
    if patient is None:
        return False
    if appointment is not None:
        change: JSON
        if action == "confirm":
            change = {"participantStatus": "accepted"}
            if "reference" in patient:
                change["actor"] = patient["reference"]
        else:
            change = {"status": "cancelled", "cancelationReason": {"coding": [
                {"system": APPOINTMENT_CANCELLATION_REASON, "code": "pat",
                 "display": "Patient"}]}}
        return enqueue(conn, key=key, connection=target.name, resource_type="Appointment",
                       resource=change, operation="update", target=appointment, now=now)
    entry_ref, _ = entry_reference(conn, entry_id, target.name)
    if action == "confirm":
        if entry_ref is None or entry_resource_type(conn, entry_id) != "Appointment":
            log.warning("writeback_skipped", entry_id=entry_id, connection=target.name,
                        reason="confirm: no Appointment the EHR could know")
            return False
        resource = appointment_response(appointment=entry_ref, patient=patient, source=source)
        return enqueue(conn, key=key, connection=target.name,
                       resource_type="AppointmentResponse", resource=resource, now=now)
    when = _when(conn, entry_id, settings)
    verb = "cancel" if action == "cancel" else "reschedule"
    description = f"The patient asked (by {source}) to {verb} the appointment{when}."
    note = None
    preferred = (detail or {}).get("preferred")
    if action == "reschedule" and isinstance(preferred, str) and preferred.strip():
        note = f"Preferred days and times: {preferred.strip()}"
        description += f" {note}."
    resource = task(title=f"{verb.capitalize()} appointment", description=description,
                    focus=entry_ref, patient=patient, authored_on=now, note=note)
    return enqueue(conn, key=key, connection=target.name, resource_type="Task",
                   resource=resource, now=now)
