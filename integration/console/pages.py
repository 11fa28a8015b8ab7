"""The console's pages: ``GET``/``POST /console/login``, ``POST /console/logout`` and the
overview, ``GET /console`` (role ``viewer``).

Server-rendered HTML, no JavaScript, no outside asset (one inline style sheet allowed by its
hash in the Content-Security-Policy). The overview shows counts and statuses from the database
and never a patient's data: messages per minute (the last hour) and per hour (24 hours) by
sender and type, ACK codes, rows waiting per stage with the oldest's age, and the errors of
the last 24 hours with links to the latest failed messages (their error text only for people
with PHI access). Charts are inline SVG (:mod:`integration.console.charts`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup
from sqlalchemy import Engine, func, select

from integration.console.auth import (
    COOKIE,
    LOGIN_PATH,
    PATH,
    PRE_COOKIE,
    Viewer,
    clear_session_cookie,
    csrf_matches,
    end_session,
    load_session,
    now_for,
    runtime_of,
    secure_cookies,
    set_session_cookie,
    start_session,
)
from integration.console.charts import (
    Point,
    bar_chart,
    bucket_key,
    bucket_starts,
    column_chart,
    series,
    sparkline,
)
from integration.console.render import HEADERS, render
from integration.console.users import LOCK_FOR, MAX_FAILURES, authenticate
from integration.models import InboxStatus, channel_events, ehr_outbox, inbox, touches

__all__ = ["Overview", "Stage", "Trend", "overview", "router", "stages"]

WINDOW = timedelta(hours=24)
REFUSED = (f"Wrong username or password. After {MAX_FAILURES} wrong tries in a row an account "
           f"is locked for {int(LOCK_FOR.total_seconds() // 60)} minutes.")

router = APIRouter(include_in_schema=False, tags=["console"])


# ------------------------------------------------------------------------------- sign-in


def _login_page(request: Request, *, status: int = 200, error: str = "",
                username: str = "") -> HTMLResponse:
    pre = request.cookies.get(PRE_COOKIE) or ""
    if not 32 <= len(pre) <= 64:
        pre = secrets.token_urlsafe(32)
    oidc = runtime_of(request).settings.console_oidc  # [console_oidc]: "Sign in with ..."
    response = render("login.html", status, csrf=pre, error=error, username=username,
                      oidc_name=oidc.name if oidc is not None else "")
    response.set_cookie(PRE_COOKIE, pre, path=LOGIN_PATH, secure=secure_cookies(request),
                        httponly=True, samesite="strict")
    return response


@router.get("/console/login")
async def login_form(request: Request) -> Response:
    runtime = runtime_of(request)
    session = await asyncio.to_thread(load_session, runtime.engine, request.cookies.get(COOKIE),
                                      now=now_for(request))
    if session is not None:
        return RedirectResponse(PATH, status_code=303, headers=HEADERS)
    return _login_page(request)


@router.post("/console/login")
async def login(request: Request) -> Response:
    form = await request.form()
    given = form.get("csrf")
    if not csrf_matches(request.cookies.get(PRE_COOKIE) or "",
                        given if isinstance(given, str) else None):
        return _login_page(request, status=403,
                           error="The form had expired. Please sign in again.")
    username = form.get("username")
    password = form.get("password")
    username = username.strip()[:64] if isinstance(username, str) else ""
    password = password[:1024] if isinstance(password, str) else ""
    runtime = runtime_of(request)
    now = now_for(request)
    result = await asyncio.to_thread(authenticate, runtime.engine, username, password, now=now)
    if not result.ok or result.person is None:
        return _login_page(request, status=401, error=REFUSED, username=username)
    token, _session = await asyncio.to_thread(start_session, runtime.engine, result.person,
                                              now=now)
    response = RedirectResponse(PATH, status_code=303, headers=HEADERS)
    set_session_cookie(request, response, token)
    response.delete_cookie(PRE_COOKIE, path=LOGIN_PATH)
    return response


@router.post("/console/logout")
async def logout(request: Request, session: Viewer) -> Response:
    await asyncio.to_thread(end_session, runtime_of(request).engine, session,
                            now=now_for(request))
    response = RedirectResponse(LOGIN_PATH, status_code=303, headers=HEADERS)
    clear_session_cookie(request, response)
    return response


# ------------------------------------------------------------------------------- overview

TOP = 5
"""Senders and message types shown by name on the overview; the rest are summed as other."""
LATEST_ERRORS = 5
OTHER = "(other)"
STAGES: tuple[tuple[str, str], ...] = (
    ("intake", "HL7 v2 messages stored and acknowledged, not yet processed"),
    ("fhir", "FHIR notifications stored, not yet processed"),
    ("outreach", "touches due to be sent now (scheduled, due time passed)"),
    ("writeback", "writes owed to the EHR (pending or being sent)"),
    ("replies", "provider webhooks and replies stored, not yet processed"),
)
"""The stages whose waiting rows the overview counts, with what waits in each."""
_BAD_ACKS = frozenset({"AE", "AR", "CE", "CR"})


@dataclass(frozen=True)
class Stage:
    """Rows waiting in one stage, and the age in seconds of the oldest."""

    key: str
    label: str
    waiting: int
    oldest_s: float


@dataclass(frozen=True)
class Trend:
    """Messages from one sender (or of one message type): the last hour, the last 24 hours,
    and per hour (oldest first)."""

    name: str
    last_hour: int
    day: int
    per_hour: list[float]


@dataclass(frozen=True)
class LatestError:
    """A failed or rejected message; ``error`` is the processing error (shown to PHI users
    only)."""

    id: int
    received_at: datetime
    status: str
    message_type: str
    sender: str
    error: str


@dataclass(frozen=True)
class Overview:
    since: datetime
    now: datetime
    inbox_by_status: list[tuple[str, int]]
    inbox_by_type: list[tuple[str, int]]
    ack_codes: list[tuple[str, int]]
    queues: list[tuple[str, int, float]]
    """Stage, rows waiting, age in seconds of the oldest (the same as :attr:`stages`)."""
    outbox_by_status: list[tuple[str, int]]
    touches_by_status: list[tuple[str, int]]
    errors: int
    """Messages that failed in the last 24 hours."""
    received: int
    stages: list[Stage] = field(default_factory=list)
    per_minute: list[Point] = field(default_factory=list)
    """Messages received per minute, the last 60 minutes (the last one still filling)."""
    per_hour: list[Point] = field(default_factory=list)
    """Messages received per hour, the last 24 hours (the last one still filling)."""
    senders: list[Trend] = field(default_factory=list)
    types: list[Trend] = field(default_factory=list)
    error_counts: list[tuple[str, str, int]] = field(default_factory=list)
    """(id, what, count) for the last 24 hours: messages failed and rejected, write-backs the
    EHR rejected, touches that failed."""
    errors_per_hour: list[Point] = field(default_factory=list)
    latest_errors: list[LatestError] = field(default_factory=list)


def _counts(conn: Any, column: Any, *where: Any) -> list[tuple[str, int]]:
    rows = conn.execute(select(column, func.count()).where(*where).group_by(column)
                        .order_by(func.count().desc(), column)).all()
    return [(str(key) if key else "(none)", int(n)) for key, n in rows]


HOUR_KEY = "%Y-%m-%d %H"
"""An hour bucket's key, as :func:`integration.console.charts.bucket_key` makes it."""


