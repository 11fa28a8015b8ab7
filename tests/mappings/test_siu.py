"""SIU S12–S26 → Appointment and Patient."""

from __future__ import annotations

import pytest

from mappings.errors import MissingRequiredField
from mappings.siu import appointment_status
from tests.mappings.helpers_mappings import fixture, message, one, run, seg

PID = "PID|1||123^^^HOSP^MR||Doe^John||19700101|M"


def sch(status: str = "Booked", **extra: str) -> str:
    fields = {
        1: "P1",
        2: "F1",
        9: "30",
        10: "MIN",
        11: "^^30^202403011000^202403011030",
        25: status,
    }
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("SCH", fields)


class TestStatus:
    @pytest.mark.parametrize(
        ("trigger", "filler", "status"),
        [
            ("S12", "Booked", "booked"),
            ("S12", "BOOKED", "booked"),
            ("S12", "Scheduled", "booked"),
            ("S14", "ARRIVED", "arrived"),
            ("S14", "Complete", "fulfilled"),
            ("S13", "", "booked"),
            ("S15", "Booked", "cancelled"),
            ("S15", "Cancelled", "cancelled"),
            ("S16", "Dc", "cancelled"),
            ("S17", "Deleted", "entered-in-error"),
            ("S26", "Noshow", "noshow"),
            ("S14", "Noshow", "noshow"),
            ("S12", "Whatever", "booked"),
        ],
    )
    def test_trigger_and_filler_status(self, trigger: str, filler: str, status: str) -> None:
        """Terminal triggers win; otherwise SCH-25 (any case) decides, else booked."""
        assert appointment_status(trigger, filler) == status


class TestAppointment:
    def test_lifecycle_updates_one_appointment(self) -> None:
        """S12 then S15 for the same SCH-2 give one id: booked, then cancelled."""
        booked = run(message("SIU^S12", sch(), PID, n=1))
        cancelled = run(message("SIU^S15", sch("Cancelled"), PID, n=2))
        a, c = one(booked, "Appointment"), one(cancelled, "Appointment")
        assert a["id"] == c["id"]
        assert (a["status"], c["status"]) == ("booked", "cancelled")

    def test_placer_and_filler_ids_are_identifiers(self) -> None:
        """SCH-1 and SCH-2 become PLAC and FILL identifiers."""
        appt = one(run(message("SIU^S12", sch(), PID)), "Appointment")
        types = {i["type"]["coding"][0]["code"]: i["value"] for i in appt["identifier"]}
        assert types == {"PLAC": "P1", "FILL": "F1"}

    def test_v23_timing_from_sch11(self) -> None:
        """SCH-11.4/.5 (TQ) give start and end in the sender's zone."""
        appt = one(run(message("SIU^S12", sch(), PID)), "Appointment")
        assert appt["start"] == "2024-03-01T10:00:00-05:00"
        assert appt["end"] == "2024-03-01T10:30:00-05:00"
        assert appt["minutesDuration"] == 30

    def test_end_from_duration_when_not_sent(self) -> None:
        """Corepoint sends only a start (with a trailing space) and SCH-9/10 20 MIN."""
        appt = one(run(fixture("siu_s14_corepoint.hl7")), "Appointment")
        assert appt["start"] == "2008-03-06T10:00:00-05:00"
        assert appt["end"] == "2008-03-06T10:20:00-05:00"
        assert appt["status"] == "arrived"

    def test_tq1_wins_over_sch11(self) -> None:
        """MSFC v2.8 puts the real slot in TQ1-7/8, not SCH-11."""
        appt = one(run(fixture("siu_s12_msfc.hl7")), "Appointment")
        assert appt["start"] == "2021-09-24T09:30:00+02:15"
        assert appt["end"] == "2021-09-24T10:20:00+02:15"
        assert appt["minutesDuration"] == 50

    def test_participants_from_ais_aig_ail_aip(self) -> None:
        """Patient, AIG resource, AIL location and AIP practitioner take part; AIS: service."""
        appt = one(run(fixture("siu_s12_msfc.hl7")), "Appointment")
        actors = [
            p["actor"].get("reference", "display:" + p["actor"].get("display", ""))
            for p in appt["participant"]
        ]
        assert actors[0].startswith("Patient/")
        assert any(a.startswith("Location/") for a in actors)
        assert any(a.startswith("Practitioner/") for a in actors)
        assert "display:EVIS X12 Video Colonoscope" in actors
        assert appt["serviceType"][0]["coding"][0]["code"] == "76164006"

    def test_deleted_resource_is_not_a_participant(self) -> None:
        """An AIP with action code D is left out."""
        raw = message("SIU^S14", sch(), PID, "RGS|1", "AIP|1|D|99^Gone^Doc", "AIP|2|A|11^Here^Doc")
        names = [p["actor"].get("display") for p in one(run(raw), "Appointment")["participant"]]
        assert "Doc Here" in names
        assert "Doc Gone" not in names

    def test_missing_sch_ids_is_an_error(self) -> None:
        """Without SCH-1 and SCH-2 there is nothing to identify the appointment."""
        with pytest.raises(MissingRequiredField, match="SCH-1 and SCH-2 are empty"):
            run(message("SIU^S12", seg("SCH", {25: "Booked"}), PID))

    def test_notes_become_the_comment(self) -> None:
        """NTE after SCH becomes Appointment.comment."""
        appt = one(run(fixture("siu_s12_msfc.hl7")), "Appointment")
        assert appt["comment"] == "Appointment booked for emergency procedure"
