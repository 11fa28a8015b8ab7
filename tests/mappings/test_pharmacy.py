"""RDE/OMP/RDS → MedicationRequest, Medication, MedicationDispense."""

from __future__ import annotations

import pytest

from mappings.pharmacy import timing_repeat
from tests.mappings.helpers_mappings import fixture, message, of_type, one, run, seg

PID = "PID|1||123^^^HOSP^MR||Doe^John||19700101|M"


def rde(orc1: str = "NW", orc5: str = "", **rxe: str) -> str:
    fields = {
        2: "00093-0058-01^Amoxicillin 500 MG Oral Capsule^NDC",
        3: "500",
        5: "mg^mg^UCUM",
        10: "30",
        11: "CAP^capsule",
        12: "2",
        15: "RX778",
    }
    fields.update({int(k[1:]): v for k, v in rxe.items()})
    return "\r".join(
        [
            seg(
                "ORC",
                {1: orc1, 2: "ORD1^EHR", 5: orc5, 9: "20240301083000", 12: "99^Prescriber^Pat"},
            ),
            "TQ1|1||TID|||10^D",
            seg("RXE", fields),
            "RXR|PO^Oral^HL70162",
        ]
    )


class TestMedicationRequest:
    def test_dispense_request_carries_quantity_refills_and_supply(self) -> None:
        """RXE-10/11 quantity, RXE-12 refills and TQ1-6 supply duration (refill reminders)."""
        req = one(run(message("RDE^O11", PID, rde())), "MedicationRequest")
        assert req["dispenseRequest"] == {
            "quantity": {"value": 30, "unit": "capsule"},
            "numberOfRepeatsAllowed": 2,
            "expectedSupplyDuration": {
                "value": 10,
                "unit": "d",
                "system": "http://unitsofmeasure.org",
                "code": "d",
            },
        }

    def test_supply_computed_from_total_daily_dose(self) -> None:
        """Without a service duration, quantity ÷ RXE-19 total daily dose (same unit) is used."""
        raw = message("RDE^O11", PID, rde(p19="3^CAP").replace("TQ1|1||TID|||10^D", "TQ1|1||TID"))
        supply = one(run(raw), "MedicationRequest")["dispenseRequest"]["expectedSupplyDuration"]
        assert supply["value"] == 10

    @pytest.mark.parametrize(
        ("orc1", "orc5", "status"),
        [
            ("NW", "", "active"),
            ("DC", "", "stopped"),
            ("CA", "", "cancelled"),
            ("HD", "", "on-hold"),
            ("NW", "CM", "completed"),
            ("XO", "", "active"),
        ],
    )
    def test_status_from_orc5_then_orc1(self, orc1: str, orc5: str, status: str) -> None:
        """ORC-5 order status wins; else ORC-1 order control."""
        req = one(run(message("RDE^O11", PID, rde(orc1, orc5))), "MedicationRequest")
        assert req["status"] == status

    def test_coded_drug_is_a_shared_medication(self) -> None:
        """An NDC-coded drug becomes a Medication whose id is the same for every order."""
        a = run(message("RDE^O11", PID, rde(), n=1))
        b = run(message("RDE^O11", PID, rde().replace("ORD1", "ORD2"), n=2))
        assert one(a, "Medication")["id"] == one(b, "Medication")["id"]
        assert one(a, "MedicationRequest")["id"] != one(b, "MedicationRequest")["id"]
        med = one(a, "Medication")
        assert med["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/ndc"

    def test_dosage_from_tq1_rxe_and_rxr(self) -> None:
        """TID timing, 500 mg dose (UCUM) and oral route."""
        dosage = one(run(message("RDE^O11", PID, rde())), "MedicationRequest")["dosageInstruction"][
            0
        ]
        assert dosage["timing"]["repeat"] == {"frequency": 3, "period": 1, "periodUnit": "d"}
        assert dosage["doseAndRate"][0]["doseQuantity"] == {
            "value": 500,
            "unit": "mg",
            "system": "http://unitsofmeasure.org",
            "code": "mg",
        }
        assert dosage["route"]["coding"][0]["code"] == "PO"

    def test_omp_uses_rxo(self) -> None:
        """OMP^O09 without RXE takes the drug, amount and refills from RXO."""
        rxo = seg("RXO", {1: "RX1^Drug One^RXNORM", 2: "1", 4: "TAB", 11: "60", 12: "TAB", 13: "5"})
        raw = message("OMP^O09", PID, "ORC|NW|ORD9", rxo)
        req = one(run(raw), "MedicationRequest")
        assert req["dispenseRequest"]["numberOfRepeatsAllowed"] == 5
        assert req["dispenseRequest"]["quantity"]["value"] == 60

    @pytest.mark.parametrize(
        ("pattern", "repeat"),
        [
            ("BID", {"frequency": 2, "period": 1, "periodUnit": "d"}),
            ("Q6H", {"frequency": 1, "period": 6, "periodUnit": "h"}),
            ("QOD", {"frequency": 1, "period": 2, "periodUnit": "d"}),
            ("3XD", {"frequency": 3, "period": 1, "periodUnit": "d"}),
            ("PRN", None),
        ],
    )
    def test_repeat_patterns(self, pattern: str, repeat: dict[str, object] | None) -> None:
        """Table 0335 repeat patterns become Timing.repeat."""
        assert timing_repeat(pattern) == repeat

    def test_msfc_rde_maps(self) -> None:
        """The Epic-flavoured MSFC RDE^O11 yields a request with 3 days' supply."""
        req = one(run(fixture("rde_o11_msfc.hl7")), "MedicationRequest")
        assert req["status"] == "active"
        assert req["dispenseRequest"]["expectedSupplyDuration"]["value"] == 3


class TestMedicationDispense:
    def test_rds_yields_a_dispense_for_the_request(self) -> None:
        """RDS^O13: RXD becomes a MedicationDispense authorised by the MedicationRequest."""
        conv = run(fixture("rds_o13_msfc.hl7"))
        req = one(conv, "MedicationRequest")
        disp = one(conv, "MedicationDispense")
        assert disp["authorizingPrescription"] == [{"reference": f"MedicationRequest/{req['id']}"}]
        assert disp["status"] == "completed"
        assert disp["quantity"]["value"] == 10
        assert of_type(conv, "Medication")
