"""Audit log: ``GET /console/audit`` (roles ``operator`` and ``admin``; a viewer gets 403).

Who did what and saw whom: the ``audit_events`` rows, newest first, in keyset pages on
``(at, id)`` (index ``ix_audit_events_at``: a deep page costs what the first does, and rows
written meanwhile never shift the pages still to come), filtered by actor, action (exact, or a
prefix ending in ``*``: ``console.*``), target type, target id, and a period (``since`` and
``until``: ``YYYY-MM-DD`` or an ISO 8601 date-time, UTC when no offset is given; a date as
``until`` includes that whole day). Each row shows when, the actor, the action, the target
and the detail as compact JSON.

Why operators and not viewers: the log names the people who signed in and the patients (by
careloop id) each person looked at, which is the record of the console's own use rather than
of the data flowing through it; operators, who replay and retry, answer for that work and
need to see it. Viewers see counts only. The log itself holds no patient data (ids, actions
and details without names or values), so PHI access is not needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine, select, tuple_

from integration.console.auth import Operator, runtime_of
from integration.console.render import MAX_ROW_ID, render
from integration.models import audit_events

__all__ = ["PAGE_SIZE", "AuditFilters", "AuditPage", "compact", "read_audit", "router"]

router = APIRouter(include_in_schema=False, tags=["console"])

PAGE_SIZE = 50
DETAIL_CHARS = 400
_FIELD_CHARS = 255


class FilterError(ValueError):
    """A filter that cannot be read (a bad date, a cursor this server did not make)."""


@dataclass(frozen=True)
class AuditFilters:
    actor: str = ""
    action: str = ""
    target_type: str = ""
    target_id: str = ""
    since: datetime | None = None
    until: datetime | None = None
    after: tuple[datetime, int] | None = None
    """The keyset cursor: the last row seen (its ``at`` and ``id``)."""


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    detail: str


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    next: str | None
    """The cursor of the next (older) page, if there is one."""


def compact(detail: object, limit: int = DETAIL_CHARS) -> str:
    """A detail as compact JSON (sorted keys), cut at ``limit`` characters."""
    if detail is None:
        return ""
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def encode_cursor(at: datetime, row_id: int) -> str:
    raw = f"{at.astimezone(UTC).isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        stamp, _, row_id = raw.partition("|")
        at = datetime.fromisoformat(stamp)
        number = int(row_id)
        if not 0 <= number <= MAX_ROW_ID:
            raise ValueError(row_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FilterError("the page link is not one this server made") from exc
    return (at if at.tzinfo else at.replace(tzinfo=UTC)), number


def parse_moment(name: str, text: str, *, end: bool) -> datetime | None:
    """``YYYY-MM-DD`` (midnight UTC; as an end, the next midnight) or an ISO 8601 date-time
    (UTC when it has no offset); None for an empty value."""
    value = text.strip()
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"{name}: write YYYY-MM-DD or an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def read_audit(engine: Engine, f: AuditFilters, limit: int = PAGE_SIZE) -> AuditPage:
    """One page of the log, newest first."""
    a = audit_events
    query = select(a.c.id, a.c.at, a.c.actor, a.c.action, a.c.target_type, a.c.target_id,
                   a.c.detail)
    if f.actor:
        query = query.where(a.c.actor == f.actor)
    if f.action.endswith("*"):
        prefix = f.action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(a.c.action.like(prefix + "%", escape="\\"))
    elif f.action:
        query = query.where(a.c.action == f.action)
    if f.target_type:
        query = query.where(a.c.target_type == f.target_type)
    if f.target_id:
        query = query.where(a.c.target_id == f.target_id)
    if f.since is not None:
        query = query.where(a.c.at >= f.since)
    if f.until is not None:
        query = query.where(a.c.at < f.until)
    if f.after is not None:
        query = query.where(tuple_(a.c.at, a.c.id) < f.after)
    query = query.order_by(a.c.at.desc(), a.c.id.desc()).limit(limit + 1)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    out = [AuditRow(int(r.id), _aware(r.at), r.actor, r.action, r.target_type or "",
                    r.target_id or "", compact(r.detail)) for r in rows]
    nxt = encode_cursor(out[-1].at, out[-1].id) if more and out else None
    return AuditPage(out, nxt)


def _text(params: Any, name: str) -> str:
    value = params.get(name) or ""
    return str(value).strip()[:_FIELD_CHARS]


@router.get("/console/audit")
async def console_audit(request: Request, session: Operator) -> Response:
    """The audit log (table ``audit``), filtered by the query's ``actor``, ``action``,
    ``target_type``, ``target_id``, ``since`` and ``until``; ``cursor`` pages."""
    params = request.query_params
    form = {name: _text(params, name) for name in
            ("actor", "action", "target_type", "target_id", "since", "until")}
    try:
        filters = AuditFilters(
            actor=form["actor"], action=form["action"], target_type=form["target_type"],
            target_id=form["target_id"],
            since=parse_moment("since", form["since"], end=False),
            until=parse_moment("until", form["until"], end=True),
            after=decode_cursor(params["cursor"][:200]) if params.get("cursor") else None,
        )
    except FilterError as exc:
        return render("audit.html", 400, session=session, active="audit", form=form,
                      error=str(exc), page=AuditPage([], None), next_href=None,
                      first_href=None)
    page = await asyncio.to_thread(read_audit, runtime_of(request).engine, filters)
    kept = {k: v for k, v in form.items() if v}
    next_href = (f"/console/audit?{urlencode({**kept, 'cursor': page.next})}"
                 if page.next else None)
    first_href = f"/console/audit?{urlencode(kept)}" if filters.after is not None else None
    return render("audit.html", session=session, active="audit", form=form, error=None,
                  page=page, next_href=next_href, first_href=first_href)
