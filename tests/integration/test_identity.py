"""Patient identity: identifiers, conflicts, local identifiers and merges (PostgreSQL and
SQLite)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from integration.db import write_lock
from integration.identity import (
    IdentityRules,
    find_by_identifier,
    patient_summary,
    resolve_id,
)
from integration.models import (
    audit_events,
    patient_identifiers,
    patient_merges,
    patients,
    timeline_changes,
    timeline_entries,
)
from integration.timeline import SourceRef, apply
from mappings import MappingContext, convert

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)


def patient(rid: str, *idents: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": rid,
            "identifier": [{"system": s, "value": v} for s, v in idents], **extra}


def src(n: int, conn: str = "ehr") -> SourceRef:
    return SourceRef("fhir", conn, f"Patient/x/_history/{n}", str(n), T0 + timedelta(minutes=n))


def run(engine: Engine, resources: list[dict[str, Any]], source: SourceRef,
        rules: IdentityRules | None = None) -> list[Any]:
    with write_lock(engine), engine.begin() as conn:
        return apply(conn, resources, source, NOW, rules)


def owner(engine: Engine, system: str, value: str) -> str | None:
    with engine.connect() as conn:
        return find_by_identifier(conn, system, value)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


class TestResolve:
    def test_identifiers_find_the_same_patient_and_new_ones_are_added(
        self, engine: Engine
    ) -> None:
        """A second resource sharing one identifier lands on the patient and adds its others."""
        run(engine, [patient("a", ("urn:mrn", "1"))], src(1))
        run(engine, [patient("b", ("urn:mrn", "1"), ("urn:mpi", "E1"))], src(2))
        assert count(engine, patients) == 1
        assert owner(engine, "urn:mpi", "E1") == owner(engine, "urn:mrn", "1")

    def test_a_reference_alone_makes_a_patient_that_its_resource_joins(
        self, engine: Engine
    ) -> None:
        """An Appointment naming Patient/z before the Patient arrives: one patient."""
        appt = {"resourceType": "Appointment", "id": "ap", "status": "booked",
                "identifier": [{"system": "urn:appt", "value": "1"}],
                "participant": [{"actor": {"reference": "Patient/z"}}]}
        run(engine, [appt], src(1))
        run(engine, [patient("z", ("urn:mrn", "9"))], src(2))
        assert count(engine, patients) == 1

    def test_conflict_prefers_the_authoritative_system_and_is_audited(
        self, engine: Engine
    ) -> None:
        """Identifiers naming two patients: the authoritative one wins, nothing is merged,
        and an identity.conflict audit event names both."""
        run(engine, [patient("a", ("urn:mrn", "1"))], src(1))
        run(engine, [patient("b", ("urn:mpi", "E1"))], src(2))
        mpi = owner(engine, "urn:mpi", "E1")
        mrn = owner(engine, "urn:mrn", "1")
        run(engine, [patient("c", ("urn:mrn", "1"), ("urn:mpi", "E1"), ("urn:x", "new"))],
            src(3), IdentityRules(("urn:mpi",)))
        assert owner(engine, "urn:x", "new") == mpi
        assert owner(engine, "urn:mrn", "1") == mrn  # not moved, not merged
        with engine.connect() as conn:
            (event,) = conn.execute(select(audit_events)).all()
        assert event.action == "identity.conflict"
        assert event.target_id == mpi
        assert event.detail["other_patients"] == [mrn]

    def test_conflict_without_authority_takes_the_first_identifier(
        self, engine: Engine
    ) -> None:
        """With no authoritative system, the resource's first matching identifier decides."""
        run(engine, [patient("a", ("urn:mrn", "1"))], src(1))
        run(engine, [patient("b", ("urn:mpi", "E1"))], src(2))
        run(engine, [patient("c", ("urn:mpi", "E1"), ("urn:mrn", "1"), ("urn:x", "n"))], src(3))
        assert owner(engine, "urn:x", "n") == owner(engine, "urn:mpi", "E1")

    def test_local_identifiers_are_scoped_by_sender(self, engine: Engine) -> None:
        """MRN 123 without a system from two senders: two patients."""
        for sender in ("A^X", "B^Y"):
            local = {"resourceType": "Patient", "id": f"p-{sender}",
                     "identifier": [{"value": "123", "type": {"coding": [{"code": "MR"}]}}]}
            run(engine, [local], SourceRef("hl7v2", sender, f"inbox/{sender}", "1", T0))
        assert count(engine, patients) == 2
        with engine.connect() as conn:
            systems = sorted(r.system for r in conn.execute(select(patient_identifiers.c.system))
                             if r.system.startswith("urn:careloop:local:"))
        assert systems == ["urn:careloop:local:A^X:-:MR", "urn:careloop:local:B^Y:-:MR"]


