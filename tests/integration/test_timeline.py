"""The timeline store: one entry per thing, newest version wins in any arrival order,
cross-source de-duplication, replays, changes, and concurrent writers (real PostgreSQL and
SQLite)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from integration.db import write_lock
from integration.models import (
    entry_keys,
    entry_sources,
    patients,
    timeline_changes,
    timeline_entries,
)
from integration.timeline import SourceRef, apply, apply_batch
from mappings import MappingContext, convert

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
SYSTEM = "urn:oid:1.2.3.5"


def appointment(filler: str, status: str, *, start: str = "2024-04-01T10:00:00Z",
                patient: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": f"appt-{filler}",
        "identifier": [{"system": SYSTEM, "value": filler}],
        "status": status,
        "start": start,
        "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}],
        **extra,
    }


def fhir_source(version: int, at: datetime, conn: str = "ehr", rid: str = "x") -> SourceRef:
    return SourceRef("fhir", conn, f"Appointment/{rid}/_history/{version}", str(version), at)


def run(engine: Engine, resources: list[dict[str, Any]], source: SourceRef) -> list[Any]:
    with write_lock(engine), engine.begin() as conn:
        return apply(conn, resources, source, NOW)


def entries(engine: Engine, resource_type: str = "Appointment") -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(
            select(timeline_entries).where(timeline_entries.c.resource_type == resource_type)
        ))


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where))
                   .scalar_one())


class TestNewestWins:
    def test_a_newer_version_replaces_the_state(self, engine: Engine) -> None:
        """A later version (greater ordinal) updates status, resource and summary."""
        run(engine, [appointment("F1", "booked")], fhir_source(1, T0))
        changes = run(engine, [appointment("F1", "cancelled")], fhir_source(2, T0 + timedelta(1)))
        (entry,) = entries(engine)
        assert entry.status == "cancelled"
        assert entry.summary.startswith("Appointment cancelled")
        assert [c.change for c in changes] == ["updated"]

    def test_an_older_version_is_recorded_but_not_applied(self, engine: Engine) -> None:
        """A version older than the entry's is kept as a source and changes nothing else."""
        run(engine, [appointment("F2", "cancelled")], fhir_source(2, T0 + timedelta(1)))
        changes = run(engine, [appointment("F2", "booked")], fhir_source(1, T0))
        (entry,) = entries(engine)
        assert entry.status == "cancelled"
        assert changes == []
        assert count(engine, entry_sources, entry_sources.c.entry_id == entry.id) == 2

    def test_replay_changes_nothing(self, engine: Engine) -> None:
        """The same version applied again writes no change and no second source."""
        run(engine, [appointment("F3", "booked")], fhir_source(1, T0))
        before = count(engine, timeline_changes)
        assert run(engine, [appointment("F3", "booked")], fhir_source(1, T0)) == []
        assert count(engine, timeline_changes) == before
        assert count(engine, entry_sources) == 1

    def test_a_delete_is_a_version_like_any_other(self, engine: Engine) -> None:
        """A FHIR delete (a stub, matched by its source id) wins when newer, loses when older."""
        run(engine, [appointment("F4", "booked")], fhir_source(1, T0))
        stub = {"resourceType": "Appointment", "id": "appt-F4",
                "participant": [{"actor": {"reference": "Patient/p1"}}]}
        delete = SourceRef("fhir", "ehr", "Appointment/appt-F4/_history/2", "2",
                           T0 + timedelta(1), deleted=True)
        run(engine, [stub], delete)
        run(engine, [appointment("F4", "arrived")], fhir_source(1, T0 + timedelta(hours=1)))
        (entry,) = entries(engine)
        assert entry.status == "deleted"

    def test_each_applied_change_is_written_for_outreach(self, engine: Engine) -> None:
        """timeline_changes gets created then updated, with the new status."""
        run(engine, [appointment("F5", "booked")], fhir_source(1, T0))
        run(engine, [appointment("F5", "noshow")], fhir_source(2, T0 + timedelta(1)))
        with engine.connect() as conn:
            rows = conn.execute(select(timeline_changes).order_by(timeline_changes.c.id)).all()
        assert [(r.change, r.status, r.kind) for r in rows] == [
            ("created", "booked", "appointment"), ("updated", "noshow", "appointment")]

    def test_same_time_a_cancel_beats_a_booking(self, engine: Engine) -> None:
        """HL7 times often tie (minute precision): a state further along wins the tie."""
        for status in ("cancelled", "booked"):
            src = SourceRef("hl7v2", "APP^FAC", f"inbox/{status}#1", "1", T0)
            run(engine, [appointment("F6", status)], src)
        assert entries(engine)[0].status == "cancelled"


