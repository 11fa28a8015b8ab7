"""Celery: the pipeline's tasks when ``CARELOOP_BROKER_URL`` is set (``careloop worker``,
``careloop beat``).

Tasks carry ids only. They are sent after the commit that created the rows, from a background
thread, so the broker's round trip is never on the ACK path. ``acks_late`` with
``reject_on_worker_lost`` redelivers a task whose worker died; the database status makes the
redelivery harmless. The beat schedule runs the sweep, which re-enqueues any row pending too
long, so a task lost with the broker is only late. Long delays live in the database
(``next_attempt_at``), never as Celery ETA tasks.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from integration.appacks import deliver_app_acks
from integration.conversion import ContextFactory
from integration.db import create_db_engine
from integration.delivery import build_channels, delivery_for
from integration.fhir_tasks import fhir_schedule, register_fhir_tasks
from integration.logs import get_logger
from integration.loop_tasks import loop_schedule, register_loop_tasks
from integration.outreach.stage import OutreachStage
from integration.outreach.state import OutreachConfig
from integration.pipeline import due_ids, process_batch
from integration.settings import Settings

__all__ = ["QUEUES", "QUEUE_ALIASES", "CeleryDispatcher", "make_celery", "resolve_queues"]

log = get_logger("careloop.tasks")

QUEUES = ("intake", "outreach", "fhir", "writeback")
QUEUE_ALIASES = {"timeline": "intake"}
"""Other names ``careloop worker --queues`` accepts. DESIGN.md's ``timeline`` queue is the
intake queue: the processing stage writes the timeline in the same transaction as the inbox
row's new status, so the timeline has no queue (and no task) of its own."""
_BATCH = 100


