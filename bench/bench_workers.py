"""The Celery pipeline's throughput with 1, 2 and 4 intake workers, and the per-stage costs the
capacity model (docs/scaling.md) is built from, on PostgreSQL and a private Redis.

    python bench/bench_workers.py [--messages 4000] [--workers 1,2,4] [--task-batch 10]

Everything runs on this machine, on free ports, in a scratch database (created, migrated with
``careloop db upgrade``, dropped at the end) and a ``redis-server`` of its own:

1. **Workers.** The same ``--messages`` messages (the scale test's mix, ``tests/scale/
   workload.py``: ADT A04/A08, SIU S12-S15, ORU R01, VXU V04) are stored in the inbox; then N
   ``careloop worker -Q intake --concurrency 1`` processes are started and one
   ``careloop.process`` task per ``--task-batch`` ids is enqueued, as ``careloop serve`` does
   after its group commits (it sends whatever ids one or a few commits stored: 1 to 10 each
   under load). Timed from the first task sent to the last row ``processed``: messages
   processed per second, and the ratio to one worker. Concurrency 1 per process: one process
   per core is Celery's prefork default, and N processes of one child each is the same layout
   as N pods of one worker each.
2. **Batch size.** One worker with tasks of 1, 10 and 100 ids: the per-message cost falls with
   the batch (one transaction, one claim, one timeline pass per task).
3. **Per type.** One worker, tasks of ``--task-batch`` ids, ADT only, SIU only, ORU only and
   VXU only.
4. **Intake.** One ``careloop serve`` with the broker set (it stores, ACKs and enqueues; no
   in-process worker), 16 MLLP connections (``bench/mllp_load.py``) for ``--intake-seconds``.

For each run: the CPU the careloop processes used (their process groups, from /proc) and the
CPU of the PostgreSQL backends serving them (found by database name in their command line),
per message; the rows written (``pg_stat_database`` inserts + updates + deletes, read after the
workers exit so that every backend has flushed its counters) and the WAL written
(``pg_current_wal_lsn()`` before and after; cluster-wide, so other databases' writes on a
shared server inflate it: ``other_commits`` says how many committed meanwhile).

Peers, measured in the same run so that a noisy machine's figures stay comparable:

* ``insert-peer``: one connection inserting what the processing stage inserts for the same
  messages (their FHIR resources as JSON rows), one transaction per task batch, no parsing;
* ``python-hl7``: ``hl7.parse`` of the same messages, one core, no storage.

Figures reused from other benchmarks (not measured here) are copied into the JSON with their
source: outreach planning and sending (bench/results/outreach.json), write-back of
Communications (bench/results/closed_loop.json).

Prints a table; writes ``bench/results/workers.json``. Exit status 0, or 2 when a run could not
be completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, create_engine, insert, text  # noqa: E402

from bench.mllp_load import run_load  # noqa: E402
from integration.db import create_db_engine  # noqa: E402
from integration.intake import assess  # noqa: E402
from integration.models import inbox, metadata  # noqa: E402
from integration.outreach.stage import OutreachStage, file_channels  # noqa: E402
from integration.outreach.state import OutreachConfig  # noqa: E402
from integration.settings import load_settings  # noqa: E402
from integration.tasks import make_celery  # noqa: E402
from mappings import MappingContext, MappingError, convert  # noqa: E402
from tests.scale.cluster import (  # noqa: E402
    Cluster,
    ScratchDatabase,
    free_ports,
)
from tests.scale.workload import (  # noqa: E402
    NEAR_SPREAD_S,
    Message,
    build_workload,
    config_toml,
)

SERVER = os.environ.get(
    "CARELOOP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RESULTS = ROOT / "bench" / "results" / "workers.json"
OBSERVER = "careloop-bench-observer"
TICKS = os.sysconf("SC_CLK_TCK")
FAMILIES = {"ADT": "ADT^", "SIU": "SIU^", "ORU": "ORU^", "VXU": "VXU^"}


# -- measuring -----------------------------------------------------------------------------------

def _ticks(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    return 0


def _group_ticks(pgids: Sequence[int]) -> int:
    """CPU ticks of every live process in the given process groups (ours)."""
    total = 0
    wanted = set(pgids)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry)) in wanted:
                    total += _ticks(int(entry))
    return total


def _backend_ticks(database: str, exclude: set[int]) -> int:
    """CPU ticks of the PostgreSQL backends connected to ``database`` (by command line), but
    the bench's own (``exclude``)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if cmdline.startswith(b"postgres: ") and f" {database} ".encode() in cmdline:
                total += _ticks(int(entry))
    return total


