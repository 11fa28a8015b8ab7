"""Write-back: ``GET /console/outbox`` (role ``viewer``), and for operators
``POST /console/outbox/{id}/retry`` and ``POST /console/outbox/retry`` (every rejected row of
one resource type).

The page shows the EHR outbox by status and by kind (resource type and operation), how many
rows wait and how old the oldest is, and the rows that need attention: rejected by the EHR
(``failed``: the OperationOutcome's text in ``last_error``) and those still retrying after an
error, each with its attempts and next attempt. Only ids, types, references and the EHR's
answer are shown; the resources themselves (which name the patient) are not.

A retry does what ``careloop writeback replay`` does (:func:`integration.writeback.replay`):
the rows become ``pending`` and due now with their attempts reset, written rows are never
written again, and the running write-back stage is woken. Each retry writes a
``console.writeback_retry`` audit row (who, which rows, how many changed) and answers 303 back
to the page, which says how many rows will be written again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import Engine, func, insert, or_, select

from integration.console.auth import Operator, Session, Viewer, now_for, runtime_of
from integration.console.render import HEADERS, ConsoleError, render
from integration.db import write_lock
from integration.models import audit_events, ehr_outbox
from integration.runtime import Runtime
from integration.writeback import replay

__all__ = ["OutboxFigures", "figures", "retry_kind", "retry_rows", "router"]

router = APIRouter(include_in_schema=False, tags=["console"])

LIST_LIMIT = 100
RETRY_ACTION = "console.writeback_retry"
_MAX_BULK = 10_000


@dataclass(frozen=True)
class OutboxRow:
    id: int
    key: str
    connection: str
    resource_type: str
    operation: str
    target: str | None
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str
    updated_at: datetime


@dataclass(frozen=True)
class OutboxFigures:
    now: datetime
    by_status: list[tuple[str, int]]
    by_kind: list[tuple[str, str, str, int]]
    """(resource type, operation, status, rows)."""
    waiting: int
    oldest_s: float
    """Age of the oldest row waiting (pending or sending), by creation."""
    rejected_by_type: list[tuple[str, int]]
    rows: list[OutboxRow]

    @property
    def rejected(self) -> int:
        return sum(n for _, n in self.rejected_by_type)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def figures(engine: Engine, now: datetime) -> OutboxFigures:
    """The outbox's counts and the rows that need attention (rejected, or retrying after an
    error), newest change first."""
    t = ehr_outbox
    with engine.connect() as conn:
        by_status = [(str(s), int(n)) for s, n in conn.execute(
            select(t.c.status, func.count()).group_by(t.c.status)
            .order_by(func.count().desc(), t.c.status))]
        by_kind = [(str(r), str(o), str(s), int(n)) for r, o, s, n in conn.execute(
            select(t.c.resource_type, t.c.operation, t.c.status, func.count())
            .group_by(t.c.resource_type, t.c.operation, t.c.status)
            .order_by(t.c.resource_type, t.c.operation, t.c.status))]
        waiting, oldest = conn.execute(
            select(func.count(), func.min(t.c.created_at))
            .where(t.c.status.in_(("pending", "sending")))).one()
        rejected = [(str(r), int(n)) for r, n in conn.execute(
            select(t.c.resource_type, func.count()).where(t.c.status == "failed")
            .group_by(t.c.resource_type).order_by(t.c.resource_type))]
        rows = [
            OutboxRow(int(r.id), r.key, r.connection, r.resource_type, r.operation, r.target,
                      r.status, int(r.attempts or 0), _aware(r.next_attempt_at),
                      r.last_error or "", _aware(r.updated_at) or now)
            for r in conn.execute(
                select(t.c.id, t.c.key, t.c.connection, t.c.resource_type, t.c.operation,
                       t.c.target, t.c.status, t.c.attempts, t.c.next_attempt_at,
                       t.c.last_error, t.c.updated_at)
                .where(or_(t.c.status == "failed",
                           (t.c.status == "pending") & t.c.last_error.is_not(None)))
                .order_by(t.c.updated_at.desc(), t.c.id.desc()).limit(LIST_LIMIT))
        ]
    first = _aware(oldest)
    return OutboxFigures(
        now=now, by_status=by_status, by_kind=by_kind, waiting=int(waiting),
        oldest_s=max(0.0, (now - first).total_seconds()) if first is not None else 0.0,
        rejected_by_type=rejected, rows=rows)


def _audit(engine: Engine, session: Session, target: str, detail: dict[str, Any],
           now: datetime) -> None:
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(audit_events).values(
            at=now, actor=session.person.username[:255], action=RETRY_ACTION,
            target_type="ehr_outbox", target_id=target[:255], detail=detail))


def retry_rows(engine: Engine, session: Session, ids: list[int], now: datetime) -> int:
    """Replay the outbox rows ``ids`` (failed or waiting ones), audited; how many changed."""
    count = replay(engine, ids=ids, now=now)
    _audit(engine, session, ",".join(str(i) for i in ids), {"ids": ids, "changed": count}, now)
    return count


def retry_kind(engine: Engine, session: Session, resource_type: str, now: datetime) -> int:
    """Replay every rejected (``failed``) row of ``resource_type``, audited; how many
    changed."""
    t = ehr_outbox
    with engine.connect() as conn:
        ids = [int(i) for i in conn.execute(
            select(t.c.id).where(t.c.status == "failed", t.c.resource_type == resource_type)
            .order_by(t.c.id).limit(_MAX_BULK)).scalars()]
    count = replay(engine, ids=ids, now=now) if ids else 0
    _audit(engine, session, f"failed:{resource_type}",
           {"resource_type": resource_type, "ids": ids, "changed": count}, now)
    return count


def _wake(runtime: Runtime) -> None:
    if runtime.writeback is not None:
        runtime.writeback.poke()


def _back(count: int) -> Response:
    return RedirectResponse(f"/console/outbox?retried={count}", status_code=303,
                            headers=HEADERS)


async def _form_value(request: Request, name: str) -> str:
    value = (await request.form()).get(name)
    return value.strip() if isinstance(value, str) else ""


@router.get("/console/outbox")
async def console_outbox(request: Request, session: Viewer,
                         retried: str | None = None) -> Response:
    """The outbox by status (table ``outbox-by-status``) and kind (``outbox-by-kind``), and
    the rows that need attention (``outbox``), with retry buttons for operators."""
    now = now_for(request)
    f = await asyncio.to_thread(figures, runtime_of(request).engine, now)
    notice = None
    if retried is not None and retried.isdigit():
        n = int(retried)
        notice = (f"{n} row{'s' if n != 1 else ''} will be written again." if n else
                  "Nothing to retry: the rows are written, or being sent right now.")
    return render("outbox.html", session=session, active="outbox", f=f, notice=notice,
                  may_retry=session.person.role in ("operator", "admin"))


@router.post("/console/outbox/retry")
async def console_outbox_retry_kind(request: Request, session: Operator) -> Response:
    """Retry every rejected row of the form's ``resource_type`` (operator)."""
    resource_type = await _form_value(request, "resource_type")
    if not resource_type or len(resource_type) > 64:
        raise ConsoleError(400, "Which rows?", "Choose the resource type to retry.")
    runtime = runtime_of(request)
    count = await asyncio.to_thread(retry_kind, runtime.engine, session, resource_type,
                                    now_for(request))
    _wake(runtime)
    return _back(count)


@router.post("/console/outbox/{outbox_id}/retry")
async def console_outbox_retry(request: Request, session: Operator, outbox_id: str) -> Response:
    """Retry one row (operator): a rejected one, or a waiting one now rather than after its
    backoff."""
    if not outbox_id.isdigit() or len(outbox_id) > 18:
        raise ConsoleError(404, "No such row", "The write-back outbox has no such row.")
    runtime = runtime_of(request)
    count = await asyncio.to_thread(retry_rows, runtime.engine, session, [int(outbox_id)],
                                    now_for(request))
    _wake(runtime)
    return _back(count)
