"""The console's pages: ``GET``/``POST /console/login``, ``POST /console/logout`` and the
overview, ``GET /console`` (role ``viewer``).

Server-rendered HTML, no JavaScript, no outside asset (one inline style sheet allowed by its
hash in the Content-Security-Policy). The overview shows counts and statuses from the database
and never a patient's data.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine, func, select

from integration.console.auth import (
    COOKIE,
    LOGIN_PATH,
    PATH,
    PRE_COOKIE,
    Session,
    clear_session_cookie,
    csrf_matches,
    end_session,
    load_session,
    now_for,
    require_person,
    secure_cookies,
    set_session_cookie,
    start_session,
)
from integration.console.users import LOCK_FOR, MAX_FAILURES, authenticate
from integration.models import InboxStatus, ehr_outbox, inbox, touches
from integration.pipeline import queue_depth
from integration.runtime import Runtime

__all__ = ["Overview", "overview", "router"]

CSS = """
:root{color-scheme:light;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
body{margin:0;color:#1a1a1a;background:#fff;line-height:1.45}
header,main{max-width:72rem;margin:0 auto;padding:0 1rem}
header{display:flex;flex-wrap:wrap;justify-content:space-between;align-items:center;
 border-bottom:1px solid #d0d0d0}
h1{font-size:1.6rem;margin:.6rem 0}h2{font-size:1.2rem;margin:1.4rem 0 .4rem}
label{display:block;font-weight:600;margin:.6rem 0 .2rem}
input,button{font:inherit;padding:.35rem .5rem;min-height:2.2rem;max-width:100%}
button{background:#0b4f8a;color:#fff;border:1px solid #0b4f8a;border-radius:4px;cursor:pointer}
a{color:#0b4f8a}a:focus,button:focus,input:focus{outline:3px solid #f2a900;outline-offset:2px}
.error{color:#b50909;font-weight:600}.note{color:#444;font-size:.9rem}
.figures{display:flex;flex-wrap:wrap;gap:.75rem;padding:0;list-style:none}
.figures li{border:1px solid #d0d0d0;border-radius:6px;padding:.5rem .8rem;min-width:9rem}
.figures strong{display:block;font-size:1.4rem}
.grid{display:flex;flex-wrap:wrap;gap:0 2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.95rem}
th,td{border:1px solid #d0d0d0;padding:.3rem .6rem;text-align:right}
th[scope=row],th.text{text-align:left}
caption{text-align:left;font-weight:600;padding:.3rem 0}
"""
CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (f"default-src 'none'; style-src 'sha256-{CSS_HASH}'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
}
WINDOW = timedelta(hours=24)
REFUSED = (f"Wrong username or password. After {MAX_FAILURES} wrong tries in a row an account "
           f"is locked for {int(LOCK_FOR.total_seconds() // 60)} minutes.")

_env = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

router = APIRouter(include_in_schema=False, tags=["console"])
Viewer = Annotated[Session, Depends(require_person("viewer"))]


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(name).render(css=Markup(CSS), **context)  # noqa: S704 - a constant
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# ------------------------------------------------------------------------------- sign-in


def _login_page(request: Request, *, status: int = 200, error: str = "",
                username: str = "") -> HTMLResponse:
    pre = request.cookies.get(PRE_COOKIE) or ""
    if not 32 <= len(pre) <= 64:
        pre = secrets.token_urlsafe(32)
    response = _render("login.html", status, csrf=pre, error=error, username=username)
    response.set_cookie(PRE_COOKIE, pre, path=LOGIN_PATH, secure=secure_cookies(request),
                        httponly=True, samesite="strict")
    return response


@router.get("/console/login")
async def login_form(request: Request) -> Response:
    runtime = _runtime(request)
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
    runtime = _runtime(request)
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
    await asyncio.to_thread(end_session, _runtime(request).engine, session,
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


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


_env.filters["age"] = _age


@router.get("/console")
async def console_overview(request: Request, session: Viewer) -> Response:
    now = now_for(request)
    figures = await asyncio.to_thread(overview, _runtime(request).engine, now)
    return _render("overview.html", session=session, csrf=session.csrf, o=figures)
