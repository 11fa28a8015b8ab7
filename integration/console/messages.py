"""Messages: the list with filters, a message's detail (raw, ACK, mapped resources, timeline
entries; PHI only, audited), replay of one message or of every failed message of a filter, with
progress.

* ``GET /console/messages`` (viewer): the inbox newest first, 50 a page (keyset: ``before=<id>``),
  filtered by ``sender``, ``type``, ``status``, ``since``, ``until`` (UTC) and ``control_id``. No
  patient data for anyone; the error column only for people with PHI access (an error may quote
  a field's value).
* ``GET /console/messages/{id}`` (viewer): the row's metadata; with PHI access also the raw
  message, the ACKs, the error and warnings, the mapped resources and the timeline entries the
  message touched, after the view is written to ``audit_events``.
* ``POST /console/messages/{id}/replay`` (operator): the row back to ``received``, audited,
  dispatched at once (in-process worker or Celery, as for new messages; the sweep otherwise).
* ``POST /console/replays`` (operator): every failed message of the filter (at most
  :data:`REPLAY_MAX`), put back in chunks, recorded as a ``replay_jobs`` row; ``GET
  /console/replays/{job}`` shows its progress and reloads itself until nothing is waiting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import ColumnElement, Connection, Engine, func, insert, or_, select, tuple_

from integration.console.auth import (
    Operator,
    Session,
    Viewer,
    now_for,
    record_view,
    runtime_of,
)
from integration.console.render import HEADERS, MAX_ROW_ID, ConsoleError, render
from integration.console.users import role_allows
from integration.db import write_lock
from integration.identity import REF_SYSTEM_PREFIX
from integration.logs import get_logger
from integration.models import (
    InboxStatus,
    audit_events,
    entry_keys,
    entry_sources,
    inbox,
    mapped_resources,
    replay_jobs,
    timeline_entries,
)
from integration.pipeline import requeue_ids
from integration.runtime import Runtime
from mappings.er7 import ER7Error, decode, split_lines

__all__ = [
    "PAGE_SIZE",
    "REPLAY_MAX",
    "FilterError",
    "Filters",
    "job_progress",
    "list_messages",
    "parse_filters",
    "replay_failed",
    "replay_one",
    "router",
]

log = get_logger("careloop.console.messages")

router = APIRouter(include_in_schema=False, tags=["console"])

PAGE_SIZE = 50
REPLAY_MAX = 50_000
"""The most messages one replay puts back; a larger filter must be narrowed first."""
STATUSES = tuple(s.value for s in InboxStatus)
_CHUNK = 500
_FILTER_FIELDS = ("sender", "type", "status", "since", "until", "control_id")


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the field."""


# ------------------------------------------------------------------------------- filters


def _moment(value: str, name: str) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{name}: {value[:40]!r} is not a date and time "
                          "(YYYY-MM-DDTHH:MM, UTC)") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _sender_condition(value: str) -> ColumnElement[bool]:
    """``APP|FAC`` matches that sender whatever further HD components it sent
    (``APP^1.2.3^ISO|FAC``); ``APP`` alone matches every facility of that application."""
    column = inbox.c.sender
    if "|" not in value:
        app = _like_escape(value)
        return or_(column == value, column.like(app + "|%", escape="\\"),
                   column.like(app + "^%", escape="\\"))
    application, _, facility = value.partition("|")
    app, fac = _like_escape(application), _like_escape(facility)
    return or_(column == value,
               *(column.like(f"{a}|{f}", escape="\\")
                 for a, f in ((app + "^%", fac), (app, fac + "^%"), (app + "^%", fac + "^%"))))