class DbStats:
    """Counters of one database and the cluster's WAL position, for deltas."""

    def __init__(self, engine: Engine, database: str) -> None:
        self.engine = engine
        self.database = database

    def read(self) -> dict[str, float]:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = conn.execute(text(
                "SELECT tup_inserted, tup_updated, tup_deleted, xact_commit, "
                "pg_current_wal_lsn() - '0/0'::pg_lsn AS wal, "
                "(SELECT wal_fpi FROM pg_stat_wal) AS fpi, "
                "(SELECT sum(xact_commit) FROM pg_stat_database WHERE datname <> :db) AS others "
                "FROM pg_stat_database WHERE datname = :db"), {"db": self.database}).one()
        return {"rows": float(row.tup_inserted + row.tup_updated + row.tup_deleted),
                "inserted": float(row.tup_inserted), "commits": float(row.xact_commit),
                "wal": float(row.wal), "fpi": float(row.fpi or 0),
                "others": float(row.others or 0)}

    def own_pids(self) -> set[int]:
        with self.engine.connect() as conn:
            return {int(pid) for pid in conn.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": OBSERVER}).scalars()}


def _per_message(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, Any]:
    others = int(after["others"] - before["others"])
    return {
        "rows_per_msg": round((after["rows"] - before["rows"]) / n, 1),
        "inserted_per_msg": round((after["inserted"] - before["inserted"]) / n, 1),
        "commits_per_msg": round((after["commits"] - before["commits"]) / n, 3),
        "wal_bytes_per_msg": round((after["wal"] - before["wal"]) / n),
        "wal_full_page_images_per_msg": round((after["fpi"] - before["fpi"]) / n, 2),
        # Commits in other databases meanwhile (their WAL is in ours); None when a database
        # was dropped meanwhile and the sum went down.
        "other_commits": others if others >= 0 else None,
    }


# -- the bench -----------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, database: ScratchDatabase, redis_port: int) -> None:
        self.work = work
        self.database = database
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}
        self.env.update(CARELOOP_DATABASE_URL=database.url, CARELOOP_BROKER_URL=self.redis_url,
                        CARELOOP_AUTH="disabled", CARELOOP_LOG_LEVEL="info",
                        CARELOOP_LOG_FORMAT="json", CARELOOP_STALE_AFTER_S="3600",
                        CARELOOP_SWEEP_INTERVAL_S="3600")
        self.cluster = Cluster(work, self.env)
        self.engine = create_engine(database.url, pool_size=1,
                                    connect_args={"application_name": OBSERVER})
        self.stats = DbStats(self.engine, database.name)
        self.settings = load_settings(database_url=database.url, broker_url=self.redis_url)
        self.celery = make_celery(self.settings)

    def reset(self) -> None:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        with self.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))

    def store(self, messages: Sequence[Message]) -> list[int]:
        """The rows intake would have stored, not due for the sweep."""
        now = datetime.now(UTC)
        rows = [assess(m.raw, "mllp", "bench").row(now, timedelta(hours=1)) for m in messages]
        with self.engine.begin() as conn:
            ids = sorted(int(i) for i in conn.execute(insert(inbox).returning(inbox.c.id), rows)
                         .scalars())
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        return ids

    def processed(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM inbox WHERE status <> 'received'")).scalar_one())

    def _wait_processed(self, total: int, label: str, stall_s: float = 60.0) -> None:
        """Until ``total`` rows are done; RuntimeError when none was done for ``stall_s``
        (a task that failed leaves its rows to the sweep, which this bench does not run)."""
        last, last_change = -1, time.monotonic()
        while (done := self.processed()) < total:
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                raise RuntimeError(f"{label}: {done} of {total} rows processed, none for "
                                   f"{stall_s:g} s (see the worker logs below)")
            time.sleep(0.1)

    def run_workers(self, messages: Sequence[Message], workers: int, batch: int,
                    label: str) -> dict[str, Any]:
        self.reset()
        ids = self.store(messages)
        procs = [self.cluster.worker(f"{label}-w{i}", "intake").start() for i in range(workers)]
        try:
            pgids = [p.proc.pid for p in procs if p.proc is not None]
            ours = self.stats.own_pids()
            cpu0, db0 = _group_ticks(pgids), _backend_ticks(self.database.name, ours)
            stats0 = self.stats.read()
            started = time.perf_counter()
            for i in range(0, len(ids), batch):
                self.celery.send_task("careloop.process", args=[ids[i:i + batch]],
                                      queue="intake")
            self._wait_processed(len(ids), label)
            seconds = time.perf_counter() - started
            cpu = _group_ticks(pgids) - cpu0
            db_cpu = _backend_ticks(self.database.name, ours | self.stats.own_pids()) - db0
        finally:
            for p in procs:
                p.stop()
        time.sleep(1.0)  # exited backends have flushed their counters
        stats1 = self.stats.read()
        with self.engine.connect() as conn:
            statuses: dict[str, int] = dict(conn.execute(text(
                "SELECT status, count(*) FROM inbox GROUP BY status")).all())
        n = len(ids)
        return {
            "label": label, "workers": workers, "task_batch": batch, "messages": n,
            "seconds": round(seconds, 2), "msg_per_s": round(n / seconds, 1),
            "worker_cpu_ms_per_msg": round(cpu / TICKS * 1000 / n, 2),
            "db_cpu_ms_per_msg": round(db_cpu / TICKS * 1000 / n, 2),
            "statuses": statuses, **_per_message(stats0, stats1, n),
        }

    def run_outreach(self, config: dict[str, Any], *, plan_at: datetime, send_at: datetime
                     ) -> dict[str, Any]:
        """On what the last run left (processed rows whose timeline changes nobody planned
        yet): the reconciler over every change at ``plan_at`` (the pathway of
        ``tests/scale/workload.py``: two reminders per booked appointment), then the due sweep
        at ``send_at`` through the file channel. In this process, one transaction per
        ``outreach.batch`` (500) changes, as a worker does."""
        settings = load_settings(**config, database_url=self.database.url, broker_url=None)
        engine = create_db_engine(self.database.url, pool_size=2)
        outbox = Path(tempfile.mkdtemp(prefix="outbox-", dir=self.work))
        stage = OutreachStage(engine, OutreachConfig.from_settings(settings),
                              channels=file_channels(outbox))
        try:
            ours = self.stats.own_pids()
            stats0, cpu0 = self.stats.read(), time.process_time()
            started = time.perf_counter()
            planned = stage.reconcile(now=plan_at)
            plan_s = time.perf_counter() - started
            plan_cpu = time.process_time() - cpu0
            db_plan = _backend_ticks(self.database.name, ours)
            stats1, cpu1 = self.stats.read(), time.process_time()
            started = time.perf_counter()
            sent = 0
            while (sweep := stage.send_due(now=send_at)).claimed:
                sent += sweep.sent
            send_s = time.perf_counter() - started
            send_cpu = time.process_time() - cpu1
            db_send = _backend_ticks(self.database.name, ours) - db_plan
        finally:
            engine.dispose()
        time.sleep(1.0)
        stats2 = self.stats.read()
        return {
            "label": "outreach",
            "changes": planned.changes, "entries": planned.entries,
            "scheduled": planned.scheduled, "skipped": planned.skipped,
            "plan_seconds": round(plan_s, 2),
            "plan_changes_per_s": round(planned.changes / plan_s, 1),
            "plan_cpu_ms_per_change": round(plan_cpu * 1000 / max(1, planned.changes), 3),
            "plan_db_cpu_ms_per_change": round(db_plan / TICKS * 1000 / max(1, planned.changes),
                                               3),
            "plan": _per_message(stats0, stats1, max(1, planned.changes)),
            "sent": sent, "send_seconds": round(send_s, 2),
            "sent_per_s": round(sent / send_s, 1) if send_s else None,
            "send_cpu_ms_per_touch": round(send_cpu * 1000 / max(1, sent), 3),
            "send_db_cpu_ms_per_touch": round(db_send / TICKS * 1000 / max(1, sent), 3),
            "send": _per_message(stats1, stats2, max(1, sent)),
        }

    def sizes(self, per: int) -> dict[str, float]:
        """Bytes on disk (table, TOAST and indexes; after VACUUM) per ``per`` messages."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            rows = conn.execute(text(
                "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC")).all()
        out = {r.relname: round(r.bytes / per) for r in rows if r.bytes > 65536}
        out["total"] = round(sum(r.bytes for r in rows) / per)
        return out

    def run_intake(self, seconds: float, conns: int) -> dict[str, Any]:
        self.reset()
        http, mllp = free_ports(2)
        serve = self.cluster.serve("intake-serve", http, mllp).start()
        try:
            assert serve.proc is not None
            ours = self.stats.own_pids()
            cpu0, db0 = _group_ticks([serve.proc.pid]), _backend_ticks(self.database.name, ours)
            stats0 = self.stats.read()
            load = run_load("127.0.0.1", mllp, conns=conns, seconds=seconds, warmup=1.0)
            cpu = _group_ticks([serve.proc.pid]) - cpu0
            db_cpu = _backend_ticks(self.database.name, ours | self.stats.own_pids()) - db0
        finally:
            serve.stop()
        time.sleep(1.0)
        stats1 = self.stats.read()
        n = int(load["acked"])
        return {
            "label": "intake", "conns": conns, "msg_per_s": load["msg_per_s"],
            "ack_p50_ms": load["latency_ms"]["p50"], "ack_p99_ms": load["latency_ms"]["p99"],
            "acked": n, "errors": load["errors"],
            "serve_cpu_ms_per_msg": round(cpu / TICKS * 1000 / n, 3),
            "db_cpu_ms_per_msg": round(db_cpu / TICKS * 1000 / n, 3),
            **_per_message(stats0, stats1, n),
        }

    def insert_peer(self, messages: Sequence[Message], batch: int) -> dict[str, Any]:
        """The processing stage's inserts without careloop: the same resources as JSON rows."""
        resources: list[list[str]] = []
        context = MappingContext(validate=False)  # the conversion is not what is measured
        for m in messages:
            with contextlib.suppress(MappingError):
                out = convert(m.raw, context=context)
                resources.append([json.dumps(r) for r in out.resources])
        with self.engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS bench_peer (id bigserial PRIMARY KEY, "
                              "message int NOT NULL, resource jsonb NOT NULL)"))
            conn.execute(text("TRUNCATE bench_peer"))
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            started = time.perf_counter()
            for i in range(0, len(resources), batch):
                rows = [(i + j, r) for j, msg in enumerate(resources[i:i + batch]) for r in msg]
                cur.executemany("INSERT INTO bench_peer (message, resource) VALUES (%s, %s)",
                                rows)
                raw.commit()
            seconds = time.perf_counter() - started
        finally:
            raw.close()
        return {"label": "insert-peer", "task_batch": batch, "messages": len(resources),
                "rows": sum(len(r) for r in resources), "seconds": round(seconds, 2),
                "msg_per_s": round(len(resources) / seconds, 1)}

    def close(self) -> None:
        self.engine.dispose()
        self.cluster.close()


