"""The console's pages: ``GET``/``POST /console/login``, ``POST /console/logout`` and the
overview, ``GET /console`` (role ``viewer``).

Server-rendered HTML, no JavaScript, no outside asset (one inline style sheet allowed by its
hash in the Content-Security-Policy). The overview shows counts and statuses from the database
and never a patient's data.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
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
from integration.console.render import HEADERS, render
from integration.console.users import LOCK_FOR, MAX_FAILURES, authenticate
from integration.models import InboxStatus, ehr_outbox, inbox, touches
from integration.pipeline import queue_depth

__all__ = ["Overview", "overview", "router"]

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
    response = render("login.html", status, csrf=pre, error=error, username=username)
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


@dataclass(frozen=True)
class Overview:
    since: datetime
    now: datetime
    inbox_by_status: list[tuple[str, int]]
    inbox_by_type: list[tuple[str, int]]
    ack_codes: list[tuple[str, int]]
    queues: list[tuple[str, int, float]]
    """Stage, rows waiting, age in seconds of the oldest."""
    outbox_by_status: list[tuple[str, int]]
    touches_by_status: list[tuple[str, int]]
    errors: int
    received: int


def _counts(conn: Any, column: Any, *where: Any) -> list[tuple[str, int]]:
    rows = conn.execute(select(column, func.count()).where(*where).group_by(column)
                        .order_by(func.count().desc(), column)).all()
    return [(str(key) if key else "(none)", int(n)) for key, n in rows]


def overview(engine: Engine, now: datetime) -> Overview:
    """The overview's figures: the last 24 hours before ``now``; no patient data."""
    since = now - WINDOW
    recent = inbox.c.received_at >= since
    with engine.connect() as conn:
        by_status = _counts(conn, inbox.c.status, recent)
        by_type = _counts(conn, inbox.c.message_type, recent)
        acks = _counts(conn, inbox.c.ack_code, recent, inbox.c.ack_code != "")
        outbox = _counts(conn, ehr_outbox.c.status)
        sent = _counts(conn, touches.c.status, touches.c.updated_at >= since)
    depth = queue_depth(engine, now)
    errors = dict(by_status).get(InboxStatus.FAILED.value, 0)
    return Overview(
        since=since, now=now, inbox_by_status=by_status, inbox_by_type=by_type, ack_codes=acks,
        queues=[(stage, n, age) for stage, (n, age) in sorted(depth.items())],
        outbox_by_status=outbox, touches_by_status=sent, errors=errors,
        received=sum(n for _, n in by_status),
    )


@router.get("/console")
async def console_overview(request: Request, session: Viewer) -> Response:
    now = now_for(request)
    figures = await asyncio.to_thread(overview, runtime_of(request).engine, now)
    return render("overview.html", session=session, active="overview", o=figures)
