"""The entry point: routing, errors, determinism, provenance, Bundle, time zones."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from mappings.context import MappingContext
from mappings.convert import ROUTES, convert, family_of
from mappings.errors import (
    InvalidMessage,
    MappingError,
    MissingRequiredField,
    UnsupportedMessageType,
)
from mappings.fhir_validation import validate_resource
from mappings.output import CONTROL_ID_TAG_SYSTEM, SENDER_TAG_SYSTEM
from tests.mappings.helpers_mappings import CONTEXT, fixture, message, one, run, seg

PID = "PID|1||123^^^HOSP^MR||Doe^John||19700101|M"


class TestRouting:
    def test_every_family_in_the_issue_is_routed(self) -> None:
        """ADT, SIU, RDE/OMP/RDS, ORU and VXU triggers all have a mapper."""
        for code, trigger in [
            ("ADT", "A01"), ("ADT", "A47"), ("SIU", "S12"), ("SIU", "S26"), ("RDE", "O11"),
            ("RDE", "O25"), ("OMP", "O09"), ("RDS", "O13"), ("ORU", "R01"), ("VXU", "V04"),
        ]:  # fmt: skip
            assert family_of(code, trigger) is not None, (code, trigger)
        assert len(ROUTES) == 16 + 15 + 4 + 2

    def test_unsupported_type_names_the_type(self) -> None:
        """MDM^T02 raises UnsupportedMessageType with the X^Y text."""
        with pytest.raises(UnsupportedMessageType, match=r"unsupported message type MDM\^T02"):
            run(message("MDM^T02", PID))

    def test_missing_trigger_is_taken_from_the_structure(self) -> None:
        """ORU^^ORU_R01 (ReportStream) routes as ORU^R01 with a warning."""
        raw = message("ORU^^ORU_R01", PID, "OBR|1||F1|1^Test^L", "OBX|1|NM|2^X^L||5")
        conv = run(raw)
        assert conv.message_type == "ORU^R01"
        assert any("MSH-9.2" in w for w in conv.warnings)


class TestErrors:
    def test_empty_pid3_names_segment_and_field(self) -> None:
        """A patient without any identifier is the style guide's example error."""
        with pytest.raises(
            MissingRequiredField, match=r"^PID-3 is empty: no patient identifier$"
        ) as exc:
            run(message("ADT^A01", "PID|1||||Doe^John"))
        assert exc.value.location == "PID-3"
        assert exc.value.ack_code == "AR"

    def test_unreadable_bytes_are_invalid_message(self) -> None:
        """No MSH: InvalidMessage, a MappingError and a ValueError."""
        with pytest.raises(InvalidMessage) as exc:
            run(b"hello")
        assert isinstance(exc.value, MappingError)
        assert isinstance(exc.value, ValueError)

    def test_malformed_fields_are_warnings_not_errors(self) -> None:
        """A bad birth date, gender and visit time are left out with warnings naming them."""
        raw = message(
            "ADT^A01",
            "EVN|A01|20240131",
            "PID|1||123^^^HOSP^MR||Doe^John||19991399|Q",
            seg("PV1", {1: "1", 2: "I", 3: "W1", 19: "V1", 44: "2024013199"}),
        )
        conv = run(raw)
        joined = "\n".join(conv.warnings)
        assert "PID-7" in joined
        assert "PID-8" in joined
        assert "PV1-44" in joined
        patient = one(conv, "Patient")
        assert "birthDate" not in patient
        assert "gender" not in patient

    def test_empty_and_null_fields_never_raise(self) -> None:
        """Every field of every segment empty or "" still converts."""
        segs = ["EVN|" + "|".join(['""'] * 7), PID, "PV1|" + "|".join(['""'] * 52)]
        segs += ["NK1|" + "|".join([""] * 40), "AL1|1", "DG1|1", "IN1|1", "OBX|1"]
        conv = run(message("ADT^A01", *segs))
        assert one(conv, "Patient")["identifier"][0]["value"] == "123"


