"""VXU^V04 → Immunization and VIS/funding Observations."""

from __future__ import annotations

import pytest

from tests.mappings.helpers_mappings import fixture, message, of_type, one, run, seg

PID = "PID|1||123^^^HOSP^MR||Doe^Jane||20200101|F"
ORC = "ORC|RE||IZ-1^EHR"


def rxa(**extra: str) -> str:
    fields = {
        1: "0",
        2: "1",
        3: "20240301",
        5: "08^HepB^CVX",
        6: "0.5",
        7: "mL^mL^UCUM",
        9: "00",
        15: "LOT1",
        17: "MSD^Merck^MVX",
        20: "CP",
        21: "A",
    }
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("RXA", fields)


class TestImmunization:
    def test_dose_maps(self) -> None:
        """CVX code, date, dose, lot, manufacturer and completed status."""
        imm = one(run(message("VXU^V04", PID, ORC, rxa())), "Immunization")
        assert imm["vaccineCode"]["coding"][0] == {
            "system": "http://hl7.org/fhir/sid/cvx",
            "code": "08",
            "display": "HepB",
        }
        assert imm["occurrenceDateTime"] == "2024-03-01"
        assert imm["status"] == "completed"
        assert imm["primarySource"] is True
        assert imm["lotNumber"] == "LOT1"
        assert imm["manufacturer"]["identifier"] == {
            "system": "http://hl7.org/fhir/sid/mvx",
            "value": "MSD",
        }
        assert imm["doseQuantity"]["code"] == "mL"

    @pytest.mark.parametrize(
        ("completion", "action", "status"),
        [
            ("CP", "A", "completed"),
            ("PA", "A", "completed"),
            ("RE", "A", "not-done"),
            ("NA", "A", "not-done"),
            ("CP", "D", "entered-in-error"),
        ],
    )
    def test_status_from_rxa20_and_rxa21(self, completion: str, action: str, status: str) -> None:
        """RXA-20 completion status, RXA-21 D deletes."""
        imm = one(
            run(message("VXU^V04", PID, ORC, rxa(p20=completion, p21=action))), "Immunization"
        )
        assert imm["status"] == status

    def test_historical_dose_is_not_primary_source(self) -> None:
        """RXA-9 01 (historical) sets primarySource false and reportOrigin; 999 dose is left out."""
        imm = one(
            run(message("VXU^V04", PID, ORC, rxa(p9="01^Historical^NIP001", p6="999"))),
            "Immunization",
        )
        assert imm["primarySource"] is False
        assert imm["reportOrigin"]["coding"][0]["code"] == "01"
        assert "doseQuantity" not in imm

    def test_funding_and_vis_observations(self) -> None:
        """MSFC VXU: OBX funding/eligibility/VIS become Observations and fill the Immunization."""
        conv = run(fixture("vxu_v04_msfc.hl7"))
        imm = one(conv, "Immunization")
        assert imm["fundingSource"]["coding"][0]["code"] == "PHC70"
        assert imm["programEligibility"][0]["coding"][0]["code"] == "V01"
        assert imm["education"][0]["presentationDate"] == "2021-08-18"
        part_of = [o for o in of_type(conv, "Observation") if o.get("partOf")]
        assert len(part_of) == 4
        assert all(o["partOf"] == [{"reference": f"Immunization/{imm['id']}"}] for o in part_of)
