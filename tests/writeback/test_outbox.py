"""Owing the EHR a write: one outbox row per key (both databases), the Communication of each
touch and reply, and what each patient request becomes with and without Appointment updates."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.task import Task
from sqlalchemy import Engine, update

from integration.db import write_lock
from integration.models import ehr_outbox
from integration.settings import Settings
from integration.writeback import (
    WRITEBACK_SYSTEM,
    enqueue,
    enqueue_reply,
    enqueue_request,
    enqueue_touch,
    touch_key_of,
)
from tests.writeback.support import (
    EHR,
    MRN_SYSTEM,
    NOW,
    add_touch,
    apply,
    connection,
    entry_of,
    fhir_appointment,
    fhir_patient,
    hl7_source,
    outbox,
    settings,
    utc,
)


def _fhir_world(engine: Engine) -> Any:
    apply(engine, [fhir_patient("p1"), fhir_appointment("a1", "p1")])
    return entry_of(engine, "Appointment")


def _enqueue_touch(engine: Engine, cfg: Settings, touch: Any) -> bool:
    with write_lock(engine), engine.begin() as conn:
        return enqueue_touch(conn, cfg, touch, now=NOW)


def test_same_key_twice_is_one_row(engine: Engine, db_url: str) -> None:
    resource = {"resourceType": "Communication", "status": "completed",
                "identifier": [{"system": "urn:other", "value": "x"}]}
    with write_lock(engine), engine.begin() as conn:
        assert enqueue(conn, key="k-1", connection=EHR, resource_type="Communication",
                       resource=resource, now=NOW)
        assert not enqueue(conn, key="k-1", connection=EHR, resource_type="Communication",
                           resource={**resource, "status": "not-done"}, now=NOW)
    (row,) = outbox(engine)
    assert row.status == "pending" and row.attempts == 0 and row.operation == "create"
    assert utc(row.next_attempt_at) == NOW
    assert row.resource["status"] == "completed"
    assert row.resource["identifier"] == [{"system": WRITEBACK_SYSTEM, "value": "k-1"},
                                          {"system": "urn:other", "value": "x"}]
    assert resource["identifier"] == [{"system": "urn:other", "value": "x"}]  # not mutated


def test_sent_touch_from_fhir(engine: Engine, db_url: str) -> None:
    entry = _fhir_world(engine)
    touch = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="r|0|e")
    cfg = settings(db_url)
    assert _enqueue_touch(engine, cfg, touch)
    assert not _enqueue_touch(engine, cfg, touch)  # the sender's retry: still one row
    (row,) = outbox(engine)
    assert row.key == touch_key_of("r|0|e") and row.key.startswith("touch-")
    assert len(row.key) == len("touch-") + 40
    assert row.connection == EHR and row.touch_id == touch["id"]
    c = row.resource
    Communication.model_validate(c)
    assert c["identifier"] == [{"system": WRITEBACK_SYSTEM, "value": row.key}]
    assert c["subject"] == {"reference": "Patient/p1"}
    assert c["about"] == [{"reference": "Appointment/a1"}]
    assert c["status"] == "completed" and c["sent"] == "2030-01-10T15:00:00Z"


def test_hl7_entry_goes_to_the_default_target(engine: Engine, db_url: str) -> None:
    patient = {"resourceType": "Patient", "id": "hp", "identifier": [
        {"system": MRN_SYSTEM, "value": "MRN-7"}]}
    appt = fhir_appointment("ha", "hp") | {"meta": {}}
    apply(engine, [patient, appt], hl7_source())
    entry = entry_of(engine, "Appointment")
    touch = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="k",
                      status="skipped", reason="quiet hours until 08:00", body=None)
    cfg = settings(db_url, connection("off", write_back=False), connection("second"))
    assert _enqueue_touch(engine, cfg, touch)
    (row,) = outbox(engine)
    assert row.connection == "second"  # the first connection with write-back on
    assert row.resource["status"] == "not-done"
    assert row.resource["subject"] == {"identifier": {"system": MRN_SYSTEM, "value": "MRN-7"}}


def test_no_target_no_row(engine: Engine, db_url: str) -> None:
    entry = _fhir_world(engine)
    touch = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="k")
    # the entry's own EHR has write-back off: nothing goes elsewhere either
    cfg = settings(db_url, connection(EHR, write_back=False), connection("second"))
    assert not _enqueue_touch(engine, cfg, touch)
    scheduled = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="k2",
                          status="scheduled", sent_at=None)
    assert not _enqueue_touch(engine, settings(db_url), scheduled)
    cancelled = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="k3",
                          status="cancelled", reason=None, sent_at=None)
    assert not _enqueue_touch(engine, settings(db_url), cancelled)
    assert outbox(engine) == []


def test_reply_points_at_the_touch(engine: Engine, db_url: str) -> None:
    entry = _fhir_world(engine)
    touch = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="t|0|e")
    cfg = settings(db_url)
    assert _enqueue_touch(engine, cfg, touch)

    def reply(event_id: int) -> dict[str, Any]:
        with write_lock(engine), engine.begin() as conn:
            assert enqueue_reply(conn, cfg, event_id=event_id, channel="sms",
                                 patient_id=entry.patient_id, entry_id=entry.id,
                                 touch_key="t|0|e", text="C", received_at=NOW, now=NOW)
        return dict(outbox(engine)[-1].resource)

    first = reply(11)
    Communication.model_validate(first)
    assert first["inResponseTo"] == [{"identifier": {"system": WRITEBACK_SYSTEM,
                                                     "value": touch_key_of("t|0|e")}}]
    assert first["sender"] == {"reference": "Patient/p1"}
    assert first["about"] == [{"reference": "Appointment/a1"}]
    assert outbox(engine)[-1].key == "reply-11"
    with engine.begin() as conn:  # the touch's Communication is written meanwhile
        conn.execute(update(ehr_outbox).where(ehr_outbox.c.key == touch_key_of("t|0|e"))
                     .values(status="written", ehr_ref="Communication/c9"))
    assert reply(12)["inResponseTo"] == [{"reference": "Communication/c9"}]


def _request(engine: Engine, cfg: Settings, entry: Any, action: str, *, request_id: int = 1,
             detail: dict[str, Any] | None = None) -> bool:
    with write_lock(engine), engine.begin() as conn:
        return enqueue_request(conn, cfg, request_id=request_id, action=action,
                               entry_id=entry.id, patient_id=entry.patient_id, source="sms",
                               detail=detail, now=NOW)


def test_requests_with_appointment_updates(engine: Engine, db_url: str) -> None:
    entry = _fhir_world(engine)
    cfg = settings(db_url, connection(appointment_updates=True))
    assert _request(engine, cfg, entry, "confirm")
    assert _request(engine, cfg, entry, "cancel", request_id=2)
    assert not _request(engine, cfg, entry, "survey", request_id=3)
    confirm, cancel = outbox(engine)
    assert (confirm.key, confirm.operation, confirm.target) == (
        "request-1-confirm", "update", "Appointment/a1")
    assert confirm.resource == {"participantStatus": "accepted", "actor": "Patient/p1"}
    assert cancel.resource["status"] == "cancelled"
    assert cancel.resource["cancelationReason"]["coding"][0]["code"] == "pat"


def test_requests_without_appointment_updates(engine: Engine, db_url: str) -> None:
    entry = _fhir_world(engine)
    cfg = settings(db_url)
    assert _request(engine, cfg, entry, "confirm")
    assert _request(engine, cfg, entry, "cancel", request_id=2)
    assert _request(engine, cfg, entry, "reschedule", request_id=3,
                    detail={"preferred": "Tuesday or Wednesday mornings"})
    confirm, cancel, reschedule = outbox(engine)
    assert confirm.resource_type == "AppointmentResponse" and confirm.operation == "create"
    assert confirm.resource["appointment"] == {"reference": "Appointment/a1"}
    assert confirm.resource["comment"] == "confirmed by sms"
    for row, title in ((cancel, "Cancel appointment"), (reschedule, "Reschedule appointment")):
        Task.model_validate(row.resource)
        assert row.resource_type == "Task" and row.resource["code"] == {"text": title}
        assert row.resource["focus"] == {"reference": "Appointment/a1"}
        assert row.resource["for"] == {"reference": "Patient/p1"}
    assert "Tuesday or Wednesday mornings" in reschedule.resource["description"]
    assert reschedule.resource["note"][0]["text"].endswith("Tuesday or Wednesday mornings")


def test_a_skip_then_a_send_are_two_records(engine: Engine, db_url: str) -> None:
    """A step skipped (opted out) and later sent (opted back in) owes the EHR both facts: the
    skip's key must not take the delivery's."""
    entry = _fhir_world(engine)
    cfg = settings(db_url)
    skipped = add_touch(engine, entry_id=entry.id, patient_id=entry.patient_id, key="s|0|e",
                        status="skipped", reason="opted out of sms")
    assert _enqueue_touch(engine, cfg, skipped)
    sent = {**skipped, "status": "sent", "reason": None, "sent_at": NOW, "body": "Hi"}
    assert _enqueue_touch(engine, cfg, sent)
    keys = sorted(r.key for r in outbox(engine))
    assert keys == [touch_key_of("s|0|e"), touch_key_of("s|0|e") + "-skip"]
    by_key = {r.key: r.resource["status"] for r in outbox(engine)}
    assert by_key[touch_key_of("s|0|e")] == "completed"
    assert by_key[touch_key_of("s|0|e") + "-skip"] == "not-done"
