"""v2 data types → FHIR data types: DTM, XPN, XAD, XTN, CX, CWE, numbers, durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mappings import codes
from mappings import datatypes as dt
from mappings.er7 import Delimiters
from mappings.message import Component
from tests.mappings.strategies_mappings import dtm_values, word

D = Delimiters()
LONDON = ZoneInfo("Europe/London")
NEW_YORK = ZoneInfo("America/New_York")


def comp(raw: str) -> Component:
    """One repetition of a field as the tokenizer hands it to a datatype reader."""
    return Component(raw, D, "^&")


class TestDateTime:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("2024", "2024"),
            ("202402", "2024-02"),
            ("20240229", "2024-02-29"),
            ("2024022913", "2024-02-29T13:00:00Z"),
            ("202402291305", "2024-02-29T13:05:00Z"),
            ("20240229130559", "2024-02-29T13:05:59Z"),
            ("20240229130559.1234", "2024-02-29T13:05:59.1234Z"),
            ("202010011126+0215", "2020-10-01T11:26:00+02:15"),
            ("20150601135823-0500", "2015-06-01T13:58:23-05:00"),
            ("1928-01-01", "1928-01-01"),
            ("Aug 15, 1942", "1942-08-15"),
            ("200803061000 ", "2008-03-06T10:00:00Z"),
        ],
    )
    def test_precision_is_kept(self, value: str, expected: str) -> None:
        """Each precision maps to the same FHIR precision; times get seconds and a zone."""
        assert dt.fhir_datetime(value, UTC) == expected

    def test_a_date_stays_a_date_whatever_the_zone(self) -> None:
        """A DT value gets no time and no zone, even for a sender far from UTC."""
        assert dt.fhir_datetime("19700601", ZoneInfo("Pacific/Kiritimati")) == "1970-06-01"

    def test_local_time_takes_the_sender_zone_offset_of_that_day(self) -> None:
        """Times without an offset are read in the sender's zone, DST included."""
        assert dt.fhir_datetime("202401151000", LONDON) == "2024-01-15T10:00:00Z"
        assert dt.fhir_datetime("202407151000", LONDON) == "2024-07-15T10:00:00+01:00"
        assert dt.fhir_datetime("202407151000", NEW_YORK) == "2024-07-15T10:00:00-04:00"

    def test_sent_offset_wins_over_sender_zone(self) -> None:
        """An offset in the value is kept as sent."""
        assert dt.fhir_datetime("202407151000+0530", NEW_YORK) == "2024-07-15T10:00:00+05:30"

    def test_birth_date_drops_the_time(self) -> None:
        """fhir_date keeps the calendar date as sent, whatever the time and offset."""
        assert dt.fhir_date("197006012330-0800") == "1970-06-01"

    def test_instant_from_a_date_is_midnight_in_the_sender_zone(self) -> None:
        """An instant needs a time: a date alone becomes local midnight."""
        assert dt.fhir_instant("20240715", NEW_YORK) == "2024-07-15T00:00:00-04:00"

    @pytest.mark.parametrize("value", ["20241301", "20240230", "2024022925", "abc", "2024-13", "1"])
    def test_unreadable_values_raise_datatype_error(self, value: str) -> None:
        """Impossible dates and junk raise DatatypeError, never a bare ValueError subclass."""
        with pytest.raises(dt.DatatypeError):
            dt.fhir_datetime(value, UTC)

    def test_empty_is_none(self) -> None:
        """An empty value maps to nothing."""
        assert dt.fhir_datetime("", UTC) is None
        assert dt.fhir_date("  ") is None

    @settings(max_examples=300, deadline=None)
    @given(sample=dtm_values(), zone=st.sampled_from([UTC, LONDON, NEW_YORK]))
    def test_any_dtm_maps_to_the_instant_it_names(
        self, sample: tuple[str, datetime, int, int | None], zone: timezone
    ) -> None:
        """Parsing the FHIR value back gives the moment the DTM named, at its precision."""
        text, moment, precision, offset = sample
        out = dt.fhir_datetime(text, zone)
        assert out is not None
        if precision <= 8:
            assert out == moment.strftime("%Y-%m-%d")[: {4: 4, 6: 7, 8: 10}[precision]]
            return
        parsed = datetime.fromisoformat(out.replace("Z", "+00:00"))
        truncated = moment.replace(
            minute=moment.minute if precision >= 12 else 0,
            second=moment.second if precision >= 14 else 0,
        )
        if offset is not None:
            assert parsed.utcoffset() == timedelta(minutes=offset)
            assert parsed.replace(tzinfo=None) == truncated
        else:
            # the wall-clock time is kept and the offset is the sender zone's on that day
            assert parsed.replace(tzinfo=None) == truncated
            assert parsed.utcoffset() == truncated.replace(tzinfo=zone).utcoffset()


