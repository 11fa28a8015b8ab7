"""The reference run: the same messages through one careloop process, one at a time, with no
redeliveries and nothing killed, into a fresh database.

Intake is the real one (:class:`integration.runtime.Runtime` ``receive_body``, the group
committer); then the processing stage runs in this process over the stored rows in id order,
batches of 100 (the batch size changes nothing on the timeline: newest wins whatever the
order); then the outreach stage runs at two chosen moments: ``reconcile`` at ``plan_at``
(before any reminder falls due, as in the scale run, where every reminder is planned before
its time by construction) and ``send_due`` at ``send_at`` (after the near reminders fell due).
With the clock passed explicitly the outcome does not depend on how long this run takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from integration.conversion import ContextFactory
from integration.db import create_db_engine
from integration.models import inbox
from integration.outreach.stage import OutreachStage, file_channels
from integration.outreach.state import OutreachConfig
from integration.pipeline import process_batch
from integration.runtime import Runtime
from integration.settings import load_settings
from tests.scale.workload import Message

__all__ = ["ReferenceResult", "run_reference"]


@dataclass
class ReferenceResult:
    stored: int
    statuses: dict[str, int]
    reconciled_changes: int
    sent: int
    seconds: float


async def _intake(settings: Any, messages: Sequence[Message], concurrency: int) -> int:
    runtime = Runtime(settings, with_mllp=False)
    stored = 0
    try:
        await runtime.start()
        for start in range(0, len(messages), concurrency):
            chunk = messages[start:start + concurrency]
            results = await asyncio.gather(
                *(runtime.receive_body(m.raw, "mllp", "reference") for m in chunk))
            for receipts in results:
                for receipt in receipts:
                    if receipt.code.value not in ("AA", "CA"):
                        raise AssertionError(f"reference intake answered {receipt.code.value}")
                    stored += 1
    finally:
        await runtime.stop()
        runtime.engine.dispose()
    return stored


def run_reference(config: dict[str, Any], database_url: str, messages: Sequence[Message], *,
                  outbox: Path, plan_at: datetime, send_at: datetime) -> ReferenceResult:
    """Feed ``messages`` (in order) into ``database_url`` and run every stage once to the end.

    ``config`` is the scale run's configuration file, as a dict.
    """
    import time

    from integration.logs import configure_logging

    configure_logging("warning")  # 20,000 "message_processed" lines would bury the progress
    started = time.monotonic()
    base = {k: v for k, v in config.items() if k != "pathways"}
    store_only = load_settings(**base, database_url=database_url, auth="disabled",
                               inprocess_worker=False, broker_url=None, mllp_port=0,
                               http_port=0, log_level="warning")
    stored = asyncio.run(_intake(store_only, messages, concurrency=32))

    settings = load_settings(**config, database_url=database_url, auth="disabled",
                             broker_url=None, log_level="warning")
    engine = create_db_engine(database_url, pool_size=2)
    try:
        contexts = ContextFactory(settings)
        with engine.connect() as conn:
            ids = [int(i) for i in conn.execute(select(inbox.c.id).order_by(inbox.c.id)).scalars()]
        statuses: dict[str, int] = {}
        for start in range(0, len(ids), 100):
            for outcome in process_batch(engine, ids[start:start + 100],
                                         max_attempts=settings.max_attempts, contexts=contexts):
                statuses[outcome.status] = statuses.get(outcome.status, 0) + 1

        stage = OutreachStage(engine, OutreachConfig.from_settings(settings),
                              channels=file_channels(outbox))
        reconciled = 0
        while (result := stage.reconcile(now=plan_at)).changes:
            reconciled += result.changes
        sent = 0
        while True:
            sweep = stage.send_due(now=send_at)
            sent += sweep.sent
            if not sweep.claimed:
                break
    finally:
        engine.dispose()
    return ReferenceResult(stored, statuses, reconciled, sent, time.monotonic() - started)