class TestDeterminism:
    def test_same_message_same_resources(self) -> None:
        """Converting twice yields identical resources, ids included."""
        raw = fixture("adt_a01_v2f.hl7")
        assert run(raw).resources == run(raw).resources

    def test_same_patient_same_id_across_messages(self) -> None:
        """Two messages about the same PID-3 give the same Patient id."""
        a = run(message("ADT^A01", PID, "PV1|1|I", n=1))
        b = run(message("ADT^A08", PID, "PV1|1|I", n=2))
        assert one(a, "Patient")["id"] == one(b, "Patient")["id"]

    def test_meta_carries_sender_and_control_id(self) -> None:
        """meta.source names sender and MSH-10; tags carry both for search."""
        conv = run(message("ADT^A01", PID, n=7))
        meta = one(conv, "Patient")["meta"]
        assert meta["source"] == "urn:careloop:hl7v2:SND:FAC#CTL7"
        assert {"system": CONTROL_ID_TAG_SYSTEM, "code": "CTL7"} in meta["tag"]
        assert {"system": SENDER_TAG_SYSTEM, "code": "SND^FAC"} in meta["tag"]


class TestBundle:
    def test_bundle_is_a_valid_collection(self) -> None:
        """bundle() is a collection Bundle that validates, with urn:uuid fullUrls."""
        conv = run(fixture("siu_s12_msfc.hl7"))
        bundle = conv.bundle()
        assert bundle["type"] == "collection"
        assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
        assert validate_resource(bundle) == []

    def test_bundle_with_a_base_url_resolves_references(self) -> None:
        """With a server base, fullUrls are RESTful and match the Type/id references."""
        conv = run(fixture("siu_s12_msfc.hl7"))
        bundle = conv.bundle("https://fhir.example.org/r4")
        urls = {e["fullUrl"] for e in bundle["entry"]}
        patient = one(conv, "Patient")
        assert f"https://fhir.example.org/r4/Patient/{patient['id']}" in urls


class TestTime:
    def test_output_does_not_depend_on_the_process_zone(self) -> None:
        """With TZ set to Asia/Kolkata the process clock changes nothing in the output."""
        raw = message("ADT^A01", PID, seg("PV1", {1: "1", 2: "I", 19: "V9", 44: "202407011200"}))
        before = run(raw).resources
        old = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Kolkata"
        time.tzset()
        try:
            after = run(raw).resources
        finally:
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()
        assert before == after

    def test_frozen_now_in_a_non_utc_zone_is_the_bundle_timestamp(self) -> None:
        """`now` at +04:00 is written with its offset; local times use the sender zone."""
        now = datetime(2024, 7, 1, 9, 30, tzinfo=timezone(timedelta(hours=4)))
        ctx = MappingContext(sender_timezone=ZoneInfo("Asia/Dubai"), now=now)
        raw = message("ADT^A01", PID, seg("PV1", {1: "1", 2: "I", 19: "V9", 44: "202407011200"}))
        conv = convert(raw, context=ctx)
        assert conv.bundle()["timestamp"] == "2024-07-01T09:30:00+04:00"
        encounter = one(conv, "Encounter")
        assert encounter["period"]["start"] == "2024-07-01T12:00:00+04:00"

    def test_naive_now_is_refused(self) -> None:
        """A naive `now` would hide a time zone slip: the context refuses it."""
        with pytest.raises(ValueError, match="timezone-aware"):
            MappingContext(now=datetime(2024, 1, 1))


class TestValidation:
    def test_every_fixture_resource_validates(self) -> None:
        """With validate on, every produced resource passes the R4B models."""
        for name in ("adt_a01_v2f.hl7", "vxu_v04_msfc.hl7", "rde_o11_msfc.hl7"):
            for res in run(fixture(name)).resources:
                assert validate_resource(res) == [], (name, res["resourceType"])

    def test_validation_can_be_switched_off(self) -> None:
        """validate=False skips the models and yields the same resources for valid input."""
        raw = fixture("oru_r01_nist.hl7")
        off = MappingContext(sender_timezone=CONTEXT.sender_timezone, validate=False)
        assert run(raw, off).resources == run(raw).resources