@dataclass(frozen=True)
class Filters:
    """What the messages list is narrowed to (empty values: no condition)."""

    sender: str = ""
    """``MSH-3|MSH-4`` as stored, or the sending application alone (any facility)."""
    type: str = ""
    """MSH-9 (``ADT^A01``) or its message code alone (``ADT``)."""
    status: str = ""
    since: datetime | None = None
    """Received at or after (UTC)."""
    until: datetime | None = None
    """Received before (UTC)."""
    control_id: str = ""

    def conditions(self) -> list[ColumnElement[bool]]:
        c = inbox.c
        out: list[ColumnElement[bool]] = []
        if self.sender:
            out.append(_sender_condition(self.sender))
        if self.type:
            out.append(or_(c.message_type == self.type,
                           c.message_type.like(_like_escape(self.type) + "^%", escape="\\")))
        if self.status:
            out.append(c.status == self.status)
        if self.since is not None:
            out.append(c.received_at >= self.since)
        if self.until is not None:
            out.append(c.received_at < self.until)
        if self.control_id:
            out.append(c.control_id == self.control_id)
        return out

    def form_values(self) -> dict[str, str]:
        """The filters as the form's fields hold them (``datetime-local`` times in UTC)."""
        return {
            "sender": self.sender, "type": self.type, "status": self.status,
            "since": self.since.strftime("%Y-%m-%dT%H:%M") if self.since else "",
            "until": self.until.strftime("%Y-%m-%dT%H:%M") if self.until else "",
            "control_id": self.control_id,
        }

    def query(self, **extra: str | int) -> str:
        """The list's URL query for these filters (empty ones left out), plus ``extra``."""
        pairs: list[tuple[str, str | int]] = [
            (k, v) for k, v in self.form_values().items() if v]
        pairs += [(k, v) for k, v in extra.items() if v != ""]
        return urlencode(pairs)

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in self.form_values().items() if v}


def parse_filters(values: Mapping[str, Any]) -> Filters:
    """Filters from query parameters or form fields; :class:`FilterError` names a bad one."""
    def text(name: str, limit: int) -> str:
        value = values.get(name)
        value = value.strip() if isinstance(value, str) else ""
        if len(value) > limit:
            raise FilterError(f"{name}: at most {limit} characters")
        return value

    status = text("status", 16).lower()
    if status and status not in STATUSES:
        raise FilterError(f"status: one of {', '.join(STATUSES)}")
    since = _moment(text("since", 40), "since")
    until = _moment(text("until", 40), "until")
    if since is not None and until is not None and until <= since:
        raise FilterError("until: must be later than since")
    return Filters(sender=text("sender", 255), type=text("type", 32).upper(), status=status,
                   since=since, until=until, control_id=text("control_id", 199))


