"""Benchmark: the outreach planner + reconciler, and the due sweep, on PostgreSQL.

Run from the repository root:  python bench/bench_outreach.py [--appointments N] [--due N]

It creates (and at the end drops) the database ``careloop_bench_outreach`` on the server named
by ``CARELOOP_BENCH_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
test``), applies the migrations, then:

1. loads N patients (a Patient record with a mobile, an email and a language each) and N
   upcoming booked appointments, one per patient, with the ``timeline_changes`` rows the
   timeline stage would have written (COPY; not timed);
2. times the reconciler consuming every change (the five example pathways, caps and quiet hours
   on): planned entries per second, touches written;
3. times the due sweep on the ``--due`` reminders that are due at the sweep's moment: claim
   (``SKIP LOCKED``), re-plan each against the timeline, render (Jinja2 + Babel) and write one
   file each through the development channel into a temporary folder: touches sent per second.

Targets (issue 8): at least 5,000 planned entries/s; the sweep keeps up with 500 touches/s.
Prints a table and writes ``bench/results/outreach.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tomllib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench import pgdb  # noqa: E402
from integration.db import create_db_engine  # noqa: E402
from integration.models import touches  # noqa: E402
from integration.outreach.pathways import Organization, OutreachSettings, Pathway  # noqa: E402
from integration.outreach.reconciler import reconcile  # noqa: E402
from integration.outreach.sender import send_due  # noqa: E402
from integration.outreach.stage import catalog_for, file_channels  # noqa: E402
from integration.outreach.state import OutreachConfig  # noqa: E402

SERVER = os.environ.get(
    "CARELOOP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DB = "careloop_bench_outreach"
NY = ZoneInfo("America/New_York")
PLAN_AT = datetime(2026, 3, 2, 9, 0, tzinfo=NY)
SWEEP_AT = datetime(2026, 3, 9, 10, 0, tzinfo=NY)

# The five pathways as the example configuration defines them (one source of truth).
PATHWAYS = tuple(
    Pathway.model_validate(p)
    for p in tomllib.loads((ROOT / "deploy" / "careloop.example.toml").read_text())["pathways"]
)


def create_database() -> str:
    return pgdb.create_database(SERVER, DB)


def drop_database() -> None:
    pgdb.drop_database(SERVER, DB)


def _start(n: int, due: int) -> datetime:
    """The first ``due`` appointments start so that their 3-day reminder is due at SWEEP_AT
    (between 08:00 and 10:00 three days before); the rest later, in office hours."""
    if n < due:
        return datetime(2026, 3, 12, 8, 0, tzinfo=NY) + timedelta(seconds=(n * 7200) // due)
    day = 13 + (n % 17)
    return datetime(2026, 3, day, 10, 0, tzinfo=NY) + timedelta(minutes=(n * 7) % 480)


def populate(url: str, n: int, due: int) -> float:
    start = time.perf_counter()
    engine = create_db_engine(url)
    raw = engine.raw_connection()
    now = datetime.now(UTC)
    try:
        cur = raw.cursor()
        pids = [uuid.UUID(int=i + 1).hex for i in range(n)]
        with cur.copy("COPY patients (id, created_at) FROM STDIN") as copy:
            for pid in pids:
                copy.write_row((pid, now))
        cols = ("id, patient_id, kind, status, time, end_time, summary, resource_type, "
                "resource, ordinal, first_seen, created_at, updated_at")
        with cur.copy(f"COPY timeline_entries ({cols}) FROM STDIN") as copy:
            for i, pid in enumerate(pids):
                patient = {
                    "resourceType": "Patient", "id": f"p{i}",
                    "name": [{"given": ["Alex"], "family": "Doe"}],
                    "telecom": [{"system": "phone", "value": f"+1555{i:07d}", "use": "mobile",
                                 "rank": 1},
                                {"system": "email", "value": f"p{i}@example.org", "rank": 2}],
                    "communication": [{"language": {"coding": [
                        {"code": "es" if i % 3 == 0 else "en"}]}, "preferred": True}],
                }
                copy.write_row((f"{i:030d}pa", pid, "patient", "active", now, None,
                                "Patient record active", "Patient", json.dumps(patient),
                                "x", now, now, now))
                begin = _start(i, due)
                appointment = {
                    "resourceType": "Appointment", "id": f"a{i}", "status": "booked",
                    "start": begin.isoformat(),
                    "end": (begin + timedelta(minutes=30)).isoformat(),
                    "serviceType": [{"text": "Check-up"}],
                    "participant": [
                        {"actor": {"reference": f"Patient/p{i}"}, "status": "accepted"},
                        {"actor": {"reference": "Location/l1", "display": "Main Street Clinic"},
                         "status": "accepted"}],
                }
                copy.write_row((f"{i:030d}ap", pid, "appointment", "booked",
                                begin.astimezone(UTC), begin.astimezone(UTC)
                                + timedelta(minutes=30), "Appointment booked: Check-up",
                                "Appointment", json.dumps(appointment), "x", now, now, now))
        with cur.copy("COPY timeline_changes (entry_id, patient_id, kind, change, status, at) "
                      "FROM STDIN") as copy:
            for i, pid in enumerate(pids):
                copy.write_row((f"{i:030d}pa", pid, "patient", "created", "active", now))
                copy.write_row((f"{i:030d}ap", pid, "appointment", "created", "booked", now))
        raw.commit()
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
        engine.dispose()
    return time.perf_counter() - start


def config(outbox: Path, batch: int) -> OutreachConfig:
    return OutreachConfig(
        pathways=PATHWAYS,
        outreach=OutreachSettings(outbox_dir=outbox, batch=batch),
        default_language="en",
        timezone="America/New_York",
        organization=Organization(name="Example Clinic", phone="+1 555 0100",
                                  link="https://portal.example/p"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appointments", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000,
                        help="changes per reconcile transaction (outreach.batch)")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    url = create_database()
    outbox = Path(tempfile.mkdtemp(prefix="careloop-outbox-"))
    try:
        load_s = populate(url, args.appointments, args.due)
        print(f"loaded {args.appointments:,} patients and appointments (+ changes) "
              f"in {load_s:.1f} s")
        engine = create_db_engine(url)
        cfg = config(outbox, args.batch)
        t0 = time.perf_counter()
        result = reconcile(engine, cfg, now=PLAN_AT)
        plan_s = time.perf_counter() - t0
        with engine.connect() as conn:
            scheduled = conn.execute(select(func.count()).select_from(touches)
                                     .where(touches.c.status == "scheduled")).scalar_one()
            due = conn.execute(select(func.count()).select_from(touches).where(
                touches.c.status == "scheduled", touches.c.due_at <= SWEEP_AT)).scalar_one()
        channels = file_channels(outbox)
        catalog = catalog_for(cfg)
        t0 = time.perf_counter()
        sweep = send_due(engine, cfg, channels, catalog, now=SWEEP_AT)
        sweep_s = time.perf_counter() - t0
        files = sum(1 for _ in outbox.rglob("*.json"))
        engine.dispose()
    finally:
        shutil.rmtree(outbox, ignore_errors=True)
        if not args.keep:
            drop_database()
    planned = {
        "changes": result.changes, "entries": result.entries, "touches_scheduled": scheduled,
        "skips": result.skipped, "seconds": round(plan_s, 3),
        "entries_per_s": round(result.entries / plan_s, 1),
        "changes_per_s": round(result.changes / plan_s, 1),
    }
    swept = {
        "due": due, "sent": sweep.sent, "cancelled": sweep.cancelled,
        "rescheduled": sweep.rescheduled, "files": files, "seconds": round(sweep_s, 3),
        "sent_per_s": round(sweep.sent / sweep_s, 1) if sweep_s else 0.0,
    }
    print(f"\n{'stage':34} {'count':>10} {'seconds':>9} {'per second':>12} {'target':>8}")
    print(f"{'planner + reconciler (entries)':34} {planned['entries']:>10,} "
          f"{plan_s:>9.2f} {planned['entries_per_s']:>12,.0f} {5000:>8,}")
    print(f"{'due sweep to file channel (sent)':34} {swept['sent']:>10,} "
          f"{sweep_s:>9.2f} {swept['sent_per_s']:>12,.0f} {500:>8,}")
    print(f"\n{scheduled:,} touches scheduled from {result.changes:,} changes; "
          f"{due:,} due at the sweep, {sweep.sent:,} sent, {files:,} files written")
    out = {
        "generated_by": "bench/bench_outreach.py",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "appointments": args.appointments,
        "batch": args.batch,
        "load_seconds": round(load_s, 2),
        "reconcile": planned,
        "sweep": swept,
        "targets": {"entries_per_s": 5000, "sent_per_s": 500},
    }
    path = ROOT / "bench" / "results" / "outreach.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