STATUSES = ["proposed", "booked", "arrived", "fulfilled", "cancelled", "noshow"]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[int, str, int]], list[int]]:
    """A version history (version, status, minute; minutes may tie) and an arrival order
    that includes every version at least once, some twice."""
    n = draw(st.integers(1, 6))
    minutes = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    statuses = draw(st.lists(st.sampled_from(STATUSES), min_size=n, max_size=n))
    versions = [(i + 1, statuses[i], minutes[i]) for i in range(n)]
    dupes = draw(st.lists(st.integers(0, n - 1), max_size=3))
    order = draw(st.permutations(list(range(n)) + dupes))
    return versions, order


class TestConvergence:
    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(history=histories(), batch=st.booleans())
    def test_any_arrival_order_ends_in_the_same_state(
        self, engine: Engine, history: tuple[list[tuple[int, str, int]], list[int]],
        batch: bool,
    ) -> None:
        """Permuted and duplicated versions converge to the state of the greatest ordinal."""
        versions, order = history
        filler = uuid.uuid4().hex[:12]

        def version(i: int) -> tuple[list[dict[str, Any]], SourceRef]:
            v, status, minute = versions[i]
            res = appointment(filler, status, patient=filler, comment=f"v{v}")
            return [res], fhir_source(v, T0 + timedelta(minutes=minute), rid=filler)

        if batch:
            with write_lock(engine), engine.begin() as conn:
                apply_batch(conn, [version(i) for i in order], NOW)
        else:
            for i in order:
                run(engine, *version(i))
        # The expected winner: the greatest (time, version) pair, in a fresh timeline.
        expected_filler = filler + "-sorted"
        for i in sorted(range(len(versions)), key=lambda i: (versions[i][2], versions[i][0])):
            v, status, minute = versions[i]
            run(engine, [appointment(expected_filler, status, patient=filler, comment=f"v{v}")],
                fhir_source(v, T0 + timedelta(minutes=minute), rid=expected_filler))
        got = [e for e in entries(engine) if e.resource["identifier"][0]["value"] == filler]
        want = [e for e in entries(engine)
                if e.resource["identifier"][0]["value"] == expected_filler]
        assert len(got) == 1
        assert (got[0].status, got[0].resource["comment"], got[0].time) == (
            want[0].status, want[0].resource["comment"], want[0].time)
        assert count(engine, entry_sources, entry_sources.c.entry_id == got[0].id) == len(
            versions)


