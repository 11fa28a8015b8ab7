"""Writing the outbox to the EHRs: claim due rows, write them, record what happened.

1. **Claim** (one short transaction): rows ``pending`` and due, or ``sending`` for more than
   five minutes (a crash mid-write; safe to redo, see 3), are marked ``sending``
   (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a status-guarded update on both databases).
2. **Write**, per connection, with no database transaction open: creates go as FHIR ``batch``
   Bundles of up to 100 entries, each a conditional create (``ifNoneExist:
   identifier=urn:careloop:writeback|<key>``); a server without batch (refused with 400, 404,
   405 or 501, or no ``batch`` in its CapabilityStatement; remembered per connection) gets one
   conditional create per row. Updates read the resource, apply the change, and ``PUT`` it with
   ``If-Match`` (a 412 reads again, up to three times).
3. **Exactly once.** A create whose response was lost (a dropped connection, a crash before the
   result was recorded) is sent again with the same identifier; the EHR finds it and answers 200
   with the existing resource instead of creating a second one. An update sets values, so doing
   it twice changes nothing more.
4. **Record** each chunk's results in its own transaction: ``written`` (with ``ehr_ref``),
   ``failed`` (a permanent rejection: the OperationOutcome text in ``last_error``; ``careloop
   writeback replay`` retries it) or ``pending`` again with a backoff: ``max(Retry-After,
   5 s * 2^(attempts-1))``, at most an hour. Authentication failures stay pending too (a key or
   a registration can be fixed), with that said in ``last_error``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, and_, bindparam, or_, select, update

from adapters.fhir import FHIRApi, FHIRRequest, FHIRResponse
from adapters.fhir.errors import (
    RETRYABLE_STATUSES,
    AuthenticationError,
    FatalFHIRError,
    FHIRError,
    PreconditionFailed,
    RetryableFHIRError,
    outcome_text,
)
from integration.db import write_lock
from integration.logs import get_logger
from integration.metrics import count_writeback
from integration.models import ehr_outbox
from integration.settings import Connection, Settings
from integration.writeback.resources import WRITEBACK_SYSTEM, ChangeError, apply_change

__all__ = [
    "BATCH_SIZE",
    "STALE_SENDING",
    "FlushResult",
    "backoff_s",
    "flush",
    "replay",
]

log = get_logger("careloop.writeback")

BATCH_SIZE = 100
STALE_SENDING = timedelta(minutes=5)
_BASE_DELAY_S = 5.0
_MAX_DELAY_S = 3600.0
_MAX_RETRY_AFTER_S = 86400.0
_BATCH_REFUSED = frozenset({400, 404, 405, 501})
_UPDATE_TRIES = 4  # the first PUT and three more after a 412

_DEFAULT_BATCH_SUPPORT: dict[str, bool] = {}
"""Per connection (name and base): does the server take batch Bundles? Kept for the process."""


@dataclass
class FlushResult:
    claimed: int = 0
    written: int = 0
    failed: int = 0
    retried: int = 0

    def add(self, other: FlushResult) -> None:
        self.claimed += other.claimed
        self.written += other.written
        self.failed += other.failed
        self.retried += other.retried


@dataclass(frozen=True)
class _Row:
    id: int
    key: str
    connection: str
    resource_type: str
    operation: str
    target: str | None
    resource: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class _Outcome:
    row: _Row
    status: str  # written | failed | pending
    error: str | None = None
    ehr_ref: str | None = None
    retry_after: float | None = None


@dataclass
class _Deferred:
    """A whole-connection problem met mid-way: the rows not tried yet wait with it."""

    error: BaseException | None = None
    rows: list[_Row] = field(default_factory=list)


def backoff_s(attempts: int, retry_after: float | None = None) -> float:
    """Seconds before the next try after ``attempts`` tries: ``5 s * 2^(attempts-1)`` capped at
    an hour, and never less than the server's ``Retry-After``."""
    exp = min(_MAX_DELAY_S, _BASE_DELAY_S * 2.0 ** max(0, min(attempts - 1, 30)))
    if retry_after is None:
        return exp
    return max(exp, min(retry_after, _MAX_RETRY_AFTER_S))


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def if_none_exist(key: str) -> str:
    return f"identifier={WRITEBACK_SYSTEM}|{key}"


# --- claim and record ----------------------------------------------------------------------

def _due(now: datetime) -> Any:
    t = ehr_outbox
    return or_(
        and_(t.c.status == "pending", t.c.next_attempt_at <= now),
        and_(t.c.status == "sending", t.c.updated_at <= now - STALE_SENDING),
    )


