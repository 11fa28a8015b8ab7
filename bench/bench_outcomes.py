"""Benchmark: the outcome report over one million touches on PostgreSQL.

Run from the repository root:  python bench/bench_outcomes.py [--touches N] [--explain]
[--try-indexes] [--keep]

It creates (and at the end drops) the database ``careloop_bench_outcomes`` on the server named
by ``CARELOOP_BENCH_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
test``), applies the migrations, then loads (COPY; not timed) a year of history ending on
1 January 2026 with about N touches and the rows that go with them, in proportion:

* 100,000 patients (a Patient entry each) and ~N/3.6 appointments over the year and the two
  weeks after it (past ones fulfilled, no-show, cancelled, arrived or checked in; future ones
  booked), written roughly in time order (within ten days), as a live system writes them;
* per appointment, two ``appointment-reminder`` touches (3 days and 2 hours before), and for
  visits that happened a ``visit-followup`` and a ``survey`` touch: sent (delivered, undelivered
  or failed receipts), skipped, held with planner/sender reasons (several carry times), failed,
  or still scheduled; each with the rendered body;
* a delivery receipt (``channel_events`` kind ``status``) per sent SMS or call; inbound replies
  for 15% of SMS (70% of them a confirm, cancel or reschedule request) and key presses for 20%
  of calls; page survey answers for 25% of sent surveys; STOP (an opt-out) for 0.5% of SMS;
* rebookings (portal and waitlist) for 3% of reminded appointments; a freed slot per cancelled
  appointment with three waitlist offers each, 60% filled.

Then it times the whole report (:func:`integration.outcomes.outcome_report`) for the last 90
days: a first run and the median of ``--runs`` more; each query of the report on its own; and,
as the floor, a bare ``SELECT count(*) FROM touches`` and one ``GROUP BY`` over the period's
touches. ``--explain`` prints ``EXPLAIN (ANALYZE, BUFFERS)`` of every statement the report
runs; ``--try-indexes`` times it again after creating the candidate indexes (named below).

Target (issue 11): the report in under 2 s. Prints a table and writes
``bench/results/outcomes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, event, text  # noqa: E402

from bench import pgdb  # noqa: E402
from integration.db import create_db_engine  # noqa: E402
from integration.outcomes import report as outcomes  # noqa: E402
from integration.outreach.pathways import Pathway  # noqa: E402

SERVER = os.environ.get(
    "CARELOOP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DB = "careloop_bench_outcomes"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
HISTORY = timedelta(days=365)
AHEAD = timedelta(days=14)
PERIOD_DAYS = 90
PATIENTS = 100_000
TARGET_S = 2.0

PATHWAYS = [
    Pathway.model_validate(p) for p in (
        {"name": "appointment-reminder", "on": "appointment",
         "steps": [{"at": "-P3D", "template": "appointment-reminder"},
                   {"at": "-PT2H", "channel": "sms", "template": "appointment-reminder-short"}]},
        {"name": "visit-followup", "on": "visit-end",
         "steps": [{"at": "PT4H", "template": "visit-followup"}]},
        {"name": "survey", "on": "visit-end",
         "steps": [{"at": "P1DT2H", "channel": "email", "template": "survey"}]},
    )
]

# Candidate indexes for --try-indexes (the lead's migration decides; see the closing note).
CANDIDATE_INDEXES = {
    "ix_touches_unsent_updated_at":
        "CREATE INDEX ix_touches_unsent_updated_at ON touches (updated_at) "
        "WHERE sent_at IS NULL",
    "ix_channel_events_kind_received_at":
        "CREATE INDEX ix_channel_events_kind_received_at ON channel_events (kind, received_at)",
    "ix_patient_requests_touch_key":
        "CREATE INDEX ix_patient_requests_touch_key ON patient_requests (touch_key)",
    "ix_timeline_entries_kind_time":
        "CREATE INDEX ix_timeline_entries_kind_time ON timeline_entries (kind, time)",
    "ix_touches_entry_pathway_sent":
        "CREATE INDEX ix_touches_entry_pathway_sent ON touches (entry_id, pathway, sent_at)",
    "ix_freed_slots_freed_at":
        "CREATE INDEX ix_freed_slots_freed_at ON freed_slots (freed_at)",
    "ix_waitlist_offers_offered_at":
        "CREATE INDEX ix_waitlist_offers_offered_at ON waitlist_offers (offered_at)",
}

REASONS_SKIPPED = [
    "its time ({t}) had passed when planned",
    "opted out of every channel",
    "quiet hours: the next allowed time is too close to the appointment",
    "cap: 1 touch(es) already on {d}",
    "no sms contact",
]
REASONS_HELD = [
    "the patient asked to cancel",
    "the patient asked to reschedule",
    "opted out by reply",
    "too late: due {t}",
    "at send time: status cancelled is not one of booked",
    "quiet hours at send time; the next allowed time is too close to the moment",
]
BODY = ("Reminder: you have an appointment at Main Street Clinic on {d}. Reply C to confirm, "
        "R to reschedule, X to cancel. Manage it here: https://care.example/p/{k}")


def phone(n: int) -> str:
    return f"+1 (555) {n // 10000:03d}-{n % 10000:04d}"


def phone_norm(n: int) -> str:
    return f"+1555{n // 10000:03d}{n % 10000:04d}"


@contextmanager
def copies(url: str, tables: dict[str, str]) -> Iterator[dict[str, Any]]:
    """One connection and one COPY per table, open at the same time; committed together."""
    engine = create_db_engine(url)
    raws = []
    try:
        with ExitStack() as stack:
            writers = {}
            for name, columns in tables.items():
                raw = engine.raw_connection()
                raws.append(raw)
                cur = raw.cursor()
                writers[name] = stack.enter_context(
                    cur.copy(f"COPY {name} ({columns}) FROM STDIN"))
            yield writers
        for raw in raws:
            raw.commit()
    finally:
        for raw in raws:
            raw.close()
        engine.dispose()


TOUCH_COLS = ("key, pathway, step, entry_id, patient_id, due_at, moment, channel, address, "
              "language, template, status, reason, attempts, sent_at, provider_ref, body, "
              "delivery, created_at, updated_at")
EVENT_COLS = ("id, channel, kind, provider_id, address, touch_key, payload, status, result, "
              "attempts, received_at, processed_at")
REQUEST_COLS = "entry_id, patient_id, action, source, event_id, touch_key, detail, created_at"
ENTRY_COLS = ("id, patient_id, kind, status, time, end_time, summary, resource_type, resource, "
              "ordinal, first_seen, created_at, updated_at")


class Loader:
    """Generates the history (deterministic: one seeded random) into the COPY writers."""

    def __init__(self, w: dict[str, Any], target: int) -> None:
        self.w = w
        self.rng = random.Random(11)
        self.target = target
        self.counts: dict[str, int] = dict.fromkeys((
            "appointments", "touches", "channel_events", "patient_requests", "address_optouts",
            "bookings", "freed_slots", "waitlist_offers", "waitlist_entries"), 0)
        self.event_id = 0
        self.opted: set[str] = set()

    def _event(  # noqa: PLR0917
        self, channel: str, kind: str, address: str, touch_key: str | None, at: datetime,
        payload: dict[str, Any],
    ) -> int:
        self.event_id += 1
        self.w["channel_events"].write_row((
            self.event_id, channel, kind, f"E{self.event_id}", address, touch_key,
            json.dumps(payload), "processed", "", 1, at, at))
        self.counts["channel_events"] += 1
        return self.event_id

    def _request(  # noqa: PLR0917
        self, entry: str, pid: str, action: str, source: str, event_id: int, touch_key: str,
        detail: dict[str, Any] | None, at: datetime,
    ) -> None:
        self.w["patient_requests"].write_row((
            entry, pid, action, source, event_id, touch_key,
            json.dumps(detail) if detail is not None else None, at))
        self.counts["patient_requests"] += 1

    def touch(  # noqa: PLR0917
        self, pathway: str, step: int, entry: str, pid: str, pnum: int, due: datetime,
        moment: datetime, channel: str, appointment_status: str,
    ) -> tuple[str, str, datetime | None]:
        """One touch and what follows it; returns (key, status, sent_at)."""
        rng = self.rng
        key = f"{pathway}|{step}|{entry}"
        address = f" Pat{pnum}@Example.org" if channel == "email" else phone(pnum)
        sent_at = None
        delivery = reason = body = None
        updated = due
        roll = rng.random()
        if due > NOW:
            status = "scheduled"
            updated = due - timedelta(days=7)
        elif appointment_status == "cancelled" and pathway == "appointment-reminder" and (
                roll < 0.6):
            status, reason = "cancelled", "the patient asked to cancel"
        elif roll < 0.84:
            status = "sent"
            sent_at = due + timedelta(seconds=rng.randrange(0, 600))
            updated = sent_at
            body = BODY.format(d=moment.date().isoformat(), k=uuid.UUID(int=rng.getrandbits(
                128)).hex[:24])
            d = rng.random()
            delivery = ("delivered" if d < 0.92 else "undelivered" if d < 0.95 else
                        "failed" if d < 0.96 else "sent")
        elif roll < 0.90:
            status = "skipped"
            reason = rng.choice(REASONS_SKIPPED).format(t=due.isoformat(),
                                                        d=due.date().isoformat())
            updated = due - timedelta(days=rng.randrange(1, 10))
        elif roll < 0.96:
            status = "cancelled"
            reason = rng.choice(REASONS_HELD).format(t=due.isoformat())
            updated = due + timedelta(minutes=rng.randrange(0, 120))
        else:
            status = "failed"
            reason = f"channel: HTTP 400 The 'To' number {phone_norm(pnum)} is not valid"
        self.w["touches"].write_row((
            key, pathway, step, entry, pid, due, moment, channel if status != "skipped" else "",
            address if status != "skipped" else "", "en", pathway, status, reason, 1, sent_at,
            f"SM{self.counts['touches']:012d}" if sent_at else None, body, delivery,
            updated - timedelta(days=20), updated))
        self.counts["touches"] += 1
        if sent_at is None:
            return key, status, None
        norm = f"pat{pnum}@example.org" if channel == "email" else phone_norm(pnum)
        if channel in ("sms", "voice"):
            self._event(channel, "status", norm, key, sent_at + timedelta(seconds=5),
                        {"MessageSid": "SM", "MessageStatus": delivery or "sent"})
        r = rng.random()
        when = sent_at + timedelta(minutes=rng.randrange(1, 600))
        if channel == "sms" and r < 0.15:
            a = rng.random()
            eid = self._event("sms", "inbound", norm, None, when,
                              {"From": norm, "Body": "C" if a < 0.5 else "ok thanks"})
            if a < 0.7 and pathway == "appointment-reminder":
                action = ("confirm" if a < 0.525 else "cancel" if a < 0.595 else "reschedule")
                self._request(entry, pid, action, "sms", eid, key, None, when)
        elif channel == "sms" and r < 0.155 and norm not in self.opted:
            eid = self._event("sms", "inbound", norm, None, when, {"From": norm, "Body": "STOP"})
            self.opted.add(norm)
            self.w["address_optouts"].write_row(("sms", norm, when, eid))
            self.counts["address_optouts"] += 1
        elif channel == "voice" and r < 0.2:
            eid = self._event("voice", "inbound", norm, key, when, {"Digits": "1"})
            if rng.random() < 0.8 and pathway == "appointment-reminder":
                self._request(entry, pid, "confirm", "voice", eid, key, None, when)
        if pathway == "survey" and r < 0.25:
            score = rng.choices(range(11), weights=(1, 1, 1, 1, 2, 3, 4, 8, 14, 20, 25))[0]
            eid = self._event("portal", "portal", "", key, when, {"action": "survey"})
            self._request(entry, pid, "survey", "portal", eid, key,
                          {"score": score, "comment": "the staff were kind"}, when)
        return key, status, sent_at

    def appointment(self, i: int) -> None:
        rng = self.rng
        pnum = i % PATIENTS
        pid = uuid.UUID(int=pnum + 1).hex
        entry = f"{i:030d}ap"
        # Rows arrive roughly in time order (booked days to weeks ahead), as they would.
        span = (HISTORY + AHEAD).days
        expected = self.target / 3.6
        index = int(i * span / expected) + rng.randrange(-10, 11)
        day = NOW - HISTORY + timedelta(days=min(max(index, 0), span - 1))
        start = day.replace(hour=13 + rng.randrange(0, 9), minute=rng.choice((0, 15, 30, 45)))
        if start > NOW:
            status = "booked"
        else:
            s = rng.random()
            status = ("fulfilled" if s < 0.78 else "noshow" if s < 0.85 else "cancelled"
                      if s < 0.95 else "arrived" if s < 0.97 else "checked-in")
        resource = {
            "resourceType": "Appointment", "id": f"a{i}", "status": status,
            "start": start.isoformat(), "end": (start + timedelta(minutes=30)).isoformat(),
            "serviceType": [{"text": "Check-up"}],
            "participant": [{"actor": {"reference": f"Patient/p{pnum}",
                                       "display": "Alex Doe"}, "status": "accepted"},
                            {"actor": {"reference": "Location/l1",
                                       "display": "Main Street Clinic"}, "status": "accepted"}],
        }
        self.w["timeline_entries"].write_row((
            entry, pid, "appointment", status, start, start + timedelta(minutes=30),
            f"Appointment {status}: Check-up", "Appointment", json.dumps(resource), "x",
            start - timedelta(days=30), start - timedelta(days=30), start))
        self.counts["appointments"] += 1
        first = rng.choices(("sms", "email", "voice"), weights=(70, 20, 10))[0]
        sent: list[tuple[str, datetime]] = []
        for step, (offset, channel) in enumerate(((timedelta(days=-3), first),
                                                  (timedelta(hours=-2), "sms"))):
            _key, _st, at = self.touch("appointment-reminder", step, entry, pid, pnum,
                                       start + offset, start, channel, status)
            if at is not None:
                sent.append((_key, at))
        if status in ("fulfilled", "arrived", "checked-in"):
            self.touch("visit-followup", 0, entry, pid, pnum, start + timedelta(hours=4),
                       start, first, status)
            self.touch("survey", 0, entry, pid, pnum, start + timedelta(hours=26), start,
                       "email", status)
        if sent and rng.random() < 0.03:
            at = sent[-1][1] + timedelta(hours=rng.randrange(1, 24))
            source = "portal" if rng.random() < 0.7 else "waitlist"
            b = rng.random()
            outcome = "booked" if b < 0.85 else "conflict" if b < 0.95 else "failed"
            self.w["bookings"].write_row((
                pid, entry, "ehr", f"Slot/{i}", start + timedelta(days=2), None, source,
                "transaction", outcome, f"Appointment/n{i}" if outcome == "booked" else None,
                None, at, at + timedelta(seconds=1)))
            self.counts["bookings"] += 1
        if status == "cancelled":
            self.counts["freed_slots"] += 1
            slot_id = self.counts["freed_slots"]
            freed = start - timedelta(days=rng.randrange(1, 5))
            f = rng.random()
            fill_hours = rng.expovariate(1 / 8)
            filled = freed + timedelta(hours=fill_hours) if f < 0.6 else None
            slot_status = "filled" if f < 0.6 else "expired" if f < 0.85 else "withdrawn"
            for n in range(3):
                self.counts["waitlist_offers"] += 1
                wid = self.counts["waitlist_offers"]
                offer = ("accepted" if filled is not None and n == 0 else
                         "taken" if filled is not None else rng.choice(("expired", "declined")))
                self.w["waitlist_offers"].write_row((
                    wid, slot_id, wid, uuid.UUID(int=(pnum + n + 7) % PATIENTS + 1).hex, "sms",
                    offer, freed + timedelta(minutes=5), freed + timedelta(hours=2),
                    filled))
                self.w["waitlist_entries"].write_row((
                    wid, uuid.UUID(int=(pnum + n + 7) % PATIENTS + 1).hex, None, "ehr",
                    "Check-up", "", None, start, "active", freed - timedelta(days=7),
                    freed))
                self.counts["waitlist_entries"] += 1
            self.w["freed_slots"].write_row((
                slot_id, f"slot|{entry}", "fhir", "ehr", f"Slot/{i}", "Check-up", "", start,
                start + timedelta(minutes=30), slot_status, freed, filled,
                slot_id * 3 - 2 if filled else None, filled or freed))


def populate(url: str, target: int) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    created = NOW - HISTORY - timedelta(days=60)
    with copies(url, {"patients": "id, created_at"}) as w:
        for n in range(PATIENTS):
            w["patients"].write_row((uuid.UUID(int=n + 1).hex, created))
    tables = {
        "timeline_entries": ENTRY_COLS,
        "touches": TOUCH_COLS,
        "channel_events": EVENT_COLS,
        "patient_requests": REQUEST_COLS,
        "address_optouts": "channel, address, at, event_id",
        "bookings": ("patient_id, old_entry_id, connection, slot_ref, start, \"end\", source, "
                     "method, status, new_appointment_ref, error, started_at, finished_at"),
        "freed_slots": ("id, key, source, connection, slot_ref, service, location, start, "
                        "\"end\", status, freed_at, filled_at, filled_by, updated_at"),
        "waitlist_offers": ("id, slot_id, waitlist_id, patient_id, channel, status, "
                            "offered_at, expires_at, responded_at"),
        "waitlist_entries": ("id, patient_id, entry_id, connection, service, location, "
                             "earliest, latest, status, created_at, updated_at"),
    }
    with copies(url, tables) as w:
        for n in range(PATIENTS):
            patient = {"resourceType": "Patient", "id": f"p{n}",
                       "name": [{"given": ["Alex"], "family": "Doe"}],
                       "telecom": [{"system": "phone", "value": phone(n), "use": "mobile"},
                                   {"system": "email", "value": f"pat{n}@example.org"}]}
            w["timeline_entries"].write_row((
                f"{n:030d}pa", uuid.UUID(int=n + 1).hex, "patient", "active", created, None,
                "Patient record active", "Patient", json.dumps(patient), "x", created,
                created, created))
        loader = Loader(w, target)
        i = 0
        while loader.counts["touches"] < target:
            loader.appointment(i)
            i += 1
        counts = dict(loader.counts)
    engine = create_db_engine(url)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("channel_events", "freed_slots", "waitlist_offers", "waitlist_entries"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                              f"(SELECT max(id) FROM {table}))"))
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started, counts


# ------------------------------------------------------------------------------ measuring


def _median_s(fn: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _report(engine: Engine, since: datetime, until: datetime) -> outcomes.OutcomeReport:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            return outcomes.outcome_report(conn, since=since, until=until, pathways=PATHWAYS)


SECTIONS: dict[str, Callable[..., Any]] = {
    "touch counts and reasons": lambda c, s, u: outcomes._touch_counts(c, {}, s, u),
    "replies, requests, survey answers": lambda c, s, u: outcomes._answers(c, {}, s, u),
    "rebookings": lambda c, s, u: outcomes._rebookings(c, {}, s, u),
    "opt-outs": lambda c, s, u: outcomes._opt_outs(c, {}, s, u),
    "appointments": lambda c, s, u: outcomes._appointments(
        c, s, u, ("appointment-reminder",)),
    "waitlist": outcomes._waitlist,
    "bookings": outcomes._bookings,
}


def measure(engine: Engine, since: datetime, until: datetime, runs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = _report(engine, since, until)
    first = time.perf_counter() - t0
    median, times = _median_s(lambda: _report(engine, since, until), runs)
    sections = {}
    with engine.connect() as conn, conn.begin():
        # What outcome_report sets for its own transaction, for the sections and the peers.
        conn.exec_driver_sql("SET LOCAL work_mem = '32MB'")
        conn.exec_driver_sql("SET LOCAL jit = off")
        for name, fn in SECTIONS.items():
            sections[name] = round(_median_s(lambda fn=fn: fn(conn, since, until), 3)[0], 4)
        count_s, _ = _median_s(lambda: conn.execute(text(
            "SELECT count(*) FROM touches")).scalar(), runs)
        group_s, _ = _median_s(lambda: conn.execute(text(
            "SELECT pathway, step, status, count(*) FROM touches "
            "WHERE (sent_at >= :s AND sent_at < :u) "
            "OR (sent_at IS NULL AND updated_at >= :s AND updated_at < :u) "
            "GROUP BY pathway, step, status"), {"s": since, "u": until}).all(), runs)
    totals = report.totals
    return {
        "report_first_s": round(first, 4),
        "report_median_s": round(median, 4),
        "report_runs_s": [round(t, 4) for t in times],
        "sections_median_s": sections,
        "peer_count_s": round(count_s, 4),
        "peer_group_by_s": round(group_s, 4),
        "figures": {"touches": totals.touches, "sent": totals.sent,
                    "replies": totals.replies, "confirmations": totals.confirmations,
                    "opt_outs": totals.opt_outs, "survey_answers": totals.survey.answers,
                    "reminded_total": report.appointments.reminded.total,
                    "not_reminded_total": report.appointments.not_reminded.total,
                    "slots_freed": report.waitlist.slots_freed,
                    "offers": report.waitlist.offers},
    }


def explain(engine: Engine, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each statement one report runs."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        _report(engine, since, until)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    with engine.connect() as conn:
        for statement, parameters in captured:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement,
                                        parameters).all()
            plans.append({"statement": statement, "plan": [r[0] for r in rows]})
    return plans


def _ddl(engine: Engine, *statements: str) -> None:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        for statement in statements:
            conn.execute(text(statement))


def _sections(engine: Engine, since: datetime, until: datetime) -> dict[str, float]:
    out = {}
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET LOCAL work_mem = '32MB'")
        conn.exec_driver_sql("SET LOCAL jit = off")
        for name, fn in SECTIONS.items():
            out[name] = round(_median_s(lambda fn=fn: fn(conn, since, until), 5)[0], 4)
    return out


def try_indexes(engine: Engine, since: datetime, until: datetime, runs: int,
                base: dict[str, float]) -> dict[str, Any]:
    """Each candidate index alone (the sections it changes by more than 10 ms), then all of
    them together (the whole report)."""
    alone = {}
    print("\neach candidate index alone: the sections it changes by more than 10 ms")
    for name, ddl in CANDIDATE_INDEXES.items():
        _ddl(engine, ddl, "ANALYZE")
        got = _sections(engine, since, until)
        _ddl(engine, f"DROP INDEX {name}")
        changed = {k: {"ms": round(v * 1000, 1), "delta_ms": round((v - base[k]) * 1000, 1)}
                   for k, v in got.items() if abs(v - base[k]) > 0.010}
        alone[name] = {"ddl": ddl, "sections_changed": changed}
        print(f"  {name:38} " + (", ".join(
            f"{k} {c['ms']:.0f} ms ({c['delta_ms']:+.0f})" for k, c in changed.items())
            or "no section changed"))
    _ddl(engine, *CANDIDATE_INDEXES.values(), "ANALYZE")
    together = measure(engine, since, until, runs)
    _print("with every candidate index", together)
    return {"alone": alone, "together": together}


def _print(label: str, m: dict[str, Any]) -> None:
    print(f"\n{label}")
    print(f"  {'outcome report (first run)':40} {m['report_first_s'] * 1000:>9.1f} ms")
    print(f"  {'outcome report (median)':40} {m['report_median_s'] * 1000:>9.1f} ms"
          f"   target < {TARGET_S * 1000:.0f} ms "
          f"{'PASS' if m['report_median_s'] < TARGET_S else 'FAIL'}")
    for name, s in m["sections_median_s"].items():
        print(f"    {name:38} {s * 1000:>9.1f} ms")
    print(f"  {'peer: SELECT count(*) FROM touches':40} {m['peer_count_s'] * 1000:>9.1f} ms")
    print(f"  {'peer: one GROUP BY over the period':40} {m['peer_group_by_s'] * 1000:>9.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--touches", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--explain", action="store_true",
                        help="print EXPLAIN (ANALYZE, BUFFERS) of the report's statements")
    parser.add_argument("--try-indexes", action="store_true",
                        help="time again with the candidate indexes created")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    parser.add_argument("--reuse", action="store_true",
                        help="use the database left by --keep instead of loading again")
    args = parser.parse_args()
    if args.reuse:
        from sqlalchemy.engine import make_url
        url = make_url(SERVER).set(database=DB).render_as_string(hide_password=False)
        load_s, counts = 0.0, {}
    else:
        url = pgdb.create_database(SERVER, DB)
    until = NOW
    since = NOW - timedelta(days=PERIOD_DAYS)
    out: dict[str, Any] = {
        "generated_by": "bench/bench_outcomes.py",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "period": {"since": since.isoformat(), "until": until.isoformat()},
        "target_s": TARGET_S,
    }
    try:
        if not args.reuse:
            load_s, counts = populate(url, args.touches)
            print(f"loaded in {load_s:.1f} s: " + ", ".join(
                f"{v:,} {k}" for k, v in counts.items()))
        engine = create_db_engine(url)
        with engine.connect() as conn:
            sizes = {r[0]: r[1] for r in conn.execute(text(
                "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
                "WHERE relname IN ('touches', 'channel_events', 'patient_requests', "
                "'timeline_entries')"))}
            server = conn.execute(text("SHOW server_version")).scalar()
        out.update({"load_seconds": round(load_s, 1), "rows": counts, "sizes": sizes,
                    "postgresql": server})
        base = measure(engine, since, until, args.runs)
        _print(f"last {PERIOD_DAYS} days, migrations' indexes only", base)
        out["report"] = base
        out["whole_history"] = measure(engine, NOW - HISTORY, NOW + AHEAD, 3)
        _print("the whole history (a year and two weeks)", out["whole_history"])
        if args.explain:
            plans = explain(engine, since, until)
            out["explain"] = plans
            for p in plans:
                print("\n" + p["statement"].strip()[:200].replace("\n", " ") + " ...")
                print("\n".join("    " + line for line in p["plan"]))
        if args.try_indexes:
            out["candidate_indexes"] = try_indexes(engine, since, until, args.runs,
                                                   base["sections_median_s"])
            if args.explain:
                out["explain_with_candidate_indexes"] = explain(engine, since, until)
        engine.dispose()
    finally:
        if not args.keep:
            pgdb.drop_database(SERVER, DB)
    path = ROOT / "bench" / "results" / "outcomes.json"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