def _before(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 18:
        raise FilterError("before: a message id")
    return int(value)


# ------------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class ListedMessage:
    id: int
    received_at: datetime | None
    sender: str
    message_type: str
    control_id: str
    status: str
    ack_code: str
    attempts: int
    error: str
    """First line of the last error ('' unless the reader has PHI access)."""


@dataclass(frozen=True)
class MessagePage:
    rows: list[ListedMessage]
    older: int | None
    """``before`` for the next (older) page, None on the last."""


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def list_messages(engine: Engine, filters: Filters, *, before: int | None = None,
                  with_errors: bool = False, limit: int = PAGE_SIZE) -> MessagePage:
    """A page of the inbox, newest first (keyset on id); never the raw message."""
    c = inbox.c
    query = (select(c.id, c.received_at, c.sender, c.message_type, c.control_id, c.status,
                    c.ack_code, c.attempts, c.last_error)
             .where(*filters.conditions()).order_by(c.id.desc()).limit(limit + 1))
    if before is not None:
        query = query.where(c.id < before)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    listed = [
        ListedMessage(
            id=int(r.id), received_at=_aware(r.received_at), sender=r.sender,
            message_type=r.message_type, control_id=r.control_id, status=r.status,
            ack_code=r.ack_code or "", attempts=int(r.attempts or 0),
            error=((r.last_error or "").splitlines() or [""])[0][:300] if with_errors else "",
        )
        for r in rows[:limit]
    ]
    older = listed[-1].id if len(rows) > limit and listed else None
    return MessagePage(listed, older)


def _failed_query(filters: Filters, limit: int) -> Any:
    conditions = [*replace(filters, status="").conditions(),
                  inbox.c.status == InboxStatus.FAILED.value]
    return select(inbox.c.id).where(*conditions).order_by(inbox.c.id).limit(limit)


def count_failed(engine: Engine, filters: Filters, *, cap: int = REPLAY_MAX + 1) -> int:
    """Failed messages matching ``filters`` (whatever its status), counted up to ``cap``."""
    with engine.connect() as conn:
        return int(conn.execute(
            select(func.count()).select_from(_failed_query(filters, cap).subquery())
        ).scalar_one())


def _replay_offer(session: Session, filters: Filters, engine: Engine) -> int | None:
    if not role_allows(session.person.role, "operator"):
        return None
    if filters.status not in ("", InboxStatus.FAILED.value):
        return None
    return count_failed(engine, filters)


@router.get("/console/messages")
async def messages_page(request: Request, session: Viewer) -> Response:
    engine = runtime_of(request).engine
    params = request.query_params
    try:
        filters = parse_filters(params)
        before = _before(params.get("before"))
    except FilterError as exc:
        raw = {k: str(params.get(k, ""))[:255] for k in _FILTER_FIELDS}
        return render("messages.html", 400, session=session, active="messages", error=str(exc),
                      form=raw, page=MessagePage([], None), filters=Filters(), failed=None,
                      before=None, statuses=STATUSES, replay_max=REPLAY_MAX)
    page = await asyncio.to_thread(list_messages, engine, filters, before=before,
                                   with_errors=session.person.phi)
    failed = await asyncio.to_thread(_replay_offer, session, filters, engine)
    return render("messages.html", session=session, active="messages", error="",
                  form=filters.form_values(), page=page, filters=filters, failed=failed,
                  before=before, statuses=STATUSES, replay_max=REPLAY_MAX)


# ------------------------------------------------------------------------------- one message


@dataclass(frozen=True)
class TouchedEntry:
    id: str
    patient_id: str
    kind: str
    status: str
    summary: str
    time: datetime | None


@dataclass(frozen=True)
class MappedResource:
    resource_type: str
    resource_id: str
    json: str


@dataclass
class MessageDetail:
    id: int
    source: str
    peer: str
    sender: str
    message_type: str
    control_id: str
    version: str
    status: str
    attempts: int
    ack_code: str
    received_at: datetime | None
    processed_at: datetime | None
    next_attempt_at: datetime | None
    # Patient data: loaded only for people with PHI access.
    raw: str = ""
    ack: str = ""
    app_ack: str = ""
    app_ack_sent_at: datetime | None = None
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    resources: list[MappedResource] = field(default_factory=list)
    entries: list[TouchedEntry] = field(default_factory=list)


def _lines(text: str) -> str:
    """An ER7 text with each segment on its own line."""
    return "\n".join(line for line in split_lines(text) if line.strip())


def _display_raw(raw: bytes) -> str:
    try:
        text = decode(raw)
    except ER7Error:  # an unreadable row: show what there is
        text = raw.decode("utf-8", errors="replace")
    return _lines(text)


def load_message(engine: Engine, inbox_id: int, *, phi: bool) -> MessageDetail | None:
    """A message's metadata; with ``phi`` also its contents, resources and entries."""
    c = inbox.c
    columns = [c.id, c.source, c.peer, c.sender, c.message_type, c.control_id, c.version,
               c.status, c.attempts, c.ack_code, c.received_at, c.processed_at,
               c.next_attempt_at]
    if phi:
        columns += [c.raw, c.ack, c.app_ack, c.app_ack_sent_at, c.last_error, c.warnings]
    with engine.connect() as conn:
        row = conn.execute(select(*columns).where(c.id == inbox_id)).first()
        if row is None:
            return None
        detail = MessageDetail(
            id=int(row.id), source=row.source, peer=row.peer, sender=row.sender,
            message_type=row.message_type, control_id=row.control_id, version=row.version,
            status=row.status, attempts=int(row.attempts or 0), ack_code=row.ack_code or "",
            received_at=_aware(row.received_at), processed_at=_aware(row.processed_at),
            next_attempt_at=_aware(row.next_attempt_at))
        if not phi:
            return detail
        detail.raw = _display_raw(bytes(row.raw))
        detail.ack = _lines(row.ack) if row.ack else ""
        detail.app_ack = _lines(row.app_ack) if row.app_ack else ""
        detail.app_ack_sent_at = _aware(row.app_ack_sent_at)
        detail.error = row.last_error or ""
        detail.warnings = [w if isinstance(w, str) else json.dumps(w, ensure_ascii=False)
                           for w in (row.warnings or [])]
        resources = conn.execute(
            select(mapped_resources.c.resource_type, mapped_resources.c.resource_id,
                   mapped_resources.c.resource)
            .where(mapped_resources.c.inbox_id == inbox_id)
            .order_by(mapped_resources.c.id)).all()
        detail.resources = [
            MappedResource(r.resource_type, r.resource_id,
                           json.dumps(r.resource, indent=2, ensure_ascii=False))
            for r in resources]
        detail.entries = _touched_entries(conn, inbox_id, [r.resource for r in resources])
    return detail


def _touched_entries(conn: Connection, inbox_id: int,
                     resources: Sequence[Mapping[str, Any]]) -> list[TouchedEntry]:
    """The timeline entries this message's resources went to.

    The timeline records each version in ``entry_sources`` with ``ref`` ``inbox/<id>#<MSH-10>``.
    Rather than scan that table by ``ref``, the candidates are found by key, as the timeline
    found them: each resource's source reference (``urn:careloop:ref:hl7v2:<type>``, claimed
    for every resource) and its identifiers with a system, in ``entry_keys``; then the ones
    whose sources name this message are kept (``entry_sources`` by entry id, indexed).
    """
    keys: set[tuple[str, str, str]] = set()
    for res in resources:
        rtype, rid = res.get("resourceType"), res.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or not rid:
            continue
        keys.add((rtype, f"{REF_SYSTEM_PREFIX}hl7v2:{rtype}", rid[:255]))
        for ident in res.get("identifier") or []:
            system, value = ident.get("system"), ident.get("value")
            if isinstance(system, str) and system and isinstance(value, str) and value:
                keys.add((rtype, system[:512], value[:255]))
    if not keys:
        return []
    wanted = sorted(keys)
    k = entry_keys.c
    candidates: set[str] = set()
    for start in range(0, len(wanted), _CHUNK):
        candidates.update(
            r.entry_id for r in conn.execute(
                select(k.entry_id).where(
                    tuple_(k.resource_type, k.system, k.value).in_(wanted[start:start + _CHUNK]),
                    k.entry_id.is_not(None)))
        )
    if not candidates:
        return []
    t, s = timeline_entries.c, entry_sources.c
    found: dict[str, TouchedEntry] = {}
    ids = sorted(candidates)
    for start in range(0, len(ids), _CHUNK):
        rows = conn.execute(
            select(t.id, t.patient_id, t.kind, t.status, t.summary, t.time)
            .join(entry_sources, s.entry_id == t.id)
            .where(t.id.in_(ids[start:start + _CHUNK]), s.system == "hl7v2",
                   s.ref.like(f"inbox/{inbox_id}#%")))
        for r in rows:
            found[r.id] = TouchedEntry(r.id, r.patient_id, r.kind, r.status, r.summary,
                                       _aware(r.time))
    return sorted(found.values(), key=lambda e: (e.kind != "patient", e.kind, e.id))


REJECTED_NOTE = ("This message was rejected when it arrived: careloop could not read its MSH "
                 "segment (or its version or character set is not supported), so there is "
                 "nothing to process. It is kept for inspection only; the sender must send a "
                 "corrected message.")


@router.get("/console/messages/{inbox_id:int}")
async def message_page(request: Request, inbox_id: int, session: Viewer) -> Response:
    engine = runtime_of(request).engine
    phi = session.person.phi
    detail = (await asyncio.to_thread(load_message, engine, inbox_id, phi=False)
              if inbox_id <= MAX_ROW_ID else None)
    if detail is None:
        raise ConsoleError(404, "Not found", f"There is no message {inbox_id}.")
    if phi:
        # The view is on record before any of it is shown.
        await asyncio.to_thread(record_view, engine, session, "message", str(inbox_id),
                                now=now_for(request))
        detail = await asyncio.to_thread(load_message, engine, inbox_id, phi=True)
        if detail is None:  # purged meanwhile
            raise ConsoleError(404, "Not found", f"There is no message {inbox_id}.")
    replayed = request.query_params.get("replayed") == "1"
    refresh = replayed and detail.status == InboxStatus.RECEIVED.value
    return render("message.html", session=session, active="messages", m=detail, phi=phi,
                  replayed=replayed, refresh=refresh,
                  can_replay=role_allows(session.person.role, "operator"),
                  rejected_note=REJECTED_NOTE)


# ------------------------------------------------------------------------------- replay


def _dispatch(runtime: Runtime, ids: Sequence[int]) -> None:
    """Hand replayed rows to whatever processes new ones (worker threads or Celery); if that
    fails, the sweep finds them (``next_attempt_at`` is now)."""
    if not ids:
        return
    try:
        runtime.dispatcher.dispatch(list(ids))
    except Exception as exc:
        log.warning("replay_dispatch_failed", count=len(ids), exc_type=type(exc).__name__)


def replay_one(runtime: Runtime, inbox_id: int, *, actor: str, now: datetime) -> bool:
    """Put one message back to be processed and audit it (``console.replay``); False when it
    cannot be (rejected, or gone)."""
    engine = runtime.engine
    with write_lock(engine), engine.begin() as conn:
        ids = requeue_ids(conn, [inbox_id])
        if not ids:
            return False
        conn.execute(insert(audit_events).values(
            at=now, actor=actor[:255], action="console.replay", target_type="message",
            target_id=str(inbox_id)))
    _dispatch(runtime, ids)
    return True


@router.post("/console/messages/{inbox_id:int}/replay")
async def replay_message(request: Request, inbox_id: int, session: Operator) -> Response:
    runtime = runtime_of(request)
    detail = (await asyncio.to_thread(load_message, runtime.engine, inbox_id, phi=False)
              if inbox_id <= MAX_ROW_ID else None)
    if detail is None:
        raise ConsoleError(404, "Not found", f"There is no message {inbox_id}.")
    if detail.status == InboxStatus.REJECTED.value:
        raise ConsoleError(409, "Cannot replay a rejected message", REJECTED_NOTE)
    done = await asyncio.to_thread(replay_one, runtime, inbox_id, actor=session.person.username,
                                   now=now_for(request))
    if not done:
        raise ConsoleError(409, "Cannot replay", f"Message {inbox_id} cannot be replayed now.")
    return RedirectResponse(f"/console/messages/{inbox_id}?replayed=1", status_code=303,
                            headers=HEADERS)


class TooMany(Exception):
    """More failed messages match than one replay takes."""


def replay_failed(runtime: Runtime, filters: Filters, *, actor: str, now: datetime) -> int | None:
    """Put every failed message matching ``filters`` back, in chunks (each committed, then
    dispatched), record the ``replay_jobs`` row and audit it (``console.replay``, target
    ``replay_job``); the job's id, or None when nothing matched. :class:`TooMany` past
    :data:`REPLAY_MAX`."""
    engine = runtime.engine
    with engine.connect() as conn:
        ids = [int(r.id) for r in conn.execute(_failed_query(filters, REPLAY_MAX + 1))]
    if len(ids) > REPLAY_MAX:
        raise TooMany()
    if not ids:
        return None
    replayed: list[int] = []
    for start in range(0, len(ids), _CHUNK):
        with write_lock(engine), engine.begin() as conn:
            chunk = requeue_ids(conn, ids[start:start + _CHUNK],
                                status=InboxStatus.FAILED.value)
        _dispatch(runtime, chunk)
        replayed += chunk
    if not replayed:
        return None
    with write_lock(engine), engine.begin() as conn:
        job_id = int(conn.execute(
            insert(replay_jobs).values(actor=actor[:255], filters=filters.to_json(),
                                       inbox_ids=replayed, total=len(replayed), created_at=now)
            .returning(replay_jobs.c.id)).scalar_one())
        conn.execute(insert(audit_events).values(
            at=now, actor=actor[:255], action="console.replay", target_type="replay_job",
            target_id=str(job_id), detail={"filters": filters.to_json(), "total": len(replayed)}))
    log.info("console_replay", job_id=job_id, total=len(replayed))
    return job_id


@router.post("/console/replays")
async def replay_all(request: Request, session: Operator) -> Response:
    form = await request.form()
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        filters = parse_filters(values)
    except FilterError as exc:
        raise ConsoleError(400, "Cannot replay", f"The filter is not valid: {exc}.") from None
    if filters.status not in ("", InboxStatus.FAILED.value):
        raise ConsoleError(400, "Cannot replay", "Only failed messages are replayed in bulk.")
    try:
        job_id = await asyncio.to_thread(replay_failed, runtime_of(request), filters,
                                         actor=session.person.username, now=now_for(request))
    except TooMany:
        raise ConsoleError(
            400, "Too many messages",
            f"More than {REPLAY_MAX:,} failed messages match this filter; one replay takes at "
            "most that many. Narrow the filter (sender, type, time) and replay in parts."
        ) from None
    if job_id is None:
        raise ConsoleError(409, "Nothing to replay",
                           "No failed message matches this filter any more.")
    return RedirectResponse(f"/console/replays/{job_id}", status_code=303, headers=HEADERS)


@dataclass(frozen=True)
class JobProgress:
    id: int
    actor: str
    created_at: datetime | None
    filters: dict[str, str]
    total: int
    processed: int
    failed: int
    waiting: int
    gone: int
    """Rows no longer there (purged) or rejected."""

    @property
    def done(self) -> int:
        return self.total - self.waiting

    @property
    def finished(self) -> bool:
        return self.waiting == 0


def job_progress(engine: Engine, job_id: int) -> JobProgress | None:
    """A replay job's progress, from its rows' statuses now."""
    with engine.connect() as conn:
        job = conn.execute(select(replay_jobs).where(replay_jobs.c.id == job_id)).first()
        if job is None:
            return None
        ids = [int(i) for i in (job.inbox_ids or [])]
        counts: dict[str, int] = {}
        for start in range(0, len(ids), 1000):
            for status, n in conn.execute(
                    select(inbox.c.status, func.count())
                    .where(inbox.c.id.in_(ids[start:start + 1000]))
                    .group_by(inbox.c.status)):
                counts[status] = counts.get(status, 0) + int(n)
    processed = counts.get(InboxStatus.PROCESSED.value, 0)
    failed = counts.get(InboxStatus.FAILED.value, 0)
    waiting = counts.get(InboxStatus.RECEIVED.value, 0)
    return JobProgress(
        id=int(job.id), actor=job.actor, created_at=_aware(job.created_at),
        filters=dict(job.filters or {}), total=len(ids), processed=processed, failed=failed,
        waiting=waiting, gone=len(ids) - processed - failed - waiting)


@router.get("/console/replays/{job_id:int}")
async def replay_progress(request: Request, job_id: int, session: Viewer) -> Response:
    progress = (await asyncio.to_thread(job_progress, runtime_of(request).engine, job_id)
                if job_id <= MAX_ROW_ID else None)
    if progress is None:
        raise ConsoleError(404, "Not found", f"There is no replay {job_id}.")
    try:
        filters = parse_filters(progress.filters)
    except FilterError:  # stored by an older version: link to every failed message
        filters = Filters()
    return render("replay.html", session=session, active="messages", job=progress,
                  failed_link=replace(filters, status="failed").query())
