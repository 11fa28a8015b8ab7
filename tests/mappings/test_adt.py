"""ADT → Patient, Encounter, RelatedPerson, AllergyIntolerance, Condition, Coverage; merges;
UK outpatient bookings."""

from __future__ import annotations

import pytest

from mappings.errors import MissingRequiredField
from tests.mappings.helpers_mappings import fixture, message, of_type, one, run, seg

PID = "PID|1||123^^^HOSP^MR~999-99-9999^^^USSSA^SS||Doe^John^Q^^Dr||19700101|M"


def pv1(**extra: str) -> str:
    fields = {1: "1", 2: "I", 3: "W1^101^A^GEN", 19: "V100^^^HOSP^VN", 44: "202401310930"}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("PV1", fields)


class TestEncounterStatus:
    @pytest.mark.parametrize(
        ("trigger", "status"),
        [
            ("A01", "in-progress"),
            ("A02", "in-progress"),
            ("A03", "finished"),
            ("A04", "planned"),
            ("A05", "planned"),
            ("A06", "in-progress"),
            ("A07", "in-progress"),
            ("A08", "unknown"),
            ("A11", "cancelled"),
            ("A13", "in-progress"),
            ("A38", "cancelled"),
        ],
    )
    def test_status_follows_the_trigger(self, trigger: str, status: str) -> None:
        """Encounter.status comes from the trigger event (IG Event[EncounterStatus])."""
        conv = run(message(f"ADT^{trigger}", f"EVN|{trigger}|20240131", PID, pv1()))
        assert one(conv, "Encounter")["status"] == status

    def test_admit_and_discharge_update_one_encounter(self) -> None:
        """A01 and A03 for visit V100 give the same Encounter id; A03 adds the end."""
        admit = run(message("ADT^A01", PID, pv1(), n=1))
        discharge = run(message("ADT^A03", PID, pv1(p45="202402021200"), n=2))
        a, d = one(admit, "Encounter"), one(discharge, "Encounter")
        assert a["id"] == d["id"]
        assert d["period"] == {
            "start": "2024-01-31T09:30:00-05:00",
            "end": "2024-02-02T12:00:00-05:00",
        }
        assert d["location"][0]["status"] == "completed"

    def test_transfer_keeps_the_prior_location_completed(self) -> None:
        """A02 lists PV1-3 active and PV1-6 (prior location) completed."""
        conv = run(message("ADT^A02", PID, pv1(p6="W2^202^B^GEN")))
        statuses = [loc["status"] for loc in one(conv, "Encounter")["location"]]
        assert statuses == ["active", "completed"]

    @pytest.mark.parametrize("trigger", ["A28", "A31"])
    def test_person_events_make_no_encounter(self, trigger: str) -> None:
        """A28/A31 update the person only, even with a placeholder PV1."""
        conv = run(message(f"ADT^{trigger}", PID, "PV1|1|N"))
        assert of_type(conv, "Encounter") == []
        assert one(conv, "Patient")

    def test_class_maps_to_v3_act_code(self) -> None:
        """PV1-2 E → EMER, and participants carry v3 participation types."""
        conv = run(message("ADT^A04", PID, pv1(p2="E", p7="1^Doctor^Ann")))
        enc = one(conv, "Encounter")
        assert enc["class"]["code"] == "EMER"
        assert enc["participant"][0]["type"][0]["coding"][0]["code"] == "ATND"


class TestPatient:
    def test_demographics_map(self) -> None:
        """Identifiers with systems, name, gender, birth date and SSN system."""
        patient = one(run(message("ADT^A01", PID, pv1())), "Patient")
        assert patient["gender"] == "male"
        assert patient["birthDate"] == "1970-01-01"
        assert patient["name"] == [{"family": "Doe", "given": ["John", "Q"], "prefix": ["Dr"]}]
        systems = [i.get("system") for i in patient["identifier"]]
        assert "http://hl7.org/fhir/sid/us-ssn" in systems

    def test_deceased_from_pid29_or_pid30(self) -> None:
        """PID-29 gives deceasedDateTime; PID-30 alone gives deceasedBoolean."""
        dead = one(run(message("ADT^A08", seg("PID", {3: "1^^^H", 29: "20240101"}))), "Patient")
        assert dead["deceasedDateTime"] == "2024-01-01"
        alive = one(run(message("ADT^A08", seg("PID", {3: "1^^^H", 30: "N"}))), "Patient")
        assert alive["deceasedBoolean"] is False

    def test_telecom_has_use_and_rank(self) -> None:
        """PID-13 without a use is home, PID-14 work; XTN-18 is the rank."""
        pid = seg(
            "PID", {3: "1^^^H", 13: "^^PH^^^555^1234567" + "^" * 11 + "1", 14: "^^PH^^^555^7654321"}
        )
        telecom = one(run(message("ADT^A08", pid)), "Patient")["telecom"]
        assert telecom[0] == {"system": "phone", "value": "(555) 1234567", "use": "home", "rank": 1}
        assert telecom[1]["use"] == "work"

    def test_language_is_communication(self) -> None:
        """PID-15 becomes a preferred communication language."""
        patient = one(
            run(message("ADT^A08", seg("PID", {3: "1^^^H", 15: "en^English^HL70296"}))), "Patient"
        )
        assert patient["communication"][0]["preferred"] is True
        assert patient["communication"][0]["language"]["coding"][0]["code"] == "en"

    def test_birth_time_is_kept_in_an_extension(self) -> None:
        """PID-7 with a time: birthDate stays a date, the time goes to patient-birthTime."""
        patient = one(run(fixture("adt_a01_v2f.hl7")), "Patient")
        assert patient["birthDate"] == "1970-06-01"
        ext = {e["url"]: e for e in patient["extension"]}
        assert (
            ext["http://hl7.org/fhir/StructureDefinition/patient-birthTime"]["valueDateTime"]
            == "1970-06-01T09:12:00-04:00"
        )


