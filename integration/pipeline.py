"""The work pipeline: the processing stage, the sweeper and the two ways to run them.

A stage reads a row, does its work and commits the row's new state (and the next stage's rows)
in one transaction; only then is the next task enqueued, carrying ids only. Two dispatchers
run the same stage code:

* :class:`InProcessDispatcher`: worker threads inside ``careloop serve`` (no broker needed);
* :class:`CeleryDispatcher` (in :mod:`integration.tasks`): Celery tasks over Redis.

Either way the database decides: a row is claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``
on PostgreSQL and guarded by its status on both databases, so a task delivered twice, or a
sweep that re-enqueues a row still in a queue, changes nothing the second time. The sweeper
re-enqueues rows whose ``next_attempt_at`` has passed: a task lost with a broker or a worker
delays work but never loses it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from integration.conversion import ContextFactory
from integration.db import write_lock
from integration.identity import IdentityRules
from integration.logs import get_logger
from integration.metrics import PROCESSED
from integration.models import InboxStatus, inbox, mapped_resources
from integration.routing import MessageError, check_structure
from integration.timeline import SourceRef, apply_batch, hl7v2_source
from mappings import MappingError, convert
from mappings.ack import AckCode, AckError, application_ack_wanted, build_ack
from mappings.convert import parse as parse_message
from mappings.er7 import ER7Error, decode, read_header

__all__ = [
    "Dispatcher",
    "InProcessDispatcher",
    "Outcome",
    "WorkRow",
    "WorkRunner",
    "due_ids",
    "process_batch",
    "process_message",
    "queue_depth",
    "requeue",
    "requeue_ids",
]

log = get_logger("careloop.pipeline")


WorkRunner = Callable[
    [list["WorkRow"], int, datetime, ContextFactory], tuple[list["Outcome"], list["_Result"]]
]


class Dispatcher(Protocol):
    """Moves ids to whatever runs the processing stage."""

    def dispatch(self, inbox_ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class Outcome:
    inbox_id: int
    status: str
    error: str | None = None
    resources: int = 0


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 5 * 2 ** max(0, attempts - 1)))


def process_message(
    engine: Engine,
    inbox_id: int,
    *,
    max_attempts: int = 5,
    now: datetime | None = None,
    contexts: ContextFactory | None = None,
) -> Outcome | None:
    """Run the processing stage for one inbox row; None when there was nothing to do (already
    processed, or claimed by another worker right now)."""
    outcomes = process_batch(
        engine, [inbox_id], max_attempts=max_attempts, now=now, contexts=contexts
    )
    return outcomes[0] if outcomes else None


def process_batch(
    engine: Engine,
    inbox_ids: Sequence[int],
    *,
    max_attempts: int = 5,
    now: datetime | None = None,
    contexts: ContextFactory | None = None,
    run: WorkRunner | None = None,
) -> list[Outcome]:
    """Run the processing stage for several rows in one transaction (one durable commit for
    many rows). Rows already done or claimed elsewhere are skipped.

    ``run`` executes the pure work phase (parse, check, convert); by default in this thread,
    in ``careloop serve`` in a separate process (:mod:`integration.workpool`) so that it never
    competes with the ACK path for the GIL.

    If the transaction itself fails (a database error while writing), or the work process dies,
    the rows are tried one by one, so a row that cannot succeed only holds itself back: its
    failure is recorded in a transaction of its own, and it is retried with backoff, then
    failed.
    """
    now = now or datetime.now(UTC)
    contexts = contexts or ContextFactory()
    contexts.refresh(engine)  # a sender saved in the console applies from this batch on
    work = run or _work
    ids = list(inbox_ids)
    try:
        if engine.dialect.name == "postgresql":
            # Claim (FOR UPDATE SKIP LOCKED), work and write in one transaction.
            with engine.begin() as conn:
                rows = _claim(conn, ids)
                outcomes, results = work(rows, max_attempts, now, contexts)
                _write(conn, results, now)
        else:
            # SQLite has one writer: do the work outside the write lock and hold it only for
            # the guarded write, so the ACK path's commits are not kept waiting.
            with engine.connect() as conn:
                rows = _claim(conn, ids)
            outcomes, results = work(rows, max_attempts, now, contexts)
            with write_lock(engine), engine.begin() as conn:
                _write(conn, results, now)
    except (SQLAlchemyError, BrokenProcessPool) as exc:
        if isinstance(exc, _LostRace) and len(inbox_ids) == 1:
            return []
        if len(inbox_ids) > 1:
            return [
                o
                for inbox_id in inbox_ids
                for o in process_batch(
                    engine, [inbox_id], max_attempts=max_attempts, now=now, contexts=contexts,
                    run=run,
                )
            ]
        _record_write_failure(engine, inbox_ids[0], exc, max_attempts, now)
        return [Outcome(inbox_ids[0], InboxStatus.RECEIVED.value, _describe(exc))]
    for o in outcomes:
        PROCESSED.labels(stage="intake", outcome=o.status).inc()
        log.info("message_processed", inbox_id=o.inbox_id, status=o.status)
    return outcomes


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"


class WorkRow(NamedTuple):
    """An inbox row as the work phase sees it (plain values, so it can cross processes)."""

    id: int
    raw: bytes
    attempts: int


def _claim(conn: Connection, inbox_ids: list[int]) -> list[WorkRow]:
    query = (
        select(inbox.c.id, inbox.c.raw, inbox.c.attempts)
        .where(inbox.c.id.in_(inbox_ids), inbox.c.status == InboxStatus.RECEIVED.value,
               inbox.c.source != "fhir")  # FHIR notifications: integration.fhir_ingest
        .order_by(inbox.c.id)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return [WorkRow(r.id, bytes(r.raw), r.attempts) for r in conn.execute(query)]


@dataclass
class _Result:
    """What the work phase decided for one row: its new column values and its resources
    (with where they came from, for the timeline)."""

    values: dict[str, Any]
    resources: list[dict[str, Any]] = field(default_factory=list)
    source: SourceRef | None = None
    identity: IdentityRules = field(default_factory=IdentityRules)


def _work(
    rows: list[WorkRow], max_attempts: int, now: datetime, contexts: ContextFactory
) -> tuple[list[Outcome], list[_Result]]:
    """Parse, check and convert each row to FHIR resources (no I/O)."""
    outcomes: list[Outcome] = []
    results: list[_Result] = []
    identity = IdentityRules(
        contexts.settings.authoritative_identifier_systems if contexts.settings else ()
    )
    for row in rows:
        attempts = row.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "warnings": None}
        resources: list[dict[str, Any]] = []
        source: SourceRef | None = None
        error: str | None
        app_ack_error: AckError | None = None
        try:
            text = decode(row.raw)
            header = read_header(text)
            problem = check_structure(header, text)
            if problem is not None:
                raise problem
            held = contexts.unregistered(header)
            if held is not None:  # hl7_unregistered_senders = "hold"
                raise MessageError(held, location="MSH-3", code="207")
            context = contexts.for_header(header)
            message = parse_message(text)
            conversion = convert(message, context=context)
            source = hl7v2_source(
                message, context.timezone, inbox_id=row.id, sender=conversion.sender
            )
        except (MessageError, ER7Error, MappingError) as exc:
            status, error = InboxStatus.FAILED, str(exc)
            location = getattr(exc, "location", "")
            code = str(getattr(exc, "code", None) or getattr(exc, "hl7_code", "207"))
            app_ack_error = AckError(error, location, code)
            values.update(status=status.value, last_error=error, processed_at=now,
                          next_attempt_at=None)
        except Exception as exc:  # a bug: retry with backoff, then give up
            error = _describe(exc)
            status = _retry_or_fail(values, attempts, max_attempts, error, now)
            log.warning("processing_error", inbox_id=row.id, attempts=attempts,
                        exc_type=type(exc).__name__)
        else:
            status, error = InboxStatus.PROCESSED, None
            resources = conversion.resources
            values.update(status=status.value, last_error=None, processed_at=now,
                          next_attempt_at=None, warnings=conversion.warnings or None)
        values.setdefault("status", InboxStatus.RECEIVED.value)
        values.setdefault("processed_at", None)
        values["app_ack"] = (
            _application_ack(row.raw, app_ack_error, now)
            if status is not InboxStatus.RECEIVED
            else None
        )
        values["row_id"] = row.id
        results.append(_Result(values, resources, source if resources else None, identity))
        outcomes.append(Outcome(row.id, status.value, error, len(resources)))
    return outcomes, results


def _write(conn: Connection, results: list[_Result], now: datetime) -> None:
    if not results:
        return
    # One executemany for the whole batch. The status guard makes a row that another worker
    # finished meanwhile (possible only across processes on SQLite) match nothing; then the
    # transaction is rolled back and the batch retried row by row.
    result = conn.execute(_UPDATE_PROCESSED, [r.values for r in results])
    if result.rowcount != len(results):
        raise _LostRace()
    # A replayed row's earlier resources are replaced by this run's.
    ids = [r.values["row_id"] for r in results]
    conn.execute(delete(mapped_resources).where(mapped_resources.c.inbox_id.in_(ids)))
    resource_rows = [
        {
            "inbox_id": r.values["row_id"],
            "resource_type": res["resourceType"],
            "resource_id": res["id"],
            "resource": res,
            "created_at": now,
        }
        for r in results
        for res in _unique(r.resources)
    ]
    if resource_rows:
        conn.execute(insert(mapped_resources), resource_rows)
    _write_timeline(conn, results, ids, now)


def _write_timeline(
    conn: Connection, results: list[_Result], ids: list[int], now: datetime
) -> None:
    """Upsert the batch's resources onto the timeline, in the same transaction: a replayed
    row finds its versions already applied and changes nothing."""
    todo = [r for r in results if r.source is not None and r.resources]
    if not todo:
        return
    received = dict(
        conn.execute(select(inbox.c.id, inbox.c.received_at).where(inbox.c.id.in_(ids))).all()
    )
    batch = [
        (_unique(r.resources), replace(r.source, received_at=received.get(r.values["row_id"])))
        for r in todo
        if r.source is not None
    ]
    apply_batch(conn, batch, now, todo[0].identity)


def _unique(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last of each (type, id): a message may mention the same thing twice."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for res in resources:
        seen[(res["resourceType"], res["id"])] = res
    return list(seen.values())


class _LostRace(SQLAlchemyError):
    """A row of the batch was finished by another worker between our read and our write."""


_UPDATE_PROCESSED = (
    update(inbox)
    .where(inbox.c.id == bindparam("row_id"), inbox.c.status == InboxStatus.RECEIVED.value)
    .values(
        status=bindparam("status"),
        attempts=bindparam("attempts"),
        last_error=bindparam("last_error"),
        processed_at=bindparam("processed_at"),
        next_attempt_at=bindparam("next_attempt_at"),
        app_ack=bindparam("app_ack"),
        warnings=bindparam("warnings"),
    )
)


def _retry_or_fail(
    values: dict[str, Any], attempts: int, max_attempts: int, error: str, now: datetime
) -> InboxStatus:
    if attempts >= max_attempts:
        values.update(status=InboxStatus.FAILED.value, last_error=error, next_attempt_at=None,
                      processed_at=now)
        return InboxStatus.FAILED
    values.update(last_error=error, next_attempt_at=now + _backoff(attempts))
    return InboxStatus.RECEIVED


def _record_write_failure(
    engine: Engine, inbox_id: int, exc: BaseException, max_attempts: int, now: datetime
) -> None:
    log.warning("processing_write_failed", inbox_id=inbox_id, exc_type=type(exc).__name__)
    try:
        with write_lock(engine), engine.begin() as conn:
            row = conn.execute(
                select(inbox.c.attempts).where(
                    inbox.c.id == inbox_id, inbox.c.status == InboxStatus.RECEIVED.value
                )
            ).first()
            if row is None:
                return
            values: dict[str, Any] = {"attempts": row.attempts + 1}
            _retry_or_fail(values, row.attempts + 1, max_attempts, _describe(exc), now)
            conn.execute(update(inbox).where(inbox.c.id == inbox_id).values(**values))
    except SQLAlchemyError:
        # The database is away altogether; the sweep will try again.
        log.warning("processing_failure_not_recorded", inbox_id=inbox_id)


def _application_ack(raw: bytes, error: AckError | None, now: datetime) -> str | None:
    """Enhanced mode: the application ACK when MSH-16 asks for one in this outcome."""
    try:
        header = read_header(decode(raw))
    except ER7Error:
        return None
    ok = error is None
    if not application_ack_wanted(header, ok):
        return None
    code = AckCode.AA if ok else AckCode.AE
    errors = (error,) if error else ()
    control_id = f"CLAPP{header.control_id}"[:20]
    return build_ack(header, code, control_id=control_id, now=now, errors=errors)


def due_ids(
    engine: Engine,
    *,
    now: datetime | None = None,
    limit: int = 1000,
    include_unstarted: bool = False,
    defer: timedelta | None = None,
) -> list[int]:
    """Rows waiting longer than they should: stored but not yet processed, or due for a retry.

    ``include_unstarted`` also takes rows never tried at all, however fresh: at start-up
    nothing is queued in this process yet, so every such row was left by the previous run.

    ``defer`` moves the chosen rows' ``next_attempt_at`` that far ahead in the same statement:
    a sweep that enqueues them does not enqueue them again at its next tick while a backlog is
    worked off (a task that was lost meanwhile is found once ``defer`` has passed).
    """
    now = now or datetime.now(UTC)
    due = inbox.c.next_attempt_at <= now
    if include_unstarted:
        due = or_(due, inbox.c.attempts == 0)
    chosen = (select(inbox.c.id)
              .where(inbox.c.status == InboxStatus.RECEIVED.value, due)
              .order_by(inbox.c.id)
              .limit(limit))
    if defer is None:
        with engine.connect() as conn:
            return [r.id for r in conn.execute(chosen)]
    if engine.dialect.name == "postgresql":
        chosen = chosen.with_for_update(skip_locked=True)
    with write_lock(engine), engine.begin() as conn:
        rows = conn.execute(update(inbox)
                            .where(inbox.c.id.in_(chosen.scalar_subquery()))
                            .values(next_attempt_at=now + defer)
                            .returning(inbox.c.id))
        return sorted(r.id for r in rows)


def _requeued(now: datetime) -> dict[str, Any]:
    """What a replay sets on an inbox row: received again, due now, attempts and the
    application ACK reset (a replay builds and sends a new one)."""
    return {"status": InboxStatus.RECEIVED.value, "attempts": 0, "next_attempt_at": now,
            "processed_at": None, "app_ack": None, "app_ack_sent_at": None}


def requeue(
    engine: Engine,
    *,
    status: str = InboxStatus.FAILED.value,
    since: datetime | None = None,
    ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Put rows back to ``received`` for replay; returns their ids. Attempts are reset, and
    ``next_attempt_at`` is now, so the sweep takes them if nobody dispatches them sooner."""
    now = now or datetime.now(UTC)
    conditions = [inbox.c.status == status] if status else []
    if since is not None:
        conditions.append(inbox.c.received_at >= since)
    if ids is not None:
        conditions.append(inbox.c.id.in_(list(ids)))
    # Unreadable rows cannot be processed; they are kept only for inspection.
    conditions.append(inbox.c.status != InboxStatus.REJECTED.value)
    with write_lock(engine), engine.begin() as conn:
        selected = [
            r.id
            for r in conn.execute(select(inbox.c.id).where(*conditions).order_by(inbox.c.id))
        ]
        for start in range(0, len(selected), 500):
            chunk = selected[start : start + 500]
            conn.execute(update(inbox).where(inbox.c.id.in_(chunk)).values(**_requeued(now)))
    return selected