def _ranked(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Counts, most first (then by name), as the tables list them."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _stage(conn: Any, now: datetime, key: str, label: str, when: Any,
           *where: Any) -> Stage:
    count, oldest = conn.execute(select(func.count(), func.min(when)).where(*where)).one()
    age = max(0.0, (now - _aware(oldest)).total_seconds()) if oldest is not None else 0.0
    return Stage(key, label, int(count), age)


def stages(conn: Any, now: datetime) -> list[Stage]:
    """Rows waiting per stage (see :data:`STAGES`) and how long the oldest has waited: each
    a count on an indexed status column."""
    labels = dict(STAGES)
    received = inbox.c.status == InboxStatus.RECEIVED.value
    return [
        _stage(conn, now, "intake", labels["intake"], inbox.c.received_at, received,
               inbox.c.source != "fhir"),
        _stage(conn, now, "fhir", labels["fhir"], inbox.c.received_at, received,
               inbox.c.source == "fhir"),
        _stage(conn, now, "outreach", labels["outreach"], touches.c.due_at,
               touches.c.status == "scheduled", touches.c.due_at <= now),
        _stage(conn, now, "writeback", labels["writeback"], ehr_outbox.c.created_at,
               ehr_outbox.c.status.in_(("pending", "sending"))),
        _stage(conn, now, "replies", labels["replies"], channel_events.c.received_at,
               channel_events.c.status == "pending"),
    ]