class TestRelatedClinical:
    def test_nk1_al1_dg1_in1_yield_their_resources(self) -> None:
        """The IG's ADT_A01 yields RelatedPerson, AllergyIntolerance and Coverage."""
        conv = run(fixture("adt_a01_v2f.hl7"))
        related = one(conv, "RelatedPerson")
        assert related["name"][0]["family"] == "Everyone"
        allergy = one(conv, "AllergyIntolerance")
        assert allergy["category"] == ["environment"]
        assert allergy["code"] == {"text": "Timothy Grass"}
        assert allergy["reaction"][0]["severity"] == "moderate"
        coverage = one(conv, "Coverage")
        assert coverage["payor"][0]["display"] == "MyInsurancePlan"
        assert coverage["period"] == {"start": "2015-01-01", "end": "2015-12-31"}

    def test_dg1_becomes_an_encounter_diagnosis(self) -> None:
        """DG1-3 is the Condition code, linked to the Encounter."""
        dg1 = "DG1|1||I10^Hypertension^I10C||20240101|A"
        conv = run(message("ADT^A01", PID, pv1(), dg1))
        cond = one(conv, "Condition")
        assert cond["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10-cm"
        assert cond["encounter"]["reference"] == f"Encounter/{one(conv, 'Encounter')['id']}"


class TestMerge:
    def test_a40_links_survivor_and_replaced_patient(self) -> None:
        """The surviving Patient replaces the MRG-1 Patient, which is replaced-by it."""
        conv = run(fixture("adt_a40_merge.hl7"))
        patients = {p["id"]: p for p in of_type(conv, "Patient")}
        assert len(patients) == 2
        replaced = next(p for p in patients.values() if p.get("active") is False)
        survivor = next(p for p in patients.values() if p is not replaced)
        assert replaced["link"] == [
            {"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}
        ]
        assert survivor["link"][0]["type"] == "replaces"
        assert survivor["link"][0]["other"]["reference"] == f"Patient/{replaced['id']}"

    def test_merge_without_mrg_is_an_error(self) -> None:
        """A40 with no MRG names MRG in its error."""
        with pytest.raises(MissingRequiredField, match="MRG"):
            run(message("ADT^A40", PID))


class TestUkOutpatientBooking:
    def test_a05_with_slot_is_a_booked_appointment(self) -> None:
        """MEDWAY A05: the slot in PV2-8 is the Appointment start in London time."""
        from zoneinfo import ZoneInfo

        from mappings.context import MappingContext

        ctx = MappingContext(sender_timezone=ZoneInfo("Europe/London"))
        conv = run(fixture("adt_a05_uk_booking.hl7"), ctx)
        appt = one(conv, "Appointment")
        assert appt["status"] == "booked"
        assert appt["start"] == "2021-08-10T09:00:00+01:00"
        assert of_type(conv, "Encounter") == []

    def test_a38_cancels_the_same_booking(self) -> None:
        """The A38 for a booking reference cancels the Appointment the A05 created."""
        booked = run(
            message(
                "ADT^A05",
                "EVN|A05|20210806||||20210810090000",
                PID,
                seg("PV1", {2: "O", 3: "CLINIC1", 19: "OP1"}),
                n=1,
            )
        )
        cancelled = run(
            message(
                "ADT^A38",
                "EVN|A38|20210807||||20210810090000",
                PID,
                seg("PV1", {2: "O", 3: "CLINIC1", 19: "OP1"}),
                n=2,
            )
        )
        a, c = one(booked, "Appointment"), one(cancelled, "Appointment")
        assert a["id"] == c["id"]
        assert (a["status"], c["status"]) == ("booked", "cancelled")

    def test_inpatient_preadmit_stays_an_encounter(self) -> None:
        """An inpatient A05 with an expected admit time is a planned Encounter."""
        conv = run(message("ADT^A05", PID, pv1(), "PV2||||||||20240205"))
        assert one(conv, "Encounter")["status"] == "planned"
        assert of_type(conv, "Appointment") == []
