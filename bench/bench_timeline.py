"""Benchmark: the patient timeline on PostgreSQL at 100,000 patients and 1,000,000 entries.

Run from the repository root:  python bench/bench_timeline.py [--entries N] [--patients N]

It creates (and at the end drops) the database ``careloop_bench_timeline`` on the server named
by ``CARELOOP_BENCH_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
test``), applies the migrations, then:

1. loads patients, identifiers, timeline entries, their keys and sources with COPY; one
   "hot" patient has 500 entries, the rest share the remainder;
2. times timeline reads for the hot patient through ``integration.timeline.read_page`` (the
   API's query): the first page and a deep page (cursor after 450 entries), 50 entries a page;
   and the first page through the HTTP API (in-process ASGI client, auth disabled, audit row
   written per read);
3. times upserts: synthetic SIU S12/S14/S15 messages (1,000 patients, 3 versions of 2,000
   appointments) converted by ``mappings.convert`` beforehand, then applied with
   ``apply_batch`` in transactions of 64 messages, like the processing stage.

Targets (issue 6): p99 under 20 ms per page; at least 2,000 upserts/s. Prints a table and
writes ``bench/results/timeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench import pgdb  # noqa: E402
from integration.db import create_db_engine  # noqa: E402
from integration.timeline import (  # noqa: E402
    Cursor,
    SourceRef,
    TimelineQuery,
    apply_batch,
    read_page,
)
from mappings import MappingContext, convert  # noqa: E402

SERVER = os.environ.get(
    "CARELOOP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DB = "careloop_bench_timeline"
T0 = datetime(2020, 1, 1, tzinfo=UTC)
HOT = "f" * 32
SYSTEM_REF = "urn:careloop:ref:fhir:bench:Appointment"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def create_database() -> str:
    return pgdb.create_database(SERVER, DB)


def drop_database() -> None:
    pgdb.drop_database(SERVER, DB)


def _resource(n: int, patient: str) -> str:
    return json.dumps({
        "resourceType": "Appointment", "id": f"b{n}", "status": "booked",
        "identifier": [{"system": "urn:bench", "value": str(n)}],
        "start": (T0 + timedelta(hours=n % 40_000)).isoformat(),
        "serviceType": [{"coding": [{"code": "CHK", "display": "Checkup"}]}],
        "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}],
    }, separators=(",", ":"))


def populate(url: str, n_patients: int, n_entries: int) -> float:
    """COPY the data in; returns seconds taken."""
    start = time.perf_counter()
    engine = create_db_engine(url)
    raw = engine.raw_connection()
    now = datetime.now(UTC).isoformat()
    ids = [HOT] + [uuid.UUID(int=i).hex for i in range(1, n_patients)]
    try:
        cur = raw.cursor()
        with cur.copy("COPY patients (id, created_at) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for pid in ids:
                copy.write_row((pid, now))
        with cur.copy(
            "COPY patient_identifiers (system, value, patient_id, created_at) FROM STDIN"
        ) as copy:  # type: ignore[attr-defined]
            for i, pid in enumerate(ids):
                copy.write_row(("urn:bench:mrn", f"M{i}", pid, now))
        hot_entries = 500
        with cur.copy(
            "COPY timeline_entries (id, patient_id, kind, status, time, end_time, summary, "
            "resource_type, resource, ordinal, first_seen, created_at, updated_at) FROM STDIN"
        ) as copy:  # type: ignore[attr-defined]
            for n in range(n_entries):
                pid = HOT if n < hot_entries else ids[1 + n % (n_patients - 1)]
                at = (T0 + timedelta(hours=n % 40_000)).isoformat()
                copy.write_row((
                    f"{n:032x}", pid, "appointment", "booked", at, None,
                    "Appointment booked: Checkup", "Appointment", _resource(n, pid),
                    f"20200101T000000.000000|3~{n:012d}|0", at, now, now,
                ))
        with cur.copy(
            "COPY entry_keys (resource_type, system, value, entry_id) FROM STDIN"
        ) as copy:  # type: ignore[attr-defined]
            for n in range(n_entries):
                copy.write_row(("Appointment", "urn:bench", str(n), f"{n:032x}"))
        with cur.copy(
            "COPY entry_sources (entry_id, system, connection, ref, version, ordinal, "
            "received_at) FROM STDIN"
        ) as copy:  # type: ignore[attr-defined]
            for n in range(n_entries):
                copy.write_row((f"{n:032x}", "fhir", "bench", f"Appointment/b{n}/_history/1",
                                "1", f"20200101T000000.000000|3~{n:012d}|0", now))
        raw.commit()
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return time.perf_counter() - start


def time_reads(url: str, rounds: int) -> dict[str, dict[str, float]]:
    engine = create_db_engine(url)
    results: dict[str, dict[str, float]] = {}
    with engine.connect() as conn:
        cursor: Cursor | None = None
        for _ in range(9):  # 9 pages of 50 → the cursor after 450 entries
            page = read_page(conn, TimelineQuery(HOT, limit=50, after=cursor))
            cursor = page.next
    for name, after in (("first page (query)", None), ("deep page, 450+ (query)", cursor)):
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            with engine.connect() as conn:
                page = read_page(conn, TimelineQuery(HOT, limit=50, after=after))
            samples.append((time.perf_counter() - t) * 1000)
            assert len(page.items) == 50
        results[name] = _stats(samples)
    results["first page (HTTP API)"] = _time_http(url, rounds, None)
    results["deep page (HTTP API)"] = _time_http(url, rounds, cursor)
    engine.dispose()
    return results


def _time_http(url: str, rounds: int, cursor: Cursor | None) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from integration.api import create_app
    from integration.runtime import Runtime
    from integration.settings import load_settings

    settings = load_settings(database_url=url, auth="disabled", inprocess_worker=False,
                             log_level="error", mllp_port=0, http_port=0)
    runtime = Runtime(settings, with_mllp=False)
    params = {"limit": "50"}
    if cursor is not None:
        params["cursor"] = cursor.encode(HOT)
    samples = []
    with TestClient(create_app(runtime)) as client:
        for _ in range(rounds):
            t = time.perf_counter()
            r = client.get(f"/patients/{HOT}/timeline", params=params)
            samples.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200 and len(r.json()["items"]) == 50
    runtime.engine.dispose()
    return _stats(samples)


def _stats(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": statistics.median(samples),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
    }


def _siu(n: int, version: int) -> str:
    trigger, status = (("S12", "Booked"), ("S14", "Booked"), ("S15", "Cancelled"))[version]
    patient = n % 1000
    return (
        f"MSH|^~\\&|SCHED|CLINIC|CL|CL|2024030{version + 1}090000+0000||SIU^{trigger}^SIU_"
        f"{trigger}|C{n}-{version}|P|2.5.1\r"
        f"SCH|P{n}^SCHED^1.2.3.4^ISO|F{n}^EHR^1.2.3.5^ISO|||||^^ROUTINE|||||"
        f"^^30^2024040{1 + n % 9}100000+0000||||||||||||||{status}\r"
        f"PID|1||MRN{patient}^^^HOSP&1.2.3.9&ISO^MR||Doe^Pat||19800101|F\r"
        f"AIS|1||CHK^Checkup^L\r"
    )


def time_upserts(url: str, appointments: int) -> dict[str, float]:
    ctx = MappingContext(validate=False)
    messages = []
    for version in range(3):
        for n in range(appointments):
            conversion = convert(_siu(n, version), context=ctx)
            source = SourceRef("hl7v2", conversion.sender, f"inbox/{version}-{n}",
                               conversion.control_id, T0 + timedelta(days=version))
            messages.append((conversion.resources, source))
    engine = create_db_engine(url)
    resources = sum(len(r) for r, _ in messages)
    start = time.perf_counter()
    for i in range(0, len(messages), 64):
        with engine.begin() as conn:
            apply_batch(conn, messages[i : i + 64], datetime.now(UTC))
    seconds = time.perf_counter() - start
    engine.dispose()
    return {
        "messages": len(messages),
        "resources": resources,
        "seconds": seconds,
        "messages_per_s": len(messages) / seconds,
        "upserts_per_s": resources / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--appointments", type=int, default=2_000)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    url = create_database()
    try:
        load_s = populate(url, args.patients, args.entries)
        print(f"loaded {args.patients:,} patients and {args.entries:,} entries "
              f"in {load_s:.1f} s")
        reads = time_reads(url, args.rounds)
        upserts = time_upserts(url, args.appointments)
    finally:
        if not args.keep:
            drop_database()
    print(f"\n{'timeline read, 50 per page':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, s in reads.items():
        print(f"{name:34} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.2f}")
    print(f"\nupserts: {upserts['messages']:,} SIU messages ({upserts['resources']:,} "
          f"resources) in {upserts['seconds']:.2f} s: {upserts['messages_per_s']:,.0f} "
          f"messages/s, {upserts['upserts_per_s']:,.0f} resource upserts/s")
    out = {
        "generated_by": "bench/bench_timeline.py",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "patients": args.patients,
        "entries": args.entries,
        "load_seconds": load_s,
        "reads": reads,
        "upserts": upserts,
        "targets": {"p99_ms": 20, "upserts_per_s": 2000},
    }
    path = ROOT / "bench" / "results" / "timeline.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