def _claim(engine: Engine, now: datetime, limit: int) -> list[_Row]:
    t = ehr_outbox
    with write_lock(engine), engine.begin() as conn:
        query = select(t.c.id).where(_due(now)).order_by(t.c.next_attempt_at, t.c.id).limit(limit)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        ids = [r.id for r in conn.execute(query)]
        if not ids:
            return []
        claimed = conn.execute(
            update(t).where(t.c.id.in_(ids), _due(now))
            .values(status="sending", attempts=t.c.attempts + 1, updated_at=now)
            .returning(t.c.id, t.c.key, t.c.connection, t.c.resource_type, t.c.operation,
                       t.c.target, t.c.resource, t.c.attempts)
        ).all()
    rows = [_Row(int(r.id), str(r.key), str(r.connection), str(r.resource_type),
                 str(r.operation), r.target, dict(r.resource), int(r.attempts)) for r in claimed]
    return sorted(rows, key=lambda r: r.id)


_RECORD = (
    update(ehr_outbox)
    .where(ehr_outbox.c.id == bindparam("r_id"), ehr_outbox.c.status == "sending")
    .values(
        status=bindparam("v_status"),
        last_error=bindparam("v_error"),
        ehr_ref=bindparam("v_ref"),
        next_attempt_at=bindparam("v_next"),
        updated_at=bindparam("v_now"),
    )
)


def _record(engine: Engine, outcomes: Sequence[_Outcome], now: datetime) -> None:
    if not outcomes:
        return
    # ``updated_at`` is when the outcome was known (a flush may run for a while after ``now``).
    at = max(now, datetime.now(UTC))
    params = []
    for o in outcomes:
        delay = backoff_s(o.row.attempts, o.retry_after) if o.status == "pending" else 0.0
        params.append({
            "r_id": o.row.id, "v_status": o.status,
            "v_error": o.error[:4000] if o.error else None,
            "v_ref": o.ehr_ref[:512] if o.ehr_ref else None,
            "v_next": now + timedelta(seconds=delay), "v_now": at,
        })
    with write_lock(engine), engine.begin() as conn:
        conn.execute(_RECORD, params)


# --- outcomes --------------------------------------------------------------------------------

def _ref_of(location: str | None, body: Any, resource_type: str) -> str | None:
    """``Type/id`` from a Location (``.../Type/id/_history/v``) or the returned resource."""
    if location:
        parts = urlsplit(location).path.rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) >= 2 and parts[-1]:
            return f"{parts[-2]}/{parts[-1]}"
    if isinstance(body, Mapping) and body.get("id"):
        return f"{body.get('resourceType') or resource_type}/{body['id']}"
    return None


def _from_error(row: _Row, exc: BaseException) -> _Outcome:
    if isinstance(exc, AuthenticationError):
        return _Outcome(row, "pending", error=(
            "authentication failed; kept pending and retried with backoff (check the "
            f"connection's client id, key and scopes): {exc.message}"))
    if isinstance(exc, RetryableFHIRError):
        return _Outcome(row, "pending", error=exc.message, retry_after=exc.retry_after)
    if isinstance(exc, PreconditionFailed) and row.operation == "create":
        return _Outcome(row, "failed", error=(
            f"several resources in the EHR carry identifier {WRITEBACK_SYSTEM}|{row.key}: "
            f"{exc.message}"))
    if isinstance(exc, FatalFHIRError):
        return _Outcome(row, "failed", error=exc.message)
    if isinstance(exc, ChangeError):
        return _Outcome(row, "failed", error=str(exc))
    return _Outcome(row, "pending", error=f"{type(exc).__name__}: {exc}")


def _stops_connection(exc: BaseException) -> bool:
    """Errors that would meet every further request to this EHR now."""
    return isinstance(exc, AuthenticationError | RetryableFHIRError) or not isinstance(
        exc, FHIRError | ChangeError)


# --- creates -------------------------------------------------------------------------------

def _batch_capable(statement: Any) -> bool:
    if not isinstance(statement, Mapping):
        return True
    for rest in statement.get("rest") or []:
        if not isinstance(rest, Mapping):
            continue
        codes = {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, Mapping)}
        if "batch" in codes:
            return True
    return False


def _cache_key(connection: Connection) -> str:
    return f"{connection.name}|{connection.fhir_base}"


async def _supports_batch(api: FHIRApi, connection: Connection,
                          cache: dict[str, bool]) -> bool:
    name = _cache_key(connection)
    if name not in cache:
        try:
            statement = (await api.send(FHIRRequest.get("metadata"))).body
        except FHIRError:
            return True  # unknown: try, and fall back if the batch is refused
        cache[name] = _batch_capable(statement)
    return cache[name]


