"""The FHIR R4 resources careloop writes back, as plain data (no database, no network).

* :func:`touch_communication`: a touch that was sent, failed, or skipped for a reason.
* :func:`reply_communication`: what a patient sent back (an SMS reply, a key press, a portal
  action), ``inResponseTo`` the touch's Communication.
* :func:`appointment_response` and :func:`task`: what a patient asked for, when the EHR does
  not let careloop change the Appointment itself.
* :func:`apply_change`: the change spec of an ``update`` outbox row (the EHR does let careloop
  change the Appointment), applied to a freshly read resource.

Every element used has the same name, type and cardinality in R4 and R4B (the tests validate
with the R4B models of fhir.resources, as :mod:`mappings.fhir_validation` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "APPOINTMENT_CANCELLATION_REASON",
    "MEDIUM",
    "PARTICIPATION_MODE",
    "WRITEBACK_SYSTEM",
    "ChangeError",
    "apply_change",
    "appointment_response",
    "fhir_instant",
    "medium",
    "reply_communication",
    "task",
    "touch_communication",
]

JSON = dict[str, Any]

WRITEBACK_SYSTEM = "urn:careloop:writeback"
"""The identifier system of everything careloop writes to an EHR; the value is the outbox key."""

PARTICIPATION_MODE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
MEDIUM: Mapping[str, tuple[str, str]] = {
    # channel → (code, display) in HL7 terminology (THO) v3-ParticipationMode
    "sms": ("SMSWRIT", "SMS message"),
    "email": ("EMAILWRIT", "email"),
    "voice": ("PHONE", "telephone"),
    "portal": ("ONLINEWRIT", "online written"),
}
APPOINTMENT_CANCELLATION_REASON = (
    "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason")

# Which element of a Communication points at the entry it is about.
_BASED_ON_TYPES = frozenset({"CarePlan", "MedicationRequest", "ServiceRequest"})


class ChangeError(ValueError):
    """The change spec cannot be applied to the resource read from the EHR."""


def fhir_instant(value: datetime) -> str:
    """An aware instant as FHIR ``dateTime`` text in UTC (naive values are UTC: SQLite)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat(timespec="seconds").replace("+00:00", "Z")


def medium(channel: str) -> JSON | None:
    """Communication.medium for a careloop channel name, ``None`` for an unknown one."""
    found = MEDIUM.get(channel)
    if found is None:
        return None
    code, display = found
    return {"coding": [{"system": PARTICIPATION_MODE, "code": code, "display": display}],
            "text": channel}


def _link(resource: JSON, entry_ref: JSON | None, entry_type: str | None) -> None:
    if entry_ref is None:
        return
    kind = entry_type or str(entry_ref.get("type") or "")
    if kind in _BASED_ON_TYPES:
        resource["basedOn"] = [entry_ref]
    else:
        resource["about"] = [entry_ref]


def touch_communication(
    touch: Mapping[Any, Any],
    *,
    patient: JSON,
    entry_ref: JSON | None,
    entry_type: str | None,
    sender: str | None = None,
) -> JSON | None:
    """The Communication for a touch, or ``None`` when the touch is not (yet) one: still
    scheduled or sending, or cancelled / skipped without a reason.

    ``sent`` → ``completed`` with ``sent``; ``failed`` → ``not-done``, statusReason
    ``failed: <reason>``; ``skipped`` / ``cancelled`` → ``not-done`` with the reason. The
    payload is the message as rendered (or the reason when nothing was)."""
    status = str(touch.get("status") or "")
    reason = str(touch.get("reason") or "").strip()
    body = str(touch.get("body") or "").strip()
    resource: JSON = {"resourceType": "Communication"}
    if status == "sent":
        resource["status"] = "completed"
    elif status == "failed":
        resource["status"] = "not-done"
        resource["statusReason"] = {"text": f"failed: {reason or 'not delivered'}"}
    elif status in ("skipped", "cancelled") and reason:
        resource["status"] = "not-done"
        resource["statusReason"] = {"text": reason}
    else:
        return None
    pathway = str(touch.get("pathway") or "")
    resource["category"] = [{"text": f"careloop outreach: {pathway}"}]
    channel_medium = medium(str(touch.get("channel") or ""))
    if channel_medium is not None:
        resource["medium"] = [channel_medium]
    resource["subject"] = patient
    _link(resource, entry_ref, entry_type)
    sent_at = touch.get("sent_at")
    if status == "sent" and isinstance(sent_at, datetime):
        resource["sent"] = fhir_instant(sent_at)
    resource["recipient"] = [patient]
    if sender:
        resource["sender"] = {"display": sender}
    text = body or reason
    if text:
        resource["payload"] = [{"contentString": text}]
    return resource