class TestHumanName:
    def test_xpn_components_map_per_the_ig(self) -> None:
        """Family, given + middle, suffix + degree, prefix, use and period all map."""
        name = dt.human_name(comp("Everywoman^Eve^L^Jr^Dr^PhD^L^^^^G^20000909^20301231"), UTC)
        assert name == {
            "use": "official",
            "family": "Everywoman",
            "given": ["Eve", "L"],
            "prefix": ["Dr"],
            "suffix": ["Jr", "PhD"],
            "period": {"start": "2000-09-09", "end": "2030-12-31"},
        }

    def test_surname_prefix_subcomponents_keep_the_surname(self) -> None:
        """FN subcomponents (van&Beethoven) give the surname from FN.1."""
        assert dt.human_name(comp("Beethoven&van^Ludwig"), UTC) == {
            "family": "Beethoven",
            "given": ["Ludwig"],
        }

    def test_a_name_with_only_a_title_is_nothing(self) -> None:
        """Without family or given name there is no HumanName."""
        assert dt.human_name(comp("^^^^Dr"), UTC) is None

    @settings(max_examples=150, deadline=None)
    @given(
        family=word,
        given=word,
        middle=st.one_of(st.just(""), word),
        use=st.sampled_from(sorted(codes.NAME_USE.codes)),
    )
    def test_any_xpn_round_trips_its_parts(
        self, family: str, given: str, middle: str, use: str
    ) -> None:
        """Whatever the words, family and given names come back in order with the mapped use."""
        name = dt.human_name(comp(f"{family}^{given}^{middle}^^^^{use}"), UTC)
        assert name is not None
        assert name["family"] == family
        assert name["given"] == [g for g in (given, middle) if g]
        assert name["use"] == codes.NAME_USE.code(use)


class TestAddress:
    def test_xad_maps_lines_city_state_and_use(self) -> None:
        """Street, other designation, city, state, zip, country and type H → home."""
        addr = dt.address(comp("1000 House Lane^Appt 123^Ann Arbor ^MI^99999^USA^H^^WA"), UTC)
        assert addr == {
            "use": "home",
            "line": ["1000 House Lane", "Appt 123"],
            "city": "Ann Arbor",
            "district": "WA",
            "state": "MI",
            "postalCode": "99999",
            "country": "USA",
        }

    def test_mailing_address_is_a_postal_type(self) -> None:
        """XAD-7 M gives Address.type postal, not a use."""
        assert dt.address(comp("1 Rd^^X^^^^M"), UTC) == {
            "type": "postal",
            "line": ["1 Rd"],
            "city": "X",
        }

    def test_an_address_with_only_a_type_is_nothing(self) -> None:
        """XAD-7 alone is not an address."""
        assert dt.address(comp("^^^^^^H"), UTC) is None

    @settings(max_examples=150, deadline=None)
    @given(street=word, city=word, state=word, kind=st.sampled_from(["H", "B", "M", "C", "", "ZZ"]))
    def test_any_xad_keeps_its_parts(self, street: str, city: str, state: str, kind: str) -> None:
        """Street, city and state always survive; the type maps or is left out."""
        addr = dt.address(comp(f"{street}^^{city}^{state}^^^{kind}"), UTC)
        assert addr is not None
        assert (addr["line"], addr["city"], addr["state"]) == ([street], city, state)
        assert addr.get("use") == codes.ADDRESS_USE.code(kind)


class TestContactPoint:
    def test_v25_phone_is_built_from_its_parts(self) -> None:
        """Country, area, local number and extension build the value; WPN → work."""
        cp = dt.contact_point(comp("^WPN^PH^^1^555^555-1126^12"), UTC)
        assert cp == {"system": "phone", "value": "+1 (555) 555-1126 ext. 12", "use": "work"}

    def test_email_comes_from_xtn4(self) -> None:
        """Internet equipment takes the address from XTN-4."""
        cp = dt.contact_point(comp("^NET^Internet^eve@test.test"), UTC)
        assert cp == {"system": "email", "value": "eve@test.test"}

    def test_v23_number_in_xtn1_is_kept(self) -> None:
        """Older senders put the whole number in XTN-1."""
        assert dt.contact_point(comp("(832)795-8259"), UTC) == {
            "system": "phone",
            "value": "(832)795-8259",
        }

    def test_cell_phone_is_a_phone_with_mobile_use(self) -> None:
        """CP is not an R4 ContactPointSystem: it becomes phone + use mobile."""
        cp = dt.contact_point(comp("^PRN^CP^^^555^1234567"), UTC)
        assert cp is not None
        assert (cp["system"], cp["use"]) == ("phone", "mobile")

    def test_rank_comes_from_preference_order(self) -> None:
        """XTN-18 is the rank."""
        cp = dt.contact_point(comp("^PRN^PH^^^555^1234567" + "^" * 11 + "2"), UTC)
        assert cp is not None
        assert cp["rank"] == 2

    @settings(max_examples=150, deadline=None)
    @given(
        number=st.from_regex(r"\A[0-9]{3}-[0-9]{4}\Z"),
        use=st.sampled_from(["PRN", "WPN", "ORN", ""]),
        equipment=st.sampled_from(["PH", "FX", "BP", ""]),
    )
    def test_any_phone_keeps_its_number(self, number: str, use: str, equipment: str) -> None:
        """The local number is always in the value and system is always set."""
        cp = dt.contact_point(comp(f"^{use}^{equipment}^^^^{number}"), UTC)
        assert cp is not None
        assert number in cp["value"]
        assert cp["system"] in ("phone", "fax", "pager")
        assert cp.get("use") == codes.TELECOM_USE.code(use)


