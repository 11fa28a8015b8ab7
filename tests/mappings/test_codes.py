"""Code tables as data: every map links its spec and reads codes case-insensitively."""

from __future__ import annotations

import pytest

from mappings import codes

MAPS = [v for v in vars(codes).values() if isinstance(v, codes.CodeMap)]


class TestCodeMaps:
    @pytest.mark.parametrize("table", MAPS, ids=lambda t: t.name)
    def test_each_map_links_the_ig_and_the_v2_table(self, table: codes.CodeMap) -> None:
        """spec points at the IG's concept map CSV, v2 at terminology.hl7.org."""
        assert table.spec.startswith("https://github.com/HL7/v2-to-fhir/")
        assert table.v2.startswith("https://terminology.hl7.org/CodeSystem-v2-")
        assert table.codes

    def test_lookup_ignores_case_and_padding(self) -> None:
        """' booked ' and 'BOOKED' both map."""
        assert codes.APPOINTMENT_STATUS.code(" booked ") == "booked"
        assert codes.APPOINTMENT_STATUS.code("NOSHOW") == "noshow"

    def test_unmapped_code_is_none(self) -> None:
        """An unknown code gives None, never an exception."""
        assert codes.ADMINISTRATIVE_SEX.code("Z") is None
        assert codes.MARITAL_STATUS.coding("Z") is None

    @pytest.mark.parametrize(
        ("name", "uri"),
        [
            ("LN", "http://loinc.org"),
            ("sct", "http://snomed.info/sct"),
            ("HL70005", "http://terminology.hl7.org/CodeSystem/v2-0005"),
            ("2.16.840.1.113883.6.1", "urn:oid:2.16.840.1.113883.6.1"),
            ("L", None),
            ("99ZZZ", None),
            ("HL7nnnn", None),
        ],
    )
    def test_coding_system_names_become_uris(self, name: str, uri: str | None) -> None:
        """Table 0396 names, v2 tables and OIDs become URIs; local names have none."""
        assert codes.coding_system_uri(name) == uri