class _EngineHolder:
    """One engine per worker process, created after the fork."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: Engine | None = None
        self._pid = 0

    def get(self) -> Engine:
        if self._engine is None or self._pid != os.getpid():
            self._engine = create_db_engine(self._url, pool_size=2)
            self._pid = os.getpid()
        return self._engine


def make_celery(settings: Settings) -> Celery:
    """The Celery app for ``settings`` (tasks ``careloop.process`` and ``careloop.sweep``)."""
    if not settings.broker_url:
        raise ValueError("CARELOOP_BROKER_URL is not set: Celery needs a broker")
    app = Celery("careloop", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue="intake",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": 3600,
            **({"global_keyprefix": settings.broker_key_prefix}
               if settings.broker_key_prefix else {}),
        },
        beat_schedule={
            "sweep": {"task": "careloop.sweep", "schedule": settings.sweep_interval_s},
            **_outreach_schedule(settings),
            **fhir_schedule(settings),
            **loop_schedule(settings),
        },
    )
    engines = _EngineHolder(settings.database_url)
    contexts = ContextFactory(settings)
    forward_fhir = register_fhir_tasks(app, settings, engines.get)
    register_loop_tasks(app, settings, engines.get)

    @app.task(name="careloop.process", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def process(inbox_ids: list[int]) -> None:
        engine = engines.get()
        process_batch(
            engine, [int(i) for i in inbox_ids], max_attempts=settings.max_attempts,
            contexts=contexts,
        )
        deliver_app_acks(engine, settings)
        forward_fhir(engine, inbox_ids)  # notification rows go to careloop.fhir.process

    @app.task(name="careloop.sweep", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def sweep() -> int:
        deliver_app_acks(engines.get(), settings)
        ids = due_ids(engines.get(), defer=timedelta(seconds=settings.stale_after_s))
        for start in range(0, len(ids), _BATCH):
            process.apply_async(args=[ids[start : start + _BATCH]], queue="intake")
        if ids:
            log.info("sweep_requeued", count=len(ids))
        return len(ids)

    outreach: list[OutreachStage] = []

    def stage() -> OutreachStage:
        if not outreach or outreach[0].engine is not engines.get():
            outreach[:] = [OutreachStage(engines.get(), OutreachConfig.from_settings(settings),
                                         channels=build_channels(settings),
                                         delivery=delivery_for(settings))]
        return outreach[0]

    # The outreach stage: beat ticks both tasks every ``outreach.interval_s``; the cursor row
    # lock and SKIP LOCKED claims let any number of workers run them at once.
    @app.task(name="careloop.outreach.reconcile", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def outreach_reconcile() -> int:
        return stage().reconcile().changes

    @app.task(name="careloop.outreach.send_due", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def outreach_send_due() -> int:
        result = stage().send_due()
        if (result.sent or result.failed or result.cancelled) and any(
                c.write_back for c in settings.connections):
            app.send_task("careloop.writeback.flush", queue="writeback")
        return result.sent

    return app


def _outreach_schedule(settings: Settings) -> dict[str, Any]:
    if not settings.pathways:
        return {}
    every = settings.outreach.interval_s
    # A tick that waits longer than a few intervals is superseded by the next one.
    options = {"queue": "outreach", "expires": max(5.0, every * 5)}
    return {
        "outreach-reconcile": {"task": "careloop.outreach.reconcile", "schedule": every,
                               "options": options},
        "outreach-send-due": {"task": "careloop.outreach.send_due", "schedule": every,
                              "options": options},
    }


class CeleryDispatcher:
    """Sends ``careloop.process`` tasks from a background thread, batching ids.

    After the first ids arrive it waits up to ``linger_s`` for more (at most :data:`_BATCH`
    a task): a task of 10 ids costs a worker about twice as much per message as one of 100
    (``bench/bench_workers.py``), and the ACK has already left, so the wait only delays
    processing by a few milliseconds."""

    def __init__(self, app: Celery, *, linger_s: float = 0.02) -> None:
        self.app = app
        self._linger = linger_s
        self._queue: queue.Queue[list[int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="celery-dispatch", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join(10)

    def dispatch(self, inbox_ids: Sequence[int]) -> None:
        if not self._started:
            self.start()
        self._queue.put(list(inbox_ids))

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            ids = list(first)
            stop = False
            deadline = time.monotonic() + self._linger
            while len(ids) < _BATCH:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                ids.extend(more)
            self._send(ids)
            if stop:
                return

    def _send(self, ids: list[int]) -> None:
        try:
            self.app.send_task(
                "careloop.process", args=[ids], queue="intake",
                retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2},
            )
        except Exception as exc:  # the rows are stored; the sweep sends them later
            log.warning("enqueue_failed", count=len(ids), exc_type=type(exc).__name__)


def resolve_queues(names: str) -> list[str]:
    """``careloop worker --queues`` text (comma-separated) → the queues to consume: aliases
    resolved (``timeline`` is ``intake``), repeats dropped, order kept.

    Raises ValueError naming the first unknown queue (Celery would otherwise consume a queue
    nothing is ever sent to, silently).
    """
    out: list[str] = []
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        queue_name = QUEUE_ALIASES.get(name, name)
        if queue_name not in QUEUES:
            known = ", ".join([*QUEUES, *(f"{a} (= {q})" for a, q in QUEUE_ALIASES.items())])
            raise ValueError(f"unknown queue {raw.strip()!r} in --queues (known: {known})")
        if queue_name not in out:
            out.append(queue_name)
    if not out:
        raise ValueError("--queues names no queue")
    return out


def worker_argv(queues: Sequence[str], concurrency: int, loglevel: str) -> list[str]:
    """Celery's command line for ``careloop worker``. Each worker gets its own node name
    (queues and process id), so several on one host are told apart in logs and monitoring."""
    name = f"careloop-{'-'.join(queues)}-{os.getpid()}@%h"
    return [
        "worker",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--loglevel", loglevel.upper(),
        "--hostname", name,
        "--without-gossip",
        "--without-mingle",
    ]


def run_worker(app: Celery, argv: list[str]) -> Any:
    return app.worker_main(argv)