class TestIdentifier:
    def test_iso_authority_becomes_an_oid_system(self) -> None:
        """CX-4 with an ISO universal id gives urn:oid: and the type from CX-5."""
        ident = dt.identifier(comp("1032702^^^V2FHIR&1.2.3.4.5&ISO^MR"), {}, UTC)
        assert ident == {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                        "code": "MR",
                        "display": "Medical record number",
                    }
                ]
            },
            "system": "urn:oid:1.2.3.4.5",
            "value": "1032702",
        }

    def test_caller_map_wins_for_a_namespace(self) -> None:
        """The sender's configured systems map an assigning authority namespace."""
        systems = {"RAJ12": "https://example.nhs.uk/Id/raj12"}
        ident = dt.identifier(comp("D7006372^^^RAJ12^HOSP"), systems, UTC)
        assert ident is not None
        assert ident["system"] == "https://example.nhs.uk/Id/raj12"

    def test_unknown_authority_is_an_assigner(self) -> None:
        """Without a system the authority's name is kept as the assigner."""
        ident = dt.identifier(comp("42^^^LOCAL^MR"), {}, UTC)
        assert ident is not None
        assert "system" not in ident
        assert ident["assigner"] == {"display": "LOCAL"}

    def test_ssn_namespace_maps_to_the_us_ssn_system(self) -> None:
        """USSSA with type SS is the well-known SSN system."""
        ident = dt.identifier(comp("123456789^^^USSSA^SS"), {}, UTC)
        assert ident is not None
        assert ident["system"] == "http://hl7.org/fhir/sid/us-ssn"


class TestCodeableConcept:
    def test_all_three_triplets_and_original_text(self) -> None:
        """Identifier, alternate and second alternate codings; text from CWE-9."""
        cc = dt.codeable_concept(comp("8302-2^Body Height^LN^HT^Height^L^2.68^^Height text"))
        assert cc == {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "8302-2",
                    "display": "Body Height",
                    "version": "2.68",
                },
                {"code": "HT", "display": "Height"},
            ],
            "text": "Height text",
        }

    def test_v2_table_codes_map_to_fhir_codes_first(self) -> None:
        """With a table, the mapped FHIR coding leads and the v2 coding follows."""
        cc = dt.codeable_concept(comp("M^Married^HL70002"), codes.MARITAL_STATUS)
        assert cc is not None
        assert cc["coding"][0] == {
            "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            "code": "M",
            "display": "Married",
        }
        assert cc["coding"][1]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0002"

    def test_text_only_value_is_a_text_concept(self) -> None:
        """^Timothy Grass (no code) is kept as text."""
        assert dt.codeable_concept(comp("^Timothy Grass")) == {"text": "Timothy Grass"}

    @settings(max_examples=150, deadline=None)
    @given(
        code=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9.-]{0,10}\Z"),
        display=word,
        system=st.sampled_from(["LN", "SCT", "HL70005", "L", "99ZZZ", "2.16.840.1.113883.6.1", ""]),
    )
    def test_any_cwe_keeps_code_and_display(self, code: str, display: str, system: str) -> None:
        """Code and display survive; the system is a URI or absent, never a bare name."""
        cc = dt.codeable_concept(comp(f"{code}^{display}^{system}"))
        assert cc is not None
        first = cc["coding"][0]
        assert (first["code"], first["display"]) == (code, display)
        if "system" in first:
            assert ":" in first["system"]


class TestNumbers:
    @pytest.mark.parametrize(
        ("text", "value"), [("5", 5), ("0.25", 0.25), (".5", 0.5), ("-3", -3), ("7.", 7.0)]
    )
    def test_decimals_parse(self, text: str, value: float) -> None:
        """NM values become JSON numbers, ints when written without a point."""
        assert dt.decimal(text) == value

    def test_junk_is_a_datatype_error(self) -> None:
        """A non-number raises DatatypeError."""
        with pytest.raises(dt.DatatypeError):
            dt.decimal("12abc")

    @pytest.mark.parametrize(
        ("unit", "code"), [("D", "d"), ("day", "d"), ("Hr", "h"), ("min", "min"), ("wk", "wk")]
    )
    def test_duration_units_map_to_ucum(self, unit: str, code: str) -> None:
        """The duration units v2 senders write become UCUM codes."""
        assert dt.duration("3", unit) == {
            "value": 3,
            "unit": code,
            "system": dt.UCUM_URI,
            "code": code,
        }