def _trends(per_bucket: dict[str, dict[str, int]], last_hour: dict[str, int],
            hours: list[datetime]) -> list[Trend]:
    """The :data:`TOP` names by messages in 24 hours, then the rest summed as ``(other)``."""
    totals: dict[str, int] = defaultdict(int)
    for counts in per_bucket.values():
        for name, n in counts.items():
            totals[name] += n
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    shown, rest = ranked[:TOP], ranked[TOP:]

    def trend(label: str, names: list[str]) -> Trend:
        per_hour = [float(sum(per_bucket.get(h.strftime(HOUR_KEY), {}).get(n, 0)
                              for n in names)) for h in hours]
        return Trend(label, sum(last_hour.get(n, 0) for n in names),
                     sum(totals[n] for n in names), per_hour)

    out = [trend(name, [name]) for name in shown]
    if rest:
        out.append(trend(OTHER, rest))
    return out


def _name(value: object) -> str:
    return str(value) if value else "(none)"


def overview(engine: Engine, now: datetime) -> Overview:
    """The overview's figures: the last 24 hours before ``now`` (per minute for the last
    hour); no patient data. Grouping happens in SQL over the ``received_at`` index."""
    since = now - WINDOW
    hours = bucket_starts(now, "hour", 24)
    minutes = bucket_starts(now, "minute", 60)
    failing_statuses = (InboxStatus.FAILED.value, InboxStatus.REJECTED.value)
    with engine.connect() as conn:
        dialect = conn.dialect.name
        outbox = _counts(conn, ehr_outbox.c.status)
        sent = _counts(conn, touches.c.status, touches.c.updated_at >= since)
        waiting = stages(conn, now)

        # One pass over the 24 hours of the inbox (the received_at index) gives every count
        # the page shows: grouped by hour, sender, type, status and ACK code, summed here.
        hour = bucket_key(dialect, inbox.c.received_at, "hour")
        in_window = inbox.c.received_at >= since
        by_sender: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        bad_hours: dict[str, int] = defaultdict(int)
        status_n: dict[str, int] = defaultdict(int)
        type_n: dict[str, int] = defaultdict(int)
        ack_n: dict[str, int] = defaultdict(int)
        for key, name, kind, status, ack, inside, count in conn.execute(
                select(hour, inbox.c.sender, inbox.c.message_type, inbox.c.status,
                       inbox.c.ack_code, in_window, func.count())
                .where(inbox.c.received_at >= min(hours[0], since))
                .group_by(hour, inbox.c.sender, inbox.c.message_type, inbox.c.status,
                          inbox.c.ack_code, in_window)):
            n = int(count)
            if key >= hours[0].strftime(HOUR_KEY):
                by_sender[key][_name(name)] += n
                by_kind[key][_name(kind)] += n
                if status in failing_statuses:
                    bad_hours[key] += n
            if inside:
                status_n[_name(status)] += n
                type_n[_name(kind)] += n
                if ack:
                    ack_n[str(ack)] += n
        by_status, by_type, acks = _ranked(status_n), _ranked(type_n), _ranked(ack_n)
        failing = inbox.c.status.in_(failing_statuses)

        minute = bucket_key(dialect, inbox.c.received_at, "minute")
        per_minute: dict[str, int] = defaultdict(int)
        sender_hour: dict[str, int] = defaultdict(int)
        kind_hour: dict[str, int] = defaultdict(int)
        for key, name, kind, n in conn.execute(
                select(minute, inbox.c.sender, inbox.c.message_type, func.count())
                .where(inbox.c.received_at >= minutes[0])
                .group_by(minute, inbox.c.sender, inbox.c.message_type)):
            per_minute[key] += int(n)
            sender_hour[_name(name)] += int(n)
            kind_hour[_name(kind)] += int(n)

        writeback_rejected = conn.execute(select(func.count()).where(
            ehr_outbox.c.status == "failed", ehr_outbox.c.updated_at >= since)).scalar_one()
        touches_failed = conn.execute(select(func.count()).where(
            touches.c.status == "failed", touches.c.updated_at >= since)).scalar_one()
        latest = [
            LatestError(int(r.id), _aware(r.received_at), r.status, _name(r.message_type),
                        _name(r.sender), (r.last_error or "")[:300])
            for r in conn.execute(
                select(inbox.c.id, inbox.c.received_at, inbox.c.status, inbox.c.message_type,
                       inbox.c.sender, inbox.c.last_error)
                .where(failing).order_by(inbox.c.received_at.desc(), inbox.c.id.desc())
                .limit(LATEST_ERRORS))
        ]
    counted = dict(by_status)
    errors = counted.get(InboxStatus.FAILED.value, 0)
    per_hour_total = {key: sum(counts.values()) for key, counts in by_sender.items()}
    return Overview(
        since=since, now=now, inbox_by_status=by_status, inbox_by_type=by_type, ack_codes=acks,
        queues=[(s.key, s.waiting, s.oldest_s) for s in waiting],
        outbox_by_status=outbox, touches_by_status=sent, errors=errors,
        received=sum(n for _, n in by_status),
        stages=waiting,
        per_minute=series(per_minute, minutes, "minute"),
        per_hour=series(per_hour_total, hours, "hour"),
        senders=_trends(by_sender, sender_hour, hours),
        types=_trends(by_kind, kind_hour, hours),
        error_counts=[
            ("messages-failed", "Messages failed", errors),
            ("messages-rejected", "Messages rejected (unreadable)",
             counted.get(InboxStatus.REJECTED.value, 0)),
            ("writeback-rejected", "Write-backs the EHR rejected", int(writeback_rejected)),
            ("touches-failed", "Touches that failed", int(touches_failed)),
        ],
        errors_per_hour=series(bad_hours, hours, "hour", bad=True),
        latest_errors=latest,
    )