def requeue_ids(
    conn: Connection,
    ids: Sequence[int],
    *,
    status: str | None = None,
    now: datetime | None = None,
) -> list[int]:
    """:func:`requeue` for given rows, in the caller's transaction (the console replays and
    audits in one): only rows still in ``status`` (any but ``rejected`` when None) change;
    returns their ids. The caller dispatches them after its commit."""
    now = now or datetime.now(UTC)
    done: list[int] = []
    wanted = sorted({int(i) for i in ids})
    for start in range(0, len(wanted), 500):
        conditions = [inbox.c.id.in_(wanted[start : start + 500]),
                      inbox.c.status != InboxStatus.REJECTED.value]
        if status:
            conditions.append(inbox.c.status == status)
        done += [
            r.id
            for r in conn.execute(
                update(inbox)
                .where(*conditions)
                .values(**_requeued(now))
                .returning(inbox.c.id)
            )
        ]
    return sorted(done)


def queue_depth(engine: Engine, now: datetime | None = None) -> dict[str, tuple[int, float]]:
    """Rows waiting per stage and the age in seconds of the oldest (for /metrics)."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(inbox.c.received_at)).where(
                inbox.c.status == InboxStatus.RECEIVED.value
            )
        ).one()
    age = 0.0
    if oldest is not None:
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age = max(0.0, (now - oldest).total_seconds())
    return {"intake": (int(count), age)}


class InProcessDispatcher:
    """Worker threads inside the serving process, fed by a queue of ids.

    Ids already queued are not queued twice, so a sweep over a long backlog does not grow the
    queue. Whatever is in the queue when the process dies is still ``received`` in the database
    and is found by the sweep at the next start.
    """

    def __init__(
        self,
        work: Callable[[list[int]], object],
        *,
        threads: int = 2,
        batch: int = 16,
        linger_s: float = 0.05,
        sweep: Callable[[], Sequence[int]] | None = None,
        sweep_interval_s: float = 15.0,
    ) -> None:
        self._work = work
        self._batch = batch
        self._linger = linger_s
        self._sweep = sweep
        self._sweep_interval = sweep_interval_s
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            for i in range(threads)
        ]
        self._sweeper = threading.Thread(target=self._sweep_loop, name="sweeper", daemon=True)
        self.idle = threading.Event()

    def start(self) -> None:
        for t in self._threads:
            t.start()
        if self._sweep is not None:
            self._sweeper.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
        if self._sweeper.is_alive():
            self._sweeper.join(timeout)

    def dispatch(self, inbox_ids: Sequence[int]) -> None:
        with self._lock:
            for inbox_id in inbox_ids:
                if inbox_id not in self._queued:
                    self._queued.add(inbox_id)
                    self._queue.put(inbox_id)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None or self._stop.is_set():
                # Stopping: what is still queued stays "received" in the database and is
                # found by the sweep at the next start.
                return
            batch = [first]
            stop = False
            # Linger a moment to gather a bigger batch: one commit for many rows keeps the
            # processing stage out of the way of the ACK path (fewer fsyncs, fewer lock turns).
            deadline = time.monotonic() + self._linger
            while len(batch) < self._batch:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            with self._lock:
                self._queued.difference_update(batch)
            try:
                self._work(batch)
            except Exception as exc:  # the rows stay received; the sweep retries them
                log.error("worker_error", inbox_ids=batch[:20], exc_type=type(exc).__name__,
                          error=str(exc)[:200])
            if stop:
                return

    def _sweep_loop(self) -> None:
        assert self._sweep is not None
        while True:
            try:
                ids = self._sweep()
                if ids:
                    log.info("sweep_requeued", count=len(ids))
                    self.dispatch(ids)
            except Exception as exc:
                log.warning("sweep_failed", exc_type=type(exc).__name__, error=str(exc)[:200])
            if self._stop.wait(self._sweep_interval):
                return
