"""How a write-back names the patient and the entry: literal references for what came from
that EHR over FHIR, business identifiers for what came over HL7 v2 (both databases)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select, update

from integration.models import patients, timeline_entries
from integration.writeback import entry_reference, patient_reference
from tests.outreach.support import ny, receive, siu
from tests.writeback.support import (
    EHR,
    MRN_SYSTEM,
    NOW,
    apply,
    entry_of,
    fhir_appointment,
    fhir_entry,
    fhir_patient,
    hl7_source,
)


def test_fhir_sourced_patient_and_appointment_are_literal(engine: Engine) -> None:
    apply(engine, [fhir_patient("p1"), fhir_appointment("a1", "p1")])
    entry = entry_of(engine, "Appointment")
    with engine.connect() as conn:
        assert patient_reference(conn, entry.patient_id, EHR) == {"reference": "Patient/p1"}
        assert entry_reference(conn, entry.id, EHR) == ({"reference": "Appointment/a1"}, EHR)
        assert entry_reference(conn, entry.id, None) == ({"reference": "Appointment/a1"}, EHR)
        # another EHR knows neither id: identifiers instead
        assert patient_reference(conn, entry.patient_id, "other") == {
            "identifier": {"system": MRN_SYSTEM, "value": "MRN-1"}}
        ref, source = entry_reference(conn, entry.id, "other")
    assert source is None
    assert ref == {"type": "Appointment", "identifier": {
        "system": "urn:oid:2.16.840.1.113883.19.6", "value": "APT-a1"}}


def test_newer_version_keeps_the_same_literal_reference(engine: Engine) -> None:
    apply(engine, [fhir_patient("p1"), fhir_appointment("a1", "p1")])
    apply(engine, [fhir_appointment("a1", "p1", version="2", status="cancelled")])
    entry = entry_of(engine, "Appointment")
    with engine.connect() as conn:
        assert entry_reference(conn, entry.id, EHR)[0] == {"reference": "Appointment/a1"}
    assert fhir_entry(engine, "a1") == entry.id


def test_hl7_only_patient_is_named_by_identifier(engine: Engine) -> None:
    patient = {"resourceType": "Patient", "id": "hp1", "identifier": [
        {"system": MRN_SYSTEM, "value": "MRN-7"}]}
    appt = {"resourceType": "Appointment", "id": "ha1", "status": "booked",
            "start": "2030-02-01T15:00:00Z", "end": "2030-02-01T15:30:00Z",
            "identifier": [{"system": "urn:oid:1.2.3.4", "value": "FILL-9"}],
            "participant": [{"actor": {"reference": "Patient/hp1"}, "status": "accepted"}]}
    apply(engine, [patient, appt], hl7_source())
    entry = entry_of(engine, "Appointment")
    with engine.connect() as conn:
        assert patient_reference(conn, entry.patient_id, EHR) == {
            "identifier": {"system": MRN_SYSTEM, "value": "MRN-7"}}
        assert entry_reference(conn, entry.id, EHR) == (
            {"type": "Appointment", "identifier": {"system": "urn:oid:1.2.3.4",
                                                   "value": "FILL-9"}}, None)


def test_identifier_without_a_system_is_given_as_the_sender_wrote_it(engine: Engine) -> None:
    """A real SIU whose PID-3 and SCH ids have no system: value, type and assigner."""
    receive(engine, siu("S12", "C1", filler="F1", start=ny(2030, 2, 1, 10),
                        sent=ny(2030, 1, 1, 9)), NOW)
    entry = entry_of(engine, "Appointment")
    with engine.connect() as conn:
        assert patient_reference(conn, entry.patient_id, EHR) == {"identifier": {
            "type": {"text": "MR"}, "value": "MRN1", "assigner": {"display": "HOSP"}}}
        ref, _ = entry_reference(conn, entry.id, EHR)
    assert ref == {"type": "Appointment", "identifier": {"type": {"text": "FILL"},
                                                         "value": "F1"}}


def test_merged_patient_follows_to_the_survivor(engine: Engine) -> None:
    apply(engine, [fhir_patient("p1", "MRN-1")])
    apply(engine, [fhir_patient("p2", "MRN-2") | {"identifier": [
        {"system": "urn:oid:9.9", "value": "OTHER-2"}]}])
    with engine.connect() as conn:
        ids = sorted(r.patient_id for r in conn.execute(select(timeline_entries.c.patient_id)))
    first, second = ids
    with engine.begin() as conn:
        conn.execute(update(patients).where(patients.c.id == second)
                     .values(merged_into=first, merged_at=NOW))
    with engine.connect() as conn:
        survivor_ref = patient_reference(conn, first, EHR)
        assert patient_reference(conn, second, EHR) == survivor_ref
        assert survivor_ref["reference"] in ("Patient/p1", "Patient/p2")


def test_unknown_patient_is_a_clear_error(engine: Engine) -> None:
    with engine.connect() as conn, pytest.raises(ValueError, match="no identifier"):
        patient_reference(conn, "nobody", EHR)
    with engine.connect() as conn:
        assert entry_reference(conn, "nothing", EHR) == (None, None)