def _batch_bundle(rows: Sequence[_Row]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": row.resource,
            "request": {"method": "POST", "url": row.resource_type,
                        "ifNoneExist": if_none_exist(row.key)},
        } for row in rows],
    }


def _entry_status(value: object) -> int | None:
    text = str(value or "").strip().split(" ", 1)[0]
    return int(text) if text.isdigit() else None


def _batch_outcomes(rows: Sequence[_Row], response: FHIRResponse) -> list[_Outcome]:
    body = response.body
    entries = body.get("entry") if isinstance(body, Mapping) else None
    if (not isinstance(body, Mapping) or body.get("resourceType") != "Bundle"
            or not isinstance(entries, list) or len(entries) != len(rows)):
        return [_Outcome(row, "pending", error=(
            "the EHR answered the batch with something other than a batch-response of "
            f"{len(rows)} entries")) for row in rows]
    out: list[_Outcome] = []
    for row, entry in zip(rows, entries, strict=True):
        answer = entry.get("response") if isinstance(entry, Mapping) else None
        answer = answer if isinstance(answer, Mapping) else {}
        status = _entry_status(answer.get("status"))
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if status is not None and 200 <= status < 300:
            ref = _ref_of(answer.get("location"), resource, row.resource_type)
            out.append(_Outcome(row, "written", ehr_ref=ref))
            continue
        said = outcome_text(answer.get("outcome")) or outcome_text(resource) or \
            str(answer.get("status") or "no status")
        error = f"POST {row.resource_type} (in a batch): HTTP {status}: {said}"
        if status is None or status in RETRYABLE_STATUSES:
            out.append(_Outcome(row, "pending", error=error))
        elif status == 401:
            out.append(_from_error(row, AuthenticationError(401, error)))
        else:
            out.append(_Outcome(row, "failed", error=error))
    return out


async def _write_batch(
    api: FHIRApi, rows: Sequence[_Row]
) -> tuple[list[_Outcome] | None, BaseException | None]:
    """The outcomes of one batch, and the error when the request as a whole failed;
    ``(None, None)`` when the server refused batches as such."""
    request = FHIRRequest("POST", "", body=_batch_bundle(rows), retry_safe=True)
    try:
        response = await api.send(request)
    except FHIRError as exc:
        if (exc.status in _BATCH_REFUSED and not isinstance(exc, AuthenticationError)
                and isinstance(exc, FatalFHIRError)):
            return None, None
        return [_from_error(row, exc) for row in rows], exc
    except Exception as exc:  # a bug or an unexpected library error: try again later
        return [_from_error(row, exc) for row in rows], exc
    return _batch_outcomes(rows, response), None


async def _write_one(api: FHIRApi, row: _Row) -> _Outcome:
    request = FHIRRequest.post(row.resource_type, row.resource, headers={
        "If-None-Exist": if_none_exist(row.key), "Prefer": "return=representation"})
    response = await api.send(request)
    return _Outcome(row, "written",
                    ehr_ref=_ref_of(response.location, response.body, row.resource_type))


# --- updates -------------------------------------------------------------------------------

async def _update_one(api: FHIRApi, row: _Row) -> _Outcome:
    target = fhir_target(row.target)
    for _ in range(_UPDATE_TRIES):
        current = await api.send(FHIRRequest.get(target))
        resource = current.resource
        if not apply_change(resource, row.resource):
            return _Outcome(row, "written", ehr_ref=target)
        headers = [("Prefer", "return=representation")]
        if current.version_id:
            headers.append(("If-Match", f'W/"{current.version_id}"'))
        put = FHIRRequest("PUT", target, body=resource, headers=tuple(headers))
        try:
            await api.send(put)
        except PreconditionFailed:
            continue  # changed since the read: read again
        return _Outcome(row, "written", ehr_ref=target)
    return _Outcome(row, "pending", error=(
        f"{target} changed under every update ({_UPDATE_TRIES} tries, 412 each time)"))


def fhir_target(target: str | None) -> str:
    parts = (target or "").strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ChangeError(f"update target {target!r} is not Type/id")
    return f"{parts[0]}/{parts[1]}"


# --- per connection ------------------------------------------------------------------------

def _chunks(rows: Sequence[_Row], size: int) -> Iterable[list[_Row]]:
    for start in range(0, len(rows), size):
        yield list(rows[start:start + size])


async def _one_by_one(api: FHIRApi, rows: Sequence[_Row], update: bool,
                      deferred: _Deferred) -> list[_Outcome]:
    out: list[_Outcome] = []
    for n, row in enumerate(rows):
        try:
            outcome = await (_update_one(api, row) if update else _write_one(api, row))
        except Exception as exc:
            out.append(_from_error(row, exc))
            if _stops_connection(exc):
                deferred.error = exc
                deferred.rows.extend(rows[n + 1:])
                break
            continue
        out.append(outcome)
    return out