ADT_A01 = (
    "MSH|^~\\&|EHR|HOSP|CL|CL|20240301090000+0000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    "EVN|A01|20240301090000+0000\r"
    "PID|1||{mrn}^^^BCBS&1.2.840.99&ISO^MR||Test^Pat||20180205|F\r"
    "PV1|1|I|W1^1^1||||||||||||||||{visit}^^^BCBS&1.2.840.99&ISO^VN|||||||||||||||||||||||||"
    "20240301090000+0000\r"
)
ADT_A40 = (
    "MSH|^~\\&|EHR|HOSP|CL|CL|20240305090000+0000||ADT^A40^ADT_A40|M1|P|2.5.1\r"
    "EVN|A40|20240305090000+0000\r"
    "PID|1||12345^^^BCBS&1.2.840.99&ISO^MR||Test^Pat||20180205|F\r"
    "MRG|56789^^^BCBS&1.2.840.99&ISO^MR\r"
)


def hl7(engine: Engine, text: str, n: int) -> list[Any]:
    conversion = convert(text, context=MappingContext(validate=False))
    source = SourceRef("hl7v2", conversion.sender, f"inbox/{n}#{conversion.control_id}",
                       conversion.control_id, T0 + timedelta(days=n))
    return run(engine, conversion.resources, source)


class TestMerge:
    def test_adt_a40_moves_entries_and_old_identifiers_resolve_to_the_survivor(
        self, engine: Engine
    ) -> None:
        """ADT A40: the replaced patient's encounter moves, its MRN and id resolve to the
        survivor, the merge is recorded and listed, and changes say 'moved'."""
        hl7(engine, ADT_A01.format(cid="A", mrn="56789", visit="V1"), 1)
        hl7(engine, ADT_A01.format(cid="B", mrn="12345", visit="V2"), 2)
        old = owner(engine, "urn:oid:1.2.840.99", "56789")
        survivor = owner(engine, "urn:oid:1.2.840.99", "12345")
        assert old and survivor and old != survivor
        changes = hl7(engine, ADT_A40, 3)
        assert owner(engine, "urn:oid:1.2.840.99", "56789") == survivor
        with engine.connect() as conn:
            assert resolve_id(conn, old) == survivor
            encounters = conn.execute(select(timeline_entries.c.patient_id).where(
                timeline_entries.c.kind == "encounter")).all()
            assert {e.patient_id for e in encounters} == {survivor}
            (merge,) = conn.execute(select(patient_merges)).all()
            summary = patient_summary(conn, survivor)
        assert (merge.survivor_id, merge.replaced_id, merge.source_system) == (
            survivor, old, "hl7v2")
        assert summary["merged"][0]["id"] == old
        assert {"system": "urn:oid:1.2.840.99", "value": "56789"} in summary["identifiers"]
        assert "moved" in {c.change for c in changes}

    def test_a_replayed_merge_changes_nothing(self, engine: Engine) -> None:
        """The same A40 again: no second merge row, no changes."""
        hl7(engine, ADT_A01.format(cid="A", mrn="56789", visit="V1"), 1)
        hl7(engine, ADT_A40, 3)
        before = count(engine, timeline_changes)
        assert hl7(engine, ADT_A40, 3) == []
        assert count(engine, patient_merges) == 1
        assert count(engine, timeline_changes) == before

    def test_fhir_link_replaced_by_merges(self, engine: Engine) -> None:
        """A FHIR Patient linked replaced-by another: merged into it."""
        run(engine, [patient("old", ("urn:mrn", "1"))], src(1))
        run(engine, [patient("new", ("urn:mrn", "2"))], src(2))
        replaced = patient("old", ("urn:mrn", "1"), active=False,
                           link=[{"type": "replaced-by", "other": {"reference": "Patient/new"}}])
        run(engine, [replaced], src(3))
        assert owner(engine, "urn:mrn", "1") == owner(engine, "urn:mrn", "2")
        assert count(engine, patient_merges) == 1
