"""Console sessions: the ``careloop_console`` cookie, CSRF tokens, timeouts, and
:func:`require_person`.

Signing in opens a session: a random token in the ``careloop_console`` cookie (HttpOnly,
SameSite=Strict, ``Path=/console``, Secure when ``base_url`` is https), stored only as its
SHA-256 in ``console_sessions`` with a random CSRF token. A session ends after
:data:`IDLE_TIMEOUT` without a request (each request renews it) and at the latest
:data:`MAX_AGE` after sign-in; signing out deletes it. Every POST must carry the session's CSRF
token (form field ``csrf`` or header ``X-CSRF-Token``), or it is refused with 403.

The sign-in form itself is protected by a pre-session cookie (``careloop_console_pre``): the form
carries the same random value in a hidden field, and a sign-in posted without it is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Engine, delete, insert, select, update

from integration.console.render import ConsoleError
from integration.console.users import Person, audit, role_allows
from integration.db import write_lock
from integration.models import audit_events, console_sessions, console_users
from integration.runtime import Runtime

__all__ = [
    "COOKIE",
    "IDLE_TIMEOUT",
    "LOGIN_PATH",
    "MAX_AGE",
    "PRE_COOKIE",
    "Admin",
    "Operator",
    "Session",
    "Viewer",
    "end_session",
    "load_session",
    "now_for",
    "record_view",
    "require_person",
    "require_phi",
    "runtime_of",
    "secure_cookies",
    "start_session",
]

COOKIE = "careloop_console"
PRE_COOKIE = "careloop_console_pre"
PATH = "/console"
LOGIN_PATH = "/console/login"
IDLE_TIMEOUT = timedelta(minutes=30)
MAX_AGE = timedelta(hours=12)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Session:
    id: str
    """SHA-256 of the cookie's token (the row's key)."""
    person: Person
    csrf: str
    expires_at: datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def start_session(engine: Engine, person: Person, *, now: datetime) -> tuple[str, Session]:
    """A new session for ``person``: the cookie's token and the session."""
    token = secrets.token_urlsafe(32)
    session = Session(token_hash(token), person, secrets.token_urlsafe(32), now + MAX_AGE)
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(console_sessions).values(
            id=session.id, user_id=person.id, csrf=session.csrf, created_at=now,
            last_seen_at=now, expires_at=session.expires_at))
    return token, session


def load_session(engine: Engine, token: str | None, *, now: datetime) -> Session | None:
    """The live session of ``token`` (renewing its idle timeout), or None: unknown, idle for
    :data:`IDLE_TIMEOUT`, past :data:`MAX_AGE`, or its user disabled (then it is deleted)."""
    if not token or len(token) > 128:
        return None
    sid = token_hash(token)
    s, u = console_sessions, console_users
    with write_lock(engine), engine.begin() as conn:
        row = conn.execute(
            select(s.c.csrf, s.c.last_seen_at, s.c.expires_at, u.c.id, u.c.username, u.c.role,
                   u.c.disabled, u.c.phi)
            .select_from(s.join(u, u.c.id == s.c.user_id, isouter=True))
            .where(s.c.id == sid)
        ).first()
        if row is None:
            return None
        expires_at = _aware(row.expires_at)
        if (row.id is None or row.disabled or now >= expires_at
                or now >= _aware(row.last_seen_at) + IDLE_TIMEOUT):
            conn.execute(delete(s).where(s.c.id == sid))
            return None
        conn.execute(update(s).where(s.c.id == sid).values(last_seen_at=now))
    return Session(sid, Person(int(row.id), row.username, row.role, bool(row.phi)), row.csrf,
                   expires_at)


def require_phi(session: Session) -> None:
    """403 unless the person may see patient data."""
    if not session.person.phi:
        raise ConsoleError(403, "Patient data hidden",
                           "Seeing patient data needs PHI access; ask an administrator.")


def record_view(engine: Engine, session: Session, target_type: str, target_id: str, *,
                now: datetime, detail: dict[str, object] | None = None) -> None:
    """Write the audit row for a view of patient data (who, what, when): call it before the
    page that shows the data is answered."""
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(audit_events).values(
            at=now, actor=session.person.username[:255], action="console.phi_view",
            target_type=target_type, target_id=str(target_id)[:255], detail=detail))


def end_session(engine: Engine, session: Session, *, now: datetime) -> None:
    with write_lock(engine), engine.begin() as conn:
        conn.execute(delete(console_sessions).where(console_sessions.c.id == session.id))
        audit(conn, session.person.username, "console.logout", now)


def now_for(request: Request) -> datetime:
    """The time (tests set ``app.state.console_clock``, a callable returning an aware time)."""
    clock: Callable[[], datetime] | None = getattr(request.app.state, "console_clock", None)
    return (clock() if clock is not None else datetime.now(UTC)).astimezone(UTC)


def secure_cookies(request: Request) -> bool:
    runtime: Runtime = request.app.state.runtime
    return runtime.settings.base_url.lower().startswith("https://")


def set_session_cookie(request: Request, response: Any, token: str) -> None:
    response.set_cookie(COOKIE, token, path=PATH, secure=secure_cookies(request),
                        httponly=True, samesite="strict")


def clear_session_cookie(request: Request, response: Any) -> None:
    response.delete_cookie(COOKIE, path=PATH, secure=secure_cookies(request), httponly=True,
                           samesite="strict")


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(
        expected.encode(), (given or "").encode())


async def posted_csrf(request: Request) -> str | None:
    header = request.headers.get("x-csrf-token")
    if header:
        return header
    if request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get("csrf")
        return value if isinstance(value, str) else None
    return None


def require_person(role: str) -> Callable[[Request], Awaitable[Session]]:
    """A dependency: the signed-in person's session, with at least ``role``.

    No live session: 303 to the sign-in page (a POST: 403). A POST (any unsafe method) without
    the session's CSRF token: 403. A role below ``role``: 403. Each refusal is an HTML page
    (:class:`integration.console.render.ConsoleError`).
    """

    async def dependency(request: Request) -> Session:
        runtime: Runtime = request.app.state.runtime
        session = await asyncio.to_thread(
            load_session, runtime.engine, request.cookies.get(COOKIE), now=now_for(request))
        if session is None:
            if request.method in SAFE_METHODS:
                raise ConsoleError(303, "Sign in first")
            raise ConsoleError(403, "Not signed in",
                               "Your session has ended. Sign in again and repeat the action.")
        request.state.console_session = session
        if request.method not in SAFE_METHODS and not csrf_matches(
                session.csrf, await posted_csrf(request)):
            raise ConsoleError(403, "Refused",
                               "The form's security token is missing or wrong. Nothing was "
                               "changed. Reload the page and try again.")
        if not role_allows(session.person.role, role):
            raise ConsoleError(403, "Not allowed",
                               f"This needs the {role} role; you are {session.person.role}.")
        return session

    return dependency


def runtime_of(request: Request) -> Runtime:
    """The app's runtime (engine, settings)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


Viewer = Annotated[Session, Depends(require_person("viewer"))]
"""A page's signed-in person, any role."""
Operator = Annotated[Session, Depends(require_person("operator"))]
"""An action that changes work (replay, retry): operator or admin."""
Admin = Annotated[Session, Depends(require_person("admin"))]
"""An action that changes settings or people: admin only."""