def reply_communication(
    *,
    channel: str,
    patient: JSON,
    text: str,
    received_at: datetime,
    in_response_to: JSON | None,
    entry_ref: JSON | None,
    entry_type: str | None,
    recipient: str | None = None,
) -> JSON:
    """An inbound Communication: the patient is the sender and the subject."""
    resource: JSON = {
        "resourceType": "Communication",
        "status": "completed",
        "category": [{"text": "careloop reply"}],
    }
    channel_medium = medium(channel)
    if channel_medium is not None:
        resource["medium"] = [channel_medium]
    resource["subject"] = patient
    _link(resource, entry_ref, entry_type)
    if in_response_to is not None:
        resource["inResponseTo"] = [in_response_to]
    resource["received"] = fhir_instant(received_at)
    if recipient:
        resource["recipient"] = [{"display": recipient}]
    resource["sender"] = patient
    if text.strip():
        resource["payload"] = [{"contentString": text.strip()}]
    return resource


def appointment_response(*, appointment: JSON, patient: JSON, source: str) -> JSON:
    """The patient accepts the appointment (a confirmation the EHR records on its own)."""
    return {
        "resourceType": "AppointmentResponse",
        "appointment": appointment,
        "actor": patient,
        "participantStatus": "accepted",
        "comment": f"confirmed by {source}",
    }


def task(
    *,
    title: str,
    description: str,
    focus: JSON | None,
    patient: JSON,
    authored_on: datetime,
    note: str | None = None,
) -> JSON:
    """A Task asking staff to act (cancel or reschedule) on the patient's behalf."""
    resource: JSON = {
        "resourceType": "Task",
        "status": "requested",
        "businessStatus": {"text": "waiting for staff"},
        "intent": "order",
        "priority": "routine",
        "code": {"text": title},
        "description": description,
    }
    if focus is not None:
        resource["focus"] = focus
    resource["for"] = patient
    resource["authoredOn"] = fhir_instant(authored_on)
    resource["requester"] = patient
    if note:
        resource["note"] = [{"text": note}]
    return resource


def _ends_with_ref(reference: object, wanted: str) -> bool:
    if not isinstance(reference, str) or not reference:
        return False
    return reference == wanted or reference.endswith("/" + wanted)


def apply_change(resource: JSON, change: Mapping[str, Any]) -> bool:
    """Apply an ``update`` row's change spec in place; ``True`` if anything changed.

    ``participantStatus`` sets the status of the Patient participant (the one whose actor is
    ``actor`` when the spec names it, else every ``Patient/`` participant); any other key is
    set at the top level (``status``, ``cancelationReason``). Setting what is already there
    changes nothing, so a repeated write is a no-op.
    """
    changed = False
    for key, value in change.items():
        if key in ("participantStatus", "actor"):
            continue
        if resource.get(key) != value:
            resource[key] = value
            changed = True
    wanted = change.get("participantStatus")
    if wanted is None:
        return changed
    actor = change.get("actor")
    participants = [p for p in resource.get("participant") or [] if isinstance(p, dict)]
    if isinstance(actor, str) and actor:
        matched = [p for p in participants
                   if _ends_with_ref((p.get("actor") or {}).get("reference"), actor)]
    else:
        matched = []
    if not matched:
        matched = [p for p in participants
                   if "Patient/" in str((p.get("actor") or {}).get("reference") or "")]
    if not matched:
        raise ChangeError(f"{resource.get('resourceType')}/{resource.get('id')} has no Patient "
                          "participant to set")
    for participant in matched:
        if participant.get("status") != wanted:
            participant["status"] = wanted
            changed = True
    return changed