class TestOneThingOneEntry:
    def test_hl7_and_fhir_appointments_with_the_same_identifiers_are_one_entry(
        self, engine: Engine
    ) -> None:
        """An SIU booking then a FHIR Appointment with its filler id: one entry, two sources,
        on the same patient (the FHIR Patient shares the MRN)."""
        siu = (
            "MSH|^~\\&|SCHED|CLINIC|CL|CL|20240301090000+0000||SIU^S12^SIU_S12|C1|P|2.5.1\r"
            "SCH|P100^SCHED^1.2.3.4^ISO|F200^EHR^1.2.3.5^ISO|||||^^ROUTINE|||||"
            "^^30^20240401100000+0000\r"
            "PID|1||MRN77^^^HOSP&1.2.3.9&ISO^MR||Doe^Jane||19800101|F\r"
            "AIS|1||CHK^Checkup^L\r"
        )
        conversion = convert(siu, context=MappingContext(validate=False))
        run(engine, conversion.resources,
            SourceRef("hl7v2", conversion.sender, "inbox/1#C1", "C1", T0))
        fhir_patient = {"resourceType": "Patient", "id": "ehr-9",
                        "identifier": [{"system": "urn:oid:1.2.3.9", "value": "MRN77"}]}
        fhir_appt = appointment("F200", "cancelled", patient="ehr-9")
        run(engine, [fhir_patient, fhir_appt], fhir_source(4, T0 + timedelta(hours=2)))
        (entry,) = entries(engine)
        assert entry.status == "cancelled"
        with engine.connect() as conn:
            systems = sorted(r.system for r in conn.execute(
                select(entry_sources.c.system).where(entry_sources.c.entry_id == entry.id)))
        assert systems == ["fhir", "hl7v2"]
        assert count(engine, patients) == 1

    def test_text_never_matches(self, engine: Engine) -> None:
        """Two appointments alike in everything but their identifiers stay two entries."""
        run(engine, [appointment("A", "booked")], fhir_source(1, T0))
        run(engine, [appointment("B", "booked")], fhir_source(1, T0))
        assert len(entries(engine)) == 2

    def test_identifiers_in_one_resource_join_two_entries(self, engine: Engine) -> None:
        """Placer-only and filler-only entries become one when a version names both."""
        placer = {"system": "urn:oid:9.9", "value": "P1"}
        a = appointment("FX", "booked")
        a["identifier"] = [placer]
        run(engine, [a], fhir_source(1, T0, rid="a"))
        run(engine, [appointment("FX", "booked")], fhir_source(1, T0, rid="b"))
        assert len(entries(engine)) == 2
        both = appointment("FX", "arrived")
        both["identifier"].append(placer)
        changes = run(engine, [both], fhir_source(2, T0 + timedelta(1), rid="b"))
        (entry,) = entries(engine)
        assert entry.status == "arrived"
        assert count(engine, entry_sources, entry_sources.c.entry_id == entry.id) == 3
        assert count(engine, entry_keys, entry_keys.c.entry_id == entry.id) >= 3
        assert sorted(c.change for c in changes) == ["removed", "updated"]

    def test_local_identifiers_only_match_within_their_sender(self, engine: Engine) -> None:
        """An identifier without a system from sender A never matches sender B's."""
        for sender in ("A^X", "B^Y"):
            res = appointment("L1", "booked")
            res["identifier"] = [{"value": "L1"}]
            run(engine, [res], SourceRef("hl7v2", sender, f"inbox/{sender}", "1", T0))
        assert len(entries(engine)) == 2


@pytest.mark.postgres
class TestConcurrentWriters:
    def test_concurrent_upserts_make_one_patient_and_one_entry(self, pg_url: str) -> None:
        """Eight workers applying the same new appointment at once: no duplicates, no
        deadlock."""
        from integration.db import create_db_engine

        engine = create_db_engine(pg_url, pool_size=10)
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def worker(n: int) -> None:
            try:
                barrier.wait()
                for k in range(5):
                    patient = {"resourceType": "Patient", "id": f"w{n}-{k}",
                               "identifier": [{"system": "urn:mrn", "value": f"M{k}"},
                                              {"system": "urn:mpi", "value": f"E{k}"}]}
                    appt = appointment(f"C{k}", "booked", patient=f"w{n}-{k}")
                    with engine.begin() as conn:
                        apply(conn, [patient, appt], fhir_source(n, T0 + timedelta(minutes=n),
                                                                  conn=f"c{n}", rid=f"C{k}"),
                              NOW)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert errors == []
            assert len(entries(engine)) == 5
            assert len(entries(engine, "Patient")) == 5
            assert count(engine, patients) == 5
            assert count(engine, entry_sources) == 80
        finally:
            engine.dispose()
