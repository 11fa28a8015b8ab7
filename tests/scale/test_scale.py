"""Scale-out, proven on one machine: two API replicas, three Celery workers, one beat, a Redis
and PostgreSQL, fed 20,000 HL7 v2 messages while processes are killed and the broker restarts.

What runs (all real processes, on free ports, in a scratch database migrated with
``careloop db upgrade`` and a private ``redis-server``):

* ``careloop serve`` × 2 (``serve-a``, ``serve-b``): intake over MLLP and HTTP; with a broker
  they store, ACK and enqueue, and process nothing themselves;
* ``careloop worker`` × 3: ``-Q intake``, ``-Q intake,timeline`` (``timeline`` is the intake
  queue) and ``-Q outreach,writeback,fhir``, concurrency 1 each;
* ``careloop beat``: the sweep (lost tasks), the outreach ticks;
* a configuration with an appointment-reminder pathway (``-P7D`` and ``-P1D``) on the file
  channel.

The input (:mod:`tests.scale.workload`): ``CARELOOP_SCALE_MESSAGES`` (default 20,000) distinct
messages: ADT^A04/A08, SIU^S12/S13/S14/S15, ORU^R01, VXU^V04, a few thousand patients. Phase 1
(about 2%, the "near" patients whose reminders fall due ``CARELOOP_SCALE_DUE_S`` seconds after
the start) is sent and settled first; then the bulk, by 16 senders (12 MLLP, 4 HTTP) over both
replicas, with 5% redeliveries of the same message to the other replica. During the bulk:

* an intake worker is SIGKILLed (and restarted);
* the outreach worker is SIGKILLed while it sends the near reminders (the first moment a
  touch is ``sending``), and restarted: those touches are resolved by asking the channel;
* replica ``serve-a`` is SIGKILLed: its senders resend their un-ACKed messages to ``serve-b``
  (it is restarted a few seconds later and they come back);
* Redis is stopped (losing every queued task: it keeps nothing on disk) and started again.

Then, once everything is processed and every due reminder sent, the test asserts:

1. every message was acknowledged AA, is stored exactly once (one inbox row per sender and
   MSH-10) and ``processed``, and no worker logged its processing twice;
2. each message's mapped resources, the patients, the timeline entries (kind, keys, status,
   times, resource, ordinal, sources) and the touches (key, outcome, due time, channel, address)
   are identical to a reference run of the same messages through one process, in order,
   without redeliveries or kills, into a fresh database (:mod:`tests.scale.reference`); a
   touch's outcome is sent, scheduled or not sent (``cancelled`` and ``skipped`` both mean not
   sent, and which of the two a run records depends on timing, see
   :func:`tests.scale.canonical.touch_outcome`);
3. no timeline change was written twice for one entry (one ``created`` per entry);
4. no touch was sent twice: one file per key in the file channel's folders, and the keys of
   the files are exactly the keys of the touches marked ``sent``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from integration.db import create_db_engine
from tests.conftest import REQUIRE
from tests.scale.canonical import Snapshot, diff, snapshot
from tests.scale.cluster import REDIS_SERVER, Cluster, Proc, ScratchDatabase, free_ports
from tests.scale.reference import run_reference
from tests.scale.senders import Ledger, Load
from tests.scale.workload import (
    NEAR_SPREAD_S,
    SENDERS,
    Message,
    build_workload,
    config_toml,
)

pytestmark = [pytest.mark.scale, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

MESSAGES = int(os.environ.get("CARELOOP_SCALE_MESSAGES", "20000"))
DUE_S = float(os.environ.get("CARELOOP_SCALE_DUE_S", "60"))
"""Seconds from the start of phase 1 to the moment the near reminders fall due."""
TIMEOUT_S = float(os.environ.get("CARELOOP_SCALE_TIMEOUT_S", "900"))
"""How long the run may take to become quiet after the last message was acknowledged."""
SEED = int(os.environ.get("CARELOOP_SCALE_SEED", "20000"))



@dataclass
class Timeline:
    """What happened when, relative to the start of phase 1, for the report."""

    start: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)

    def note(self, what: str) -> None:
        at = time.monotonic() - self.start
        self.events.append((at, what))
        print(f"[scale {at:7.1f}s] {what}", flush=True)


# -- database views ------------------------------------------------------------------------------

def _scalar(engine: Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def _progress(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        inbox: dict[str, int] = dict(conn.execute(text(
            "SELECT status, count(*) FROM inbox GROUP BY status")).all())
        touches: dict[str, int] = dict(conn.execute(text(
            "SELECT status, count(*) FROM touches GROUP BY status")).all())
        overdue = conn.execute(text(
            "SELECT count(*) FROM touches WHERE status IN ('scheduled', 'sending') "
            "AND due_at <= now()")).scalar()
        changes = conn.execute(text("SELECT coalesce(max(id), 0) FROM timeline_changes")).scalar()
        cursor = conn.execute(text(
            "SELECT coalesce(max(last_id), 0) FROM outreach_cursors WHERE name = 'outreach'"
        )).scalar()
    return {"inbox": inbox, "touches": touches, "overdue_touches": overdue,
            "changes": changes, "cursor": cursor}


def _wait(what: str, check: Callable[[], tuple[bool, str]], timeout: float, log: Timeline,
          every: float = 15.0) -> None:
    """Poll ``check`` (done, status line) until done, printing the status now and then; on
    timeout fail with the last status (the test prints every process's log tail)."""
    deadline = time.monotonic() + timeout
    last_print = time.monotonic()
    status = ""
    while time.monotonic() < deadline:
        done, status = check()
        if done:
            return
        if time.monotonic() - last_print >= every:
            log.note(f"waiting for {what}: {status}")
            last_print = time.monotonic()
        time.sleep(0.5)
    pytest.fail(f"{what}: not reached within {timeout:g} s; last status: {status}",
                pytrace=False)


# -- chaos ---------------------------------------------------------------------------------------

async def _restart(proc: Proc, down_s: float, log: Timeline, how: str) -> None:
    if how == "kill":
        await asyncio.to_thread(proc.kill)
        log.note(f"SIGKILL {proc.name}")
    else:
        await asyncio.to_thread(proc.stop)
        log.note(f"stopped {proc.name}")
    await asyncio.sleep(down_s)
    await asyncio.to_thread(proc.start)
    log.note(f"{proc.name} running again")


@dataclass
class _Event:
    """One process to disrupt, and when."""

    process: str
    how: str  # "kill" (SIGKILL) or "stop" (SIGTERM)
    down_s: float
    due: Callable[[], bool]


async def _chaos(ledger: Ledger, bulk: list[int], procs: dict[str, Proc], engine: Engine, *,
                 due_at: float, log: Timeline) -> None:
    """Kill and restart processes at points of the bulk's progress (share of its messages
    acknowledged), and the outreach worker in the middle of sending the near reminders (the
    first moment a touch is ``sending`` after they fall due; a minute later at the latest)."""
    base = ledger.first_acks
    total = len(bulk)

    def progress(share: float) -> Callable[[], bool]:
        return lambda: ledger.first_acks - base >= share * total

    def sending() -> bool:
        if time.monotonic() < due_at:
            return False
        if time.monotonic() > due_at + 60:
            return True
        return bool(_scalar(engine, "SELECT count(*) FROM touches WHERE status = 'sending'"))

    pending = [
        _Event("worker-intake-1", "kill", 2.0, progress(0.15)),
        _Event("serve-a", "kill", 6.0, progress(0.40)),
        _Event("redis", "stop", 5.0, progress(0.65)),
        _Event("worker-loop", "kill", 2.0, sending),
    ]
    running: list[asyncio.Task[None]] = []
    while pending:
        for event in list(pending):
            if await asyncio.to_thread(event.due):
                pending.remove(event)
                running.append(asyncio.create_task(
                    _restart(procs[event.process], event.down_s, log, event.how)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*running)


async def _phase(load: Load, indices: list[int], log: Timeline,
                 chaos: Coroutine[Any, Any, None] | None = None) -> float:
    """Send ``indices`` (with ``chaos`` alongside); the seconds until the last was ACKed."""
    started = time.monotonic()

    async def send() -> float:
        await load.send(indices)
        took = time.monotonic() - started
        log.note(f"{len(indices)} messages acknowledged in {took:.1f} s "
                 f"({len(indices) / took:.0f} msg/s)")
        return took

    if chaos is None:
        return await send()
    took, _ = await asyncio.gather(send(), chaos)
    return float(took)


# -- final checks --------------------------------------------------------------------------------

_PROCESSED = re.compile(r'\{[^{}]*"event": "message_processed"[^{}]*\}')


def _processed_in_logs(logs: list[Path]) -> Counter[int]:
    """inbox id → how many times a worker logged it processed (after its commit)."""
    seen: Counter[int] = Counter()
    for path in logs:
        for match in _PROCESSED.finditer(path.read_text(errors="replace")):
            event = json.loads(match.group(0))
            if event.get("status") == "processed":
                seen[int(event["inbox_id"])] += 1
    return seen


def _outbox_keys(folder: Path) -> Counter[str]:
    keys: Counter[str] = Counter()
    for path in folder.rglob("*.json"):
        keys[json.loads(path.read_text())["key"]] += 1
    return keys


def _check_scale_run(engine: Engine, messages: list[Message], ledger: Ledger,
                     worker_logs: list[Path], outbox: Path) -> list[str]:
    """Invariants of the scale run on its own (before comparing with the reference)."""
    problems: list[str] = []
    codes = Counter(r.acks[0][0] for r in ledger.records if r.acks)
    if set(codes) != {"AA"} or sum(codes.values()) != len(messages):
        problems.append(f"first answers {dict(codes)}: every message should be AA")
    bad_redelivery = [r.message.control_id for r in ledger.records
                      if any(code != "AA" for code, _, _ in r.acks[1:])]
    if bad_redelivery:
        problems.append(f"redeliveries not answered AA: {bad_redelivery[:10]}")

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, sender, control_id, status, attempts, last_error FROM inbox")).all()
    by_key = Counter(f"{r.sender}|{r.control_id}" for r in rows)
    expected = {f"{m.sender}|{SENDERS[m.sender]}|{m.control_id}" for m in messages}
    twice = [k for k, n in by_key.items() if n > 1]
    missing = sorted(expected - set(by_key))
    extra = sorted(set(by_key) - expected)
    if twice or missing or extra:
        problems.append(f"inbox: {len(twice)} keys stored twice {twice[:5]}, {len(missing)} "
                        f"ACKed but missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}")
    not_processed = [(r.id, r.status, r.last_error) for r in rows if r.status != "processed"]
    if not_processed:
        problems.append(f"{len(not_processed)} rows not processed: {not_processed[:5]}")

    logged = _processed_in_logs(worker_logs)
    if sum(logged.values()) < 0.95 * len(messages):  # a kill may cut a line, not many
        problems.append(f"only {sum(logged.values())} message_processed lines in the worker "
                        f"logs for {len(messages)} messages: the exactly-once check is blind")
    more_than_once = {i: n for i, n in logged.items() if n > 1}
    if more_than_once:
        problems.append(f"{len(more_than_once)} rows logged processed more than once: "
                        f"{list(more_than_once.items())[:10]}")

    with engine.connect() as conn:
        created_twice = conn.execute(text(
            "SELECT entry_id, count(*) FROM timeline_changes WHERE change = 'created' "
            "GROUP BY entry_id HAVING count(*) > 1")).all()
        sent = {r.key for r in conn.execute(text(
            "SELECT key FROM touches WHERE status = 'sent'"))}
        sending = conn.execute(text("SELECT count(*) FROM touches WHERE status = 'sending'"
                                    )).scalar()
    if created_twice:
        problems.append(f"{len(created_twice)} entries with more than one 'created' change: "
                        f"{created_twice[:5]}")
    files = _outbox_keys(outbox)
    if any(n > 1 for n in files.values()):
        problems.append(f"keys written twice to the file channel: "
                        f"{[k for k, n in files.items() if n > 1][:10]}")
    if set(files) != sent:
        problems.append(f"file channel keys != sent touches: {len(set(files) - sent)} files "
                        f"without a sent touch {sorted(set(files) - sent)[:5]}, "
                        f"{len(sent - set(files))} sent touches without a file "
                        f"{sorted(sent - set(files))[:5]}")
    if sending:
        problems.append(f"{sending} touches still 'sending'")
    return problems


def _compare(scale: Snapshot, reference: Snapshot) -> list[str]:
    problems: list[str] = []
    problems += diff("patient", scale.patients, reference.patients)
    problems += diff("entry", scale.entries, reference.entries)
    problems += diff("touch", scale.touches, reference.touches)
    problems += diff("message", scale.messages, reference.messages)
    for table in ("inbox", "mapped_resources", "patients", "patient_identifiers",
                  "timeline_entries", "entry_keys", "entry_sources"):
        if scale.counts[table] != reference.counts[table]:
            problems.append(f"{table}: {scale.counts[table]} rows in the scale run, "
                            f"{reference.counts[table]} in the reference run")
    return problems


# -- the test ------------------------------------------------------------------------------------

def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def test_scale_out_with_kills(pg_server_url: str, tmp_path: Path) -> None:
    """See the module docstring."""
    if not Path(REDIS_SERVER).exists():
        message = f"{REDIS_SERVER} not found: the scale test starts its own Redis"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    log = Timeline()
    work = tmp_path / "run"
    work.mkdir()
    outbox = work / "outbox"
    config_text = config_toml(outbox)
    (work / "careloop.toml").write_text(config_text)
    config = tomllib.loads(config_text)

    database = ScratchDatabase(pg_server_url, "careloop_scale")
    reference_db = ScratchDatabase(pg_server_url, "careloop_scale_ref")
    redis_port, http_a, mllp_a, http_b, mllp_b = free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}
    env.update(
        CARELOOP_CONFIG=str(work / "careloop.toml"),
        CARELOOP_DATABASE_URL=database.url,
        CARELOOP_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        CARELOOP_AUTH="disabled",
        CARELOOP_BASE_URL=f"http://127.0.0.1:{http_a}",
        CARELOOP_LOG_LEVEL="info",   # the workers' message_processed lines are checked
        CARELOOP_LOG_FORMAT="json",
        CARELOOP_STALE_AFTER_S="20",  # a row whose task was lost is swept after 20 s
        CARELOOP_SWEEP_INTERVAL_S="2",
    )
    cluster = Cluster(work, env)
    engine: Engine | None = None
    passed = False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a CI timeout still cleans up
    try:
        database.create().upgrade(env, work)
        replicas = [cluster.serve("serve-a", http_a, mllp_a), cluster.serve("serve-b", http_b,
                                                                             mllp_b)]
        procs: dict[str, Proc] = {"redis": cluster.redis(redis_port).start()}
        for replica in replicas:
            procs[replica.name] = replica.start()
        procs["worker-intake-1"] = cluster.worker("worker-intake-1", "intake").start()
        procs["worker-intake-2"] = cluster.worker("worker-intake-2", "intake,timeline").start()
        procs["worker-loop"] = cluster.worker("worker-loop", "outreach,writeback,fhir").start()
        procs["beat"] = cluster.beat().start()
        engine = create_db_engine(database.url, pool_size=1)
        log.note(f"cluster up: {', '.join(procs)}")

        generated_at = datetime.now(UTC).replace(microsecond=0)
        due = generated_at + timedelta(seconds=DUE_S)
        due_mono = time.monotonic() + DUE_S
        messages = build_workload(MESSAGES, now=generated_at, due=due, seed=SEED)
        near = [i for i, m in enumerate(messages) if m.phase == 1]
        bulk = [i for i, m in enumerate(messages) if m.phase == 2]
        kinds = Counter(m.kind for m in messages)
        log.note(f"workload: {len(messages)} messages ({len(near)} near), "
                 f"{dict(sorted(kinds.items()))}; reminders due at +{DUE_S:g} s")
        ledger = Ledger(messages)
        load = Load(ledger, replicas, mllp_per_replica=6, http_per_replica=2, redeliver=0.05,
                    seed=SEED)

        # Phase 1: the near patients, settled (processed and planned) before anything is due.
        asyncio.run(_phase(load, near, log))
        near_total = len(near)

        def settled() -> tuple[bool, str]:
            p = _progress(engine)
            done = (p["inbox"].get("processed", 0) == near_total
                    and p["cursor"] >= p["changes"] > 0)
            return done, json.dumps(p)

        _wait("phase 1 processed and planned", settled, max(5.0, DUE_S - 15), log, every=5)
        log.note(f"phase 1 settled: {json.dumps(_progress(engine))}")
        if time.monotonic() > due_mono - 5:
            pytest.fail(f"phase 1 took too long to settle ({time.monotonic() - log.start:.0f} "
                        f"s of {DUE_S:g}): raise CARELOOP_SCALE_DUE_S on this machine")

        # Phase 2: the bulk, with kills.
        sent_at = time.monotonic()
        asyncio.run(_phase(load, bulk, log,
                           _chaos(ledger, bulk, procs, engine, due_at=due_mono, log=log)))
        log.note(f"senders: {ledger.summary()}")

        def quiet() -> tuple[bool, str]:
            p = _progress(engine)
            done = (p["inbox"].get("received", 0) == 0
                    and sum(p["inbox"].values()) == len(messages)
                    and p["cursor"] >= p["changes"]
                    and p["overdue_touches"] == 0
                    and p["touches"].get("sending", 0) == 0
                    and datetime.now(UTC) > due + timedelta(seconds=NEAR_SPREAD_S + 5))
            return done, json.dumps(p)

        _wait("every message processed and every due reminder sent", quiet, TIMEOUT_S, log)
        processed_s = time.monotonic() - sent_at
        log.note(f"quiet {processed_s:.1f} s after the bulk started "
                 f"({len(messages) / (time.monotonic() - log.start):.0f} msg/s overall): "
                 f"{json.dumps(_progress(engine))}")
        cluster.close()  # nothing may change while we look

        problems = _check_scale_run(
            engine, messages, ledger,
            [procs[n].log for n in ("worker-intake-1", "worker-intake-2", "worker-loop")],
            outbox)
        scale = snapshot(engine)
        resent = _scalar(engine, "SELECT count(*) FROM touches WHERE status = 'sent' "
                                 "AND attempts > 1")
        retried = _scalar(engine, "SELECT count(*) FROM inbox WHERE attempts > 1")
        log.note(f"scale run: {scale.counts}; touches "
                 f"{dict(Counter(t['outcome'] for t in scale.touches.values()))}; "
                 f"{resent} touches sent after more than one claim (a send cut by a kill, "
                 f"resolved by asking the channel), {retried} inbox rows tried more than once")

        # The reference: the same messages, one process, in order, no redeliveries or kills.
        reference_db.create().upgrade(env, work)
        result = run_reference(config, reference_db.url, messages,
                               outbox=work / "reference-outbox", plan_at=generated_at,
                               send_at=due + timedelta(seconds=NEAR_SPREAD_S + 30))
        reference_engine = create_db_engine(reference_db.url, pool_size=1)
        try:
            reference = snapshot(reference_engine)
        finally:
            reference_engine.dispose()
        log.note(f"reference run: {result.seconds:.1f} s, {result.statuses}, "
                 f"{result.sent} sent; {reference.counts}")
        if result.statuses != {"processed": len(messages)}:
            problems.append(f"reference run statuses {result.statuses}")
        problems += _compare(scale, reference)
        reference_files = _outbox_keys(work / "reference-outbox")
        if len(reference_files) != len(_outbox_keys(outbox)):
            problems.append(f"file channel: {len(_outbox_keys(outbox))} messages in the scale "
                            f"run, {len(reference_files)} in the reference run")

        log.note("chaos: " + "; ".join(f"+{at:.1f}s {what}" for at, what in log.events
                                      if what.startswith(("SIGKILL", "stopped"))))
        assert not problems, "\n".join(problems)
        log.note(f"passed in {time.monotonic() - log.start:.0f} s")
        passed = True
    except BaseException:
        print(f"{cluster.tails(40)}\nlogs and outbox kept in {work}", flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.close()
        if engine is not None:
            engine.dispose()
        for db in (database, reference_db):
            db.drop()
        if passed and os.environ.get("CARELOOP_SCALE_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
