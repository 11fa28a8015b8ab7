"""Searches, slot reading, capabilities and the booking resources, as data (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from integration.scheduling.booking import (
    BookingRequest,
    Repair,
    cancelled,
    method_for,
    new_appointment,
    participants,
    transaction_bundle,
)
from integration.scheduling.slots import (
    Capabilities,
    FreeSlot,
    free_slot,
    matches_service,
    normal_ref,
    schedule_actor_search,
    schedule_service_search,
    service_text,
    service_tokens,
    slot_search,
)
from tests.scheduling.support import CHECKUP, DENTAL, SERVICE

APPOINTMENT = {
    "resourceType": "Appointment", "id": "a1", "status": "booked",
    "meta": {"versionId": "4"},
    "serviceType": [CHECKUP], "reasonCode": [{"text": "annual"}],
    "appointmentType": {"text": "ROUTINE"},
    "slot": [{"reference": "Slot/old"}],
    "participant": [
        {"actor": {"reference": "Patient/p1"}, "status": "needs-action"},
        {"actor": {"reference": "Practitioner/pr1"}, "status": "accepted"},
        {"actor": {"reference": "https://ehr.example.org/fhir/R4/Location/loc1",
                   "display": "Main Street Clinic"}, "status": "accepted"},
        {"actor": {"reference": "RelatedPerson/r1"}, "status": "tentative"},
    ],
}
SLOT = {"resourceType": "Slot", "id": "s1", "meta": {"versionId": "7"},
        "schedule": {"reference": "Schedule/sch1"}, "status": "free",
        "start": "2030-02-02T15:00:00Z", "end": "2030-02-02T15:30:00Z",
        "serviceType": [CHECKUP]}
SCHEDULE = {"resourceType": "Schedule", "id": "sch1", "serviceType": [CHECKUP],
            "actor": [{"reference": "Practitioner/pr1"},
                      {"reference": "Location/loc1", "display": "Main Street Clinic"}]}


class TestSearches:
    def test_schedules_by_actor(self) -> None:
        request = schedule_actor_search(APPOINTMENT)
        assert request is not None
        assert (request.method, request.path) == ("GET", "Schedule")
        assert request.params == (("actor", "Practitioner/pr1,Location/loc1"), ("_count", "100"))

    def test_schedules_by_service_type(self) -> None:
        request = schedule_service_search(APPOINTMENT)
        assert request is not None
        assert request.params == (("service-type", f"{SERVICE}|checkup"), ("_count", "100"))
        assert schedule_actor_search({"participant": [
            {"actor": {"reference": "Patient/p1"}}]}) is None
        assert schedule_service_search({"serviceType": [{"text": "x"}]}) is None

    def test_free_slots_in_a_window(self) -> None:
        request = slot_search(["Schedule/sch1", "Schedule/sch3"],
                              start=datetime(2030, 2, 1, 5, 0, tzinfo=UTC), days=3, limit=20)
        assert request.path == "Slot"
        assert request.params == (
            ("schedule", "Schedule/sch1,Schedule/sch3"), ("status", "free"),
            ("start", "ge2030-02-01T05:00:00Z"), ("start", "lt2030-02-04T05:00:00Z"),
            ("_sort", "start"), ("_count", "20"))
        with pytest.raises(ValueError, match="at least one schedule"):
            slot_search([], start=datetime(2030, 2, 1, tzinfo=UTC), days=1, limit=1)

    def test_refs(self) -> None:
        assert normal_ref("Slot/9", "Slot") == "Slot/9"
        assert normal_ref("9", "Slot") == "Slot/9"
        assert normal_ref("https://x/fhir/Slot/9/_history/2", "Slot") == "Slot/9"
        with pytest.raises(ValueError, match="not a Slot"):
            normal_ref("Appointment/9", "Slot")


class TestReading:
    def test_free_slot(self) -> None:
        slot = free_slot(SLOT, SCHEDULE, {})
        assert slot == FreeSlot(
            ref="Slot/s1", schedule_ref="Schedule/sch1",
            start=datetime(2030, 2, 2, 15, tzinfo=UTC), end=datetime(2030, 2, 2, 15, 30,
                                                                     tzinfo=UTC),
            version="7", service="Check-up", location="Main Street Clinic")
        bare = free_slot({**SLOT, "serviceType": []},
                         {**SCHEDULE, "actor": [{"reference": "Location/loc9"}]},
                         {"Location/loc9": "Annex"})
        assert bare is not None and (bare.service, bare.location) == ("Check-up", "Annex")
        assert free_slot({**SLOT, "start": None}, SCHEDULE, {}) is None

    def test_service(self) -> None:
        assert service_text({"serviceType": [{"text": " Flu shot "}]}) == "Flu shot"
        assert service_text({"serviceType": [{"coding": [{"code": "x1"}]}]}) == "x1"
        assert service_text({}) == ""
        assert matches_service(service_tokens(APPOINTMENT), service_tokens(SLOT))
        assert not matches_service(service_tokens(APPOINTMENT),
                                   service_tokens({"serviceType": [DENTAL]}))
        assert matches_service(set(), service_tokens(SLOT))
        assert matches_service(service_tokens(APPOINTMENT), set())

    def test_capabilities(self) -> None:
        assert Capabilities.from_statement(None) == Capabilities()
        statement = {"rest": [{"mode": "server", "interaction": [{"code": "transaction"}],
                               "resource": [{"type": "Appointment",
                                             "operation": [{"name": "$book"}]}]}]}
        caps = Capabilities.from_statement(statement)
        assert caps == Capabilities(book=True, transaction=True)
        assert method_for(caps) == "book-operation"
        system = {"rest": [{"operation": [{"name": "book", "definition":
                                          "http://x/OperationDefinition/Appointment-book"}]}]}
        assert Capabilities.from_statement(system).book
        assert method_for(Capabilities(transaction=True)) == "transaction"
        assert method_for(Capabilities()) == "ordered"


class TestResources:
    def request(self, **values: object) -> BookingRequest:
        base: dict[str, object] = {
            "booking_id": 12, "slot": SLOT, "patient": {"reference": "Patient/p1"},
            "schedule": SCHEDULE, "old": APPOINTMENT,
            "old_slot": {**SLOT, "id": "old", "status": "busy", "meta": {"versionId": "2"}}}
        base.update(values)
        return BookingRequest(**base)  # type: ignore[arg-type]

    def test_participants_copied(self) -> None:
        """The patient accepted, the others as they were; the same schedule keeps them all."""
        got = participants(APPOINTMENT, {"reference": "Patient/p1"}, SCHEDULE)
        assert [(p["actor"]["reference"], p["status"]) for p in got] == [
            ("Patient/p1", "accepted"), ("Practitioner/pr1", "accepted"),
            ("https://ehr.example.org/fhir/R4/Location/loc1", "accepted"),
            ("RelatedPerson/r1", "tentative")]

    def test_participants_of_another_schedule(self) -> None:
        """Another practitioner's schedule: the old practitioner gives way; the location and
        the related person stay."""
        other = {"resourceType": "Schedule", "id": "sch3",
                 "actor": [{"reference": "Practitioner/pr2", "display": "Dr Jones"}]}
        got = participants(APPOINTMENT, {"reference": "Patient/p1"}, other)
        assert [p["actor"]["reference"] for p in got] == [
            "Patient/p1", "https://ehr.example.org/fhir/R4/Location/loc1", "RelatedPerson/r1",
            "Practitioner/pr2"]
        assert got[-1] == {"actor": {"reference": "Practitioner/pr2", "display": "Dr Jones"},
                           "status": "accepted"}

    def test_participants_without_an_old_appointment(self) -> None:
        got = participants(None, {"reference": "Patient/p9"}, SCHEDULE)
        assert [p["actor"]["reference"] for p in got] == [
            "Patient/p9", "Practitioner/pr1", "Location/loc1"]
        assert {p["status"] for p in got} == {"accepted"}

    def test_new_appointment(self) -> None:
        appointment = new_appointment(self.request(), created=datetime(2030, 1, 10, tzinfo=UTC))
        assert appointment["status"] == "booked"
        assert appointment["identifier"] == [{"system": "urn:careloop:booking", "value": "12"}]
        assert appointment["slot"] == [{"reference": "Slot/s1"}]
        assert (appointment["start"], appointment["end"]) == (SLOT["start"], SLOT["end"])
        assert appointment["serviceType"] == [CHECKUP]
        assert appointment["reasonCode"] == [{"text": "annual"}]
        assert appointment["appointmentType"] == {"text": "ROUTINE"}
        assert appointment["created"] == "2030-01-10"
        assert "id" not in appointment and "meta" not in appointment

    def test_cancelled(self) -> None:
        old = cancelled(APPOINTMENT)
        assert old["status"] == "cancelled"
        assert old["cancelationReason"]["coding"][0]["code"] == "pat"
        assert APPOINTMENT["status"] == "booked"  # a copy

    def test_transaction_bundle(self) -> None:
        bundle = transaction_bundle(self.request())
        assert bundle["type"] == "transaction"
        requests = [e["request"] for e in bundle["entry"]]
        assert requests == [
            {"method": "PUT", "url": "Slot/s1", "ifMatch": 'W/"7"'},
            {"method": "POST", "url": "Appointment",
             "ifNoneExist": "identifier=urn:careloop:booking|12"},
            {"method": "PUT", "url": "Appointment/a1", "ifMatch": 'W/"4"'},
            {"method": "PUT", "url": "Slot/old", "ifMatch": 'W/"2"'},
        ]
        statuses = [e["resource"]["status"] for e in bundle["entry"]]
        assert statuses == ["busy", "booked", "cancelled", "free"]
        assert bundle["entry"][1]["fullUrl"].startswith("urn:uuid:")

    def test_transaction_bundle_for_a_new_booking(self) -> None:
        bundle = transaction_bundle(self.request(old=None, old_slot=None))
        assert [e["request"]["method"] for e in bundle["entry"]] == ["PUT", "POST"]

    def test_repair_is_data(self) -> None:
        repair = Repair("cancel-old", "Appointment", "Appointment/a1", {"status": "cancelled"})
        assert repair.target == "Appointment/a1"
