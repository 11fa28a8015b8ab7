"""The resources careloop writes back: shapes for sent, failed, skipped and reply
Communications, AppointmentResponse and Task, each valid for the FHIR models (R4B, as
mappings.fhir_validation checks R4 output), and the change spec of an Appointment update."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.appointmentresponse import AppointmentResponse
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.task import Task

from integration.writeback.resources import (
    PARTICIPATION_MODE,
    ChangeError,
    apply_change,
    appointment_response,
    medium,
    reply_communication,
    task,
    touch_communication,
)

PATIENT = {"reference": "Patient/p1"}
APPT = {"reference": "Appointment/a1"}
SENT_AT = datetime(2030, 1, 10, 15, 0, tzinfo=UTC)


def _touch(**values: Any) -> dict[str, Any]:
    touch: dict[str, Any] = {
        "id": 7, "key": "appointment-reminder|0|e1", "pathway": "appointment-reminder",
        "step": 0, "entry_id": "e1", "patient_id": "x", "channel": "sms",
        "address": "+15555550101", "language": "en", "status": "sent", "reason": None,
        "sent_at": SENT_AT, "body": "Reminder: Feb 1 at 10:00. Reply C to confirm.",
        "provider_ref": "SM1"}
    touch.update(values)
    return touch


def _valid(model: Any, resource: dict[str, Any]) -> None:
    model.model_validate(resource)


def test_sent_touch() -> None:
    c = touch_communication(_touch(), patient=PATIENT, entry_ref=APPT, entry_type="Appointment",
                            sender="Example Clinic")
    assert c is not None
    _valid(Communication, c)
    assert c["status"] == "completed" and "statusReason" not in c
    assert c["sent"] == "2030-01-10T15:00:00Z"
    assert c["subject"] == PATIENT and c["recipient"] == [PATIENT]
    assert c["about"] == [APPT] and "basedOn" not in c
    assert c["medium"][0]["coding"][0] == {"system": PARTICIPATION_MODE, "code": "SMSWRIT",
                                           "display": "SMS message"}
    assert c["payload"] == [{"contentString": "Reminder: Feb 1 at 10:00. Reply C to confirm."}]
    assert c["category"] == [{"text": "careloop outreach: appointment-reminder"}]
    assert c["sender"] == {"display": "Example Clinic"}


def test_failed_touch() -> None:
    c = touch_communication(_touch(status="failed", reason="provider error 30003",
                                   sent_at=None, channel="email"),
                            patient=PATIENT, entry_ref=APPT, entry_type="Appointment")
    assert c is not None
    _valid(Communication, c)
    assert c["status"] == "not-done"
    assert c["statusReason"] == {"text": "failed: provider error 30003"}
    assert "sent" not in c
    assert c["medium"][0]["coding"][0]["code"] == "EMAILWRIT"
    assert c["payload"][0]["contentString"].startswith("Reminder")


def test_skipped_touch_carries_the_reason() -> None:
    c = touch_communication(
        _touch(status="skipped", reason="patient opted out of sms", body=None, sent_at=None,
               channel="voice"),
        patient={"identifier": {"system": "urn:oid:1.2", "value": "MRN-1"}},
        entry_ref={"type": "CarePlan", "identifier": {"system": "urn:oid:1.3", "value": "CP"}},
        entry_type="CarePlan")
    assert c is not None
    _valid(Communication, c)
    assert c["status"] == "not-done" and c["statusReason"]["text"] == "patient opted out of sms"
    assert c["payload"] == [{"contentString": "patient opted out of sms"}]
    assert c["basedOn"][0]["type"] == "CarePlan" and "about" not in c
    assert c["medium"][0]["coding"][0]["code"] == "PHONE"


@pytest.mark.parametrize("status,reason", [("scheduled", None), ("sending", None),
                                           ("cancelled", None), ("skipped", "")])
def test_no_communication_without_an_outcome(status: str, reason: str | None) -> None:
    assert touch_communication(_touch(status=status, reason=reason), patient=PATIENT,
                               entry_ref=None, entry_type=None) is None


def test_reply() -> None:
    c = reply_communication(
        channel="sms", patient=PATIENT, text="  C ", received_at=SENT_AT,
        in_response_to={"identifier": {"system": "urn:careloop:writeback", "value": "touch-x"}},
        entry_ref=APPT, entry_type="Appointment", recipient="Example Clinic")
    _valid(Communication, c)
    assert c["status"] == "completed" and c["received"] == "2030-01-10T15:00:00Z"
    assert c["sender"] == PATIENT and c["subject"] == PATIENT
    assert c["recipient"] == [{"display": "Example Clinic"}]
    assert c["payload"] == [{"contentString": "C"}]
    assert c["inResponseTo"][0]["identifier"]["value"] == "touch-x"
    assert c["medium"][0]["coding"][0]["code"] == "SMSWRIT"


def test_portal_medium_and_empty_text() -> None:
    c = reply_communication(channel="portal", patient=PATIENT, text="", received_at=SENT_AT,
                            in_response_to=None, entry_ref=None, entry_type=None)
    _valid(Communication, c)
    assert "payload" not in c and "inResponseTo" not in c
    assert c["medium"][0]["coding"][0]["code"] == "ONLINEWRIT"
    assert medium("fax") is None


def test_appointment_response_and_task() -> None:
    r = appointment_response(appointment=APPT, patient=PATIENT, source="sms")
    _valid(AppointmentResponse, r)
    assert r["participantStatus"] == "accepted" and r["comment"] == "confirmed by sms"
    t = task(title="Reschedule appointment", description="The patient asked to reschedule.",
             focus=APPT, patient=PATIENT, authored_on=SENT_AT, note="Preferred: mornings")
    _valid(Task, t)
    assert t["status"] == "requested" and t["intent"] == "order" and t["priority"] == "routine"
    assert t["for"] == PATIENT and t["focus"] == APPT and t["authoredOn"] == "2030-01-10T15:00:00Z"
    assert t["note"] == [{"text": "Preferred: mornings"}]


def test_apply_change_sets_the_patient_participant() -> None:
    appt = {"resourceType": "Appointment", "id": "a1", "status": "booked",
            "participant": [{"actor": {"reference": "Practitioner/d"}, "status": "accepted"},
                            {"actor": {"reference": "Patient/p1"}, "status": "needs-action"}]}
    assert apply_change(appt, {"participantStatus": "accepted", "actor": "Patient/p1"})
    assert appt["participant"][1]["status"] == "accepted"
    assert not apply_change(appt, {"participantStatus": "accepted"})  # already so: no write
    cancel = {"status": "cancelled", "cancelationReason": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason",
         "code": "pat"}]}}
    assert apply_change(appt, cancel)
    Appointment.model_validate(appt)
    assert not apply_change(appt, cancel)
    with pytest.raises(ChangeError):
        apply_change({"resourceType": "Appointment", "participant": []},
                     {"participantStatus": "accepted"})