def python_hl7_peer(messages: Sequence[Message]) -> dict[str, Any]:
    import hl7

    texts = [m.raw.decode() for m in messages]
    started = time.perf_counter()
    for t in texts:
        hl7.parse(t)
    seconds = time.perf_counter() - started
    return {"label": "python-hl7", "messages": len(texts), "seconds": round(seconds, 3),
            "msg_per_s": round(len(texts) / seconds, 1)}


def _reused() -> dict[str, Any]:
    out: dict[str, Any] = {}
    results = ROOT / "bench" / "results"
    with contextlib.suppress(OSError, KeyError, ValueError):
        outreach = json.loads((results / "outreach.json").read_text())
        out["outreach"] = {
            "source": "bench/results/outreach.json (bench/bench_outreach.py)",
            "plan_entries_per_s": outreach["reconcile"]["entries_per_s"],
            "plan_changes_per_s": outreach["reconcile"]["changes_per_s"],
            "send_touches_per_s": outreach["sweep"]["sent_per_s"],
        }
    with contextlib.suppress(OSError, KeyError, ValueError):
        loop = json.loads((results / "closed_loop.json").read_text())
        out["writeback"] = {
            "source": "bench/results/closed_loop.json (bench/bench_closed_loop.py)",
            "touches_sent_and_written_per_s": loop["touches_per_s"],
            "peer_ehr_conditional_creates_per_s": loop["peer_ehr"]["one_by_one_per_s"],
            "note": "bounded by the stand-in EHR's conditional create, on the same two cores",
        }
    with contextlib.suppress(OSError, KeyError, ValueError, StopIteration):
        intake = json.loads((results / "intake.json").read_text())
        row = next(r for r in intake["results"]
                   if r.get("server") == "careloop-postgresql-intake" and r["conns"] == 16)
        out["intake_bench"] = {"source": "bench/results/intake.json (bench/bench_intake.py)",
                               "careloop_postgresql_intake_16_conns_msg_per_s": row["msg_per_s"]}
    return out