def _charts(o: Overview) -> dict[str, Markup]:
    return {
        "minute": column_chart(
            "chart-minute", "Messages per minute, the last hour", o.per_minute,
            unit="messages", note="Whole clock minutes in UTC; the last one is still filling."),
        "hour": column_chart(
            "chart-hour", "Messages per hour, the last 24 hours", o.per_hour, unit="messages",
            note="Whole clock hours in UTC; the last one is still filling."),
        "acks": bar_chart(
            "chart-acks", "ACK codes sent, the last 24 hours",
            [Point(code, n, code in _BAD_ACKS) for code, n in o.ack_codes],
            unit="messages", label_head="ACK code"),
        "queues": bar_chart(
            "chart-queues", "Waiting per stage",
            [Point(s.key, s.waiting, title=f"{s.key} ({s.label})") for s in o.stages],
            unit="rows", label_head="Stage"),
        "errors": column_chart(
            "chart-errors", "Failed and rejected messages per hour, the last 24 hours",
            o.errors_per_hour, unit="messages"),
    }


@router.get("/console")
async def console_overview(request: Request, session: Viewer) -> Response:
    """Counts, queues and errors of the last 24 hours, with charts: no patient data (the
    latest errors' text only for people with PHI access)."""
    now = now_for(request)
    figures = await asyncio.to_thread(overview, runtime_of(request).engine, now)
    return render("overview.html", session=session, active="overview", o=figures,
                  charts=_charts(figures), stage_labels=STAGES,
                  sparkline=sparkline, top=TOP)
