"""hl7apy strict validation: the slow path for `careloop hl7 validate`."""

from __future__ import annotations

from mappings.strict import validate_strict
from tests.mappings.helpers_mappings import fixture, message


class TestValidateStrict:
    def test_a_clean_message_has_no_problems(self) -> None:
        """A minimal well-formed ADT^A01 v2.5 passes the standard's structure."""
        raw = (
            "MSH|^~\\&|A|B|C|D|20240101120000||ADT^A01^ADT_A01|1|P|2.5\r"
            "EVN|A01|20240101120000\r"
            "PID|1||123^^^HOSP^MR||Doe^John||19700101|M\r"
            "PV1|1|I\r"
        )
        assert validate_strict(raw) == []

    def test_structure_errors_are_listed_per_segment(self) -> None:
        """The MSFC v2.8 SIU breaks cardinality rules; each problem names its segment."""
        problems = validate_strict(fixture("siu_s12_msfc.hl7"))
        assert problems
        assert all(":" in p for p in problems)

    def test_unreadable_input_is_a_problem_not_an_exception(self) -> None:
        """No MSH: one problem naming MSH, no exception."""
        assert validate_strict(b"not hl7")[0].startswith("MSH")

    def test_unknown_version_is_reported(self) -> None:
        """A version hl7apy does not know is reported on MSH-12."""
        raw = message("ADT^A01", "PID|1||1").replace("|2.5.1", "|9.9")
        assert validate_strict(raw)[0].startswith("MSH-12")