def _machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}",
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def _table(rows: list[dict[str, Any]], base: float) -> str:
    lines = [f"{'run':<22}{'workers':>8}{'batch':>7}{'msg/s':>9}{'vs 1':>7}{'cpu ms':>8}"
             f"{'db ms':>7}{'rows':>6}{'WAL B':>8}"]
    for r in rows:
        lines.append(
            f"{r['label']:<22}{r.get('workers', ''):>8}{r.get('task_batch', ''):>7}"
            f"{r['msg_per_s']:>9,.0f}{r['msg_per_s'] / base:>7.2f}"
            f"{r.get('worker_cpu_ms_per_msg', r.get('serve_cpu_ms_per_msg', '')):>8}"
            f"{r.get('db_cpu_ms_per_msg', ''):>7}{r.get('rows_per_msg', ''):>6}"
            f"{r.get('wal_bytes_per_msg', ''):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--task-batch", type=int, default=10)
    parser.add_argument("--per-type", type=int, default=1500, help="messages per family")
    parser.add_argument("--intake-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    # A SIGTERM (a CI timeout) must still stop the processes and drop the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        print("bench_workers: redis-server is not installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="careloop-bench-workers-"))
    started_at = datetime.now(UTC)
    machine = _machine()
    now = datetime.now(UTC).replace(microsecond=0)
    due = now + timedelta(hours=1)  # the near reminders' time, for the outreach run's clock
    mix = build_workload(args.messages, now=now, due=due, near_patients=args.messages // 10,
                         seed=4000)
    pool = build_workload(args.per_type * 12, now=now, due=due, near_patients=0, seed=4001)
    database = ScratchDatabase(SERVER, "careloop_bench_workers")
    bench: Bench | None = None
    runs: list[dict[str, Any]] = []
    try:
        database.create().upgrade(
            {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}, work)
        redis_port = free_ports(1)[0]
        bench = Bench(work, database, redis_port)
        bench.cluster.redis(redis_port).start()
        for n in counts:
            runs.append(bench.run_workers(mix, n, args.task_batch, f"workers-{n}"))
            print(f"  {runs[-1]['label']}: {runs[-1]['msg_per_s']} msg/s", flush=True)
        batches = [run for run in runs if run["workers"] == 1]
        for size in (1, 100):
            batches.append(bench.run_workers(mix[:max(1000, args.messages // 4)] if size == 1
                                             else mix, 1, size, f"batch-{size}"))
            print(f"  {batches[-1]['label']}: {batches[-1]['msg_per_s']} msg/s", flush=True)
        # One worker again, last: how far the machine drifted during the run.
        again = bench.run_workers(mix, 1, args.task_batch, "workers-1-again")
        print(f"  {again['label']}: {again['msg_per_s']} msg/s", flush=True)
        outreach = bench.run_outreach(tomllib.loads(config_toml(work / "outbox")), plan_at=now,
                                      send_at=due + timedelta(seconds=NEAR_SPREAD_S + 30))
        print(f"  outreach: plan {outreach['plan_changes_per_s']} changes/s, "
              f"send {outreach['sent_per_s']} touches/s", flush=True)
        storage = bench.sizes(len(mix))
        families = []
        for family, prefix in FAMILIES.items():
            chosen = [m for m in pool if m.kind.startswith(prefix)][:args.per_type]
            families.append(bench.run_workers(chosen, 1, args.task_batch, f"type-{family}"))
            print(f"  {families[-1]['label']}: {families[-1]['msg_per_s']} msg/s", flush=True)
        intake = bench.run_intake(args.intake_seconds, 16)
        print(f"  intake: {intake['msg_per_s']} msg/s", flush=True)
        peer = bench.insert_peer(mix, args.task_batch)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench_workers: {exc}", file=sys.stderr)
        if bench is not None:
            print(bench.cluster.tails(20), file=sys.stderr)
        return 2
    finally:
        if bench is not None:
            bench.close()
        database.drop()
        shutil.rmtree(work, ignore_errors=True)
    hl7_peer = python_hl7_peer(mix)

    base = runs[0]["msg_per_s"]
    for r in runs:
        r["ratio_vs_1_worker"] = round(r["msg_per_s"] / base, 2)
        r["ratio_vs_insert_peer"] = round(r["msg_per_s"] / peer["msg_per_s"], 3)
        r["ratio_vs_python_hl7"] = round(r["msg_per_s"] / hl7_peer["msg_per_s"], 3)
    report = {
        "benchmark": "careloop Celery pipeline: intake workers and per-stage costs",
        "command": " ".join(["bench/bench_workers.py", *(argv if argv is not None
                                                           else sys.argv[1:])]),
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"messages": args.messages, "task_batch": args.task_batch,
                     "per_type": args.per_type, "worker_concurrency": 1,
                     "log": "info, json (as in production)"},
        "mix": {k: sum(1 for m in mix if m.kind == k) for k in sorted({m.kind for m in mix})},
        "workers": runs,
        "workers_1_again": again,
        "batch_size": batches,
        "outreach": outreach,
        "storage_bytes_per_msg": storage,
        "per_type": families,
        "intake": intake,
        "peers": {"insert": peer, "python_hl7": hl7_peer},
        "reused": _reused(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(_table([*runs, *batches[1:], again, *families, intake], base))
    print(f"\noutreach ({outreach['changes']} timeline changes, {outreach['sent']} reminders "
          f"due): plan {outreach['plan_changes_per_s']:,.0f} changes/s "
          f"({outreach['plan_cpu_ms_per_change']} ms cpu + "
          f"{outreach['plan_db_cpu_ms_per_change']} ms db each), send "
          f"{outreach['sent_per_s']} touches/s ({outreach['send_cpu_ms_per_touch']} ms cpu + "
          f"{outreach['send_db_cpu_ms_per_touch']} ms db each)")
    print(f"\npeers: insert-only {peer['msg_per_s']:,.0f} msg/s "
          f"(careloop 1 worker = {runs[0]['ratio_vs_insert_peer']:.3f}x), python-hl7 parse "
          f"{hl7_peer['msg_per_s']:,.0f} msg/s (careloop 1 worker = "
          f"{runs[0]['ratio_vs_python_hl7']:.3f}x)")
    print(f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