async def _flush_connection(
    engine: Engine, name: str, rows: list[_Row], *, connection: Connection | None,
    client_for: Callable[[Connection], FHIRApi], batch_support: dict[str, bool],
    now: datetime, result: FlushResult,
) -> None:
    async def record(outcomes: Sequence[_Outcome]) -> None:
        for o in outcomes:
            if o.status == "written":
                result.written += 1
            elif o.status == "failed":
                result.failed += 1
            else:
                result.retried += 1
        await asyncio.to_thread(_record, engine, outcomes, now)
        for o in outcomes:  # after the commit
            count_writeback(o.row.resource_type,
                            o.status if o.status in ("written", "failed") else "retry")

    if connection is None:
        await record([_Outcome(r, "failed", error=f"no [[connections]] entry is called {name!r}")
                      for r in rows])
        return
    try:
        api = client_for(connection)
    except Exception as exc:
        await record([_Outcome(r, "pending", error=(
            f"connection {name!r} cannot be used: {exc}")) for r in rows])
        return
    deferred = _Deferred()
    creates = [r for r in rows if r.operation == "create"]
    updates = [r for r in rows if r.operation != "create"]
    for chunk in _chunks(creates, BATCH_SIZE):
        if deferred.error is not None:
            deferred.rows.extend(chunk)
            continue
        outcomes: list[_Outcome] | None = None
        if await _supports_batch(api, connection, batch_support):
            outcomes, whole = await _write_batch(api, chunk)
            if outcomes is None:
                batch_support[_cache_key(connection)] = False
                log.info("writeback_batch_refused", connection=name)
            elif whole is not None and _stops_connection(whole):
                deferred.error = whole  # a busy server or token trouble: the rest waits too
        if outcomes is None:
            outcomes = await _one_by_one(api, chunk, False, deferred)
        await record(outcomes)
    for chunk in _chunks(updates, BATCH_SIZE):
        if deferred.error is not None:
            deferred.rows.extend(chunk)
            continue
        await record(await _one_by_one(api, chunk, True, deferred))
    if deferred.rows:
        # not tried: they wait like the row that met the problem, and say why
        await record([_from_error(r, deferred.error or RuntimeError("not tried"))
                      for r in deferred.rows])


async def flush(
    engine: Engine,
    settings: Settings,
    client_for: Callable[[Connection], FHIRApi],
    *,
    now: datetime | None = None,
    limit: int = 200,
    batch_support: dict[str, bool] | None = None,
) -> FlushResult:
    """Claim up to ``limit`` due outbox rows and write them to their EHRs (see the module
    docstring). ``client_for`` gives the FHIR client of a connection (the caller owns and
    closes it); ``batch_support`` remembers which servers refuse batches (default: one cache
    for the process)."""
    now = _utc(now or datetime.now(UTC))
    cache = _DEFAULT_BATCH_SUPPORT if batch_support is None else batch_support
    rows = await asyncio.to_thread(_claim, engine, now, limit)
    result = FlushResult(claimed=len(rows))
    if not rows:
        return result
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.connection, []).append(row)
    for name, group in groups.items():
        before = FlushResult(written=result.written, failed=result.failed,
                             retried=result.retried)
        await _flush_connection(engine, name, group, connection=settings.connection(name),
                                client_for=client_for, batch_support=cache, now=now,
                                result=result)
        log.info("writeback_flushed", connection=name, count=len(group),
                 status=(f"written {result.written - before.written}, failed "
                         f"{result.failed - before.failed}, retry "
                         f"{result.retried - before.retried}"))
    return result


def replay(
    engine: Engine,
    *,
    ids: Sequence[int] | None = None,
    failed: bool = False,
    now: datetime | None = None,
) -> int:
    """Make rows due again: every ``failed`` row (``failed=True``) and/or the rows ``ids`` that
    are failed or waiting for a retry. Attempts start again from 0; written rows are never
    written again. Returns how many rows changed."""
    if not ids and not failed:
        raise ValueError("name the rows (ids) or ask for every failed row (failed=True)")
    at = _utc(now or datetime.now(UTC))
    t = ehr_outbox
    conditions = []
    if failed:
        conditions.append(t.c.status == "failed")
    if ids:
        conditions.append(and_(t.c.id.in_(list(ids)), t.c.status.in_(("failed", "pending"))))
    with write_lock(engine), engine.begin() as conn:
        done = conn.execute(
            update(t).where(or_(*conditions))
            .values(status="pending", attempts=0, next_attempt_at=at, updated_at=at)
        )
        return int(done.rowcount or 0)
