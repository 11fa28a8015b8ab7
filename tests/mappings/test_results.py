"""ORU^R01 → DiagnosticReport and Observations."""

from __future__ import annotations

import pytest

from tests.mappings.helpers_mappings import fixture, message, of_type, one, run

PID = "PID|1||123^^^HOSP^MR||Doe^John||19700101|M"
OBR = "OBR|1|P1|F1^LAB|24331-1^Lipid panel^LN|||20240301083000|||||||||||||||20240301120000|||F"


def value_of(
    vtype: str, value: str, unit: str = "", rng: str = "", flag: str = ""
) -> dict[str, object]:
    raw = message(
        "ORU^R01", PID, OBR, f"OBX|1|{vtype}|2093-3^Cholesterol^LN||{value}|{unit}|{rng}|{flag}|||F"
    )
    obs = one(run(raw), "Observation")
    return {k: v for k, v in obs.items() if k.startswith(("value", "reference", "interpretation"))}


class TestValues:
    def test_nm_is_a_ucum_quantity_with_range_and_flag(self) -> None:
        """NM with a UCUM unit, a 0-200 range and flag H."""
        got = value_of("NM", "215", "mg/dL^milligram per deciliter^UCUM", "0-200", "H")
        assert got["valueQuantity"] == {
            "value": 215,
            "unit": "milligram per deciliter",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        }
        assert got["referenceRange"][0]["high"]["value"] == 200  # type: ignore[index]
        assert got["interpretation"][0]["coding"][0]["code"] == "H"  # type: ignore[index]

    def test_nm_with_comparator(self) -> None:
        """'<5' in an NM keeps the comparator."""
        assert value_of("NM", "<5")["valueQuantity"] == {"value": 5, "comparator": "<"}

    @pytest.mark.parametrize(
        ("sn", "key", "expected"),
        [
            ("<^5", "valueQuantity", {"value": 5, "comparator": "<"}),
            ("^1^:^128", "valueRatio", {"numerator": {"value": 1}, "denominator": {"value": 128}}),
            ("^2^-^4", "valueRange", {"low": {"value": 2}, "high": {"value": 4}}),
        ],
    )
    def test_sn_shapes(self, sn: str, key: str, expected: object) -> None:
        """SN: comparator, ratio and range forms."""
        assert value_of("SN", sn)[key] == expected

    def test_coded_string_date_and_time_values(self) -> None:
        """CWE, ST, DT and TS values map to their value[x]."""
        assert (
            value_of("CWE", "260373001^Detected^SCT")["valueCodeableConcept"]["coding"][0]["code"]
            == "260373001"
        )  # type: ignore[index]
        assert value_of("ST", "see note")["valueString"] == "see note"
        assert value_of("DT", "20240102")["valueDateTime"] == "2024-01-02"
        assert value_of("TS", "202401020304")["valueDateTime"] == "2024-01-02T03:04:00-05:00"

    def test_unreadable_number_is_a_warning(self) -> None:
        """An NM that is not a number leaves the value out with a warning."""
        raw = message("ORU^R01", PID, OBR, "OBX|1|NM|2093-3^Chol^LN||high|||||F")
        conv = run(raw)
        assert "valueQuantity" not in one(conv, "Observation")
        assert any("OBX-5" in w for w in conv.warnings)


class TestReport:
    def test_report_links_its_observations(self) -> None:
        """DiagnosticReport.result lists the OBX Observations; status from OBR-25."""
        conv = run(fixture("oru_r01_nist.hl7"))
        report = one(conv, "DiagnosticReport")
        obs = of_type(conv, "Observation")
        assert report["status"] == "final"
        assert report["result"] == [{"reference": f"Observation/{o['id']}"} for o in obs]
        assert obs[0]["valueQuantity"]["code"] == "ug/dL"
        assert obs[0]["referenceRange"][0]["text"].startswith("<9 mcg/dL")

    def test_multiline_tx_is_one_observation(self) -> None:
        """Consecutive TX OBX with the same (empty) OBX-3 join into one text value."""
        conv = run(fixture("oru_r01_multiline_tx.hl7"))
        obs = one(conv, "Observation")
        assert obs["valueString"].split("\n")[1] == "[PII] Emergency Department"
        assert obs["code"]["coding"][0]["code"] == "1487"

    def test_missing_obr_is_an_error(self) -> None:
        """An ORU without OBR names OBR."""
        from mappings.errors import MissingRequiredField

        with pytest.raises(MissingRequiredField, match="OBR"):
            run(message("ORU^R01", PID, "OBX|1|ST|X^Y^L||z"))
