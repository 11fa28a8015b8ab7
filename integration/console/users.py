"""Console users: local accounts with argon2id-hashed passwords, roles, and a lockout.

A user has one role, ``viewer`` < ``operator`` < ``admin``: each sees what the one before it
sees. Independently of the role, ``phi`` grants the sight of patient data (raw messages, mapped
resources, timelines); without it a person sees counts, statuses and ids only.

After :data:`MAX_FAILURES` wrong passwords in a row the account is locked for
:data:`LOCK_FOR` (even the right password is refused meanwhile); a right password resets the
count. An unknown user, a wrong password, a disabled or a locked account all get the same
answer, and all cost one argon2 verification, so neither the answer nor its time tells them
apart. Every attempt is written to ``audit_events`` (actor: the username given; never the
password).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from integration.db import write_lock
from integration.models import audit_events, console_users

__all__ = [
    "LOCK_FOR",
    "MAX_FAILURES",
    "ROLES",
    "Login",
    "Person",
    "UserExists",
    "audit",
    "authenticate",
    "create_user",
    "disable_user",
    "role_allows",
]

ROLES = ("viewer", "operator", "admin")
"""From least to most: a role may do everything the roles before it may."""
Role = Literal["viewer", "operator", "admin"]
MAX_FAILURES = 5
LOCK_FOR = timedelta(minutes=15)
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

_hasher = PasswordHasher()  # argon2id, the library's (RFC 9106 low-memory) parameters
_dummy_hash: str | None = None


class UserExists(ValueError):
    pass


@dataclass(frozen=True)
class Person:
    """A signed-in (or signing-in) user."""

    id: int
    username: str
    role: str
    phi: bool = False
    """May see patient data (raw messages, resources, timelines); every such view is audited."""


@dataclass(frozen=True)
class Login:
    ok: bool
    person: Person | None = None


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` is at least ``needed``."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


def audit(conn: Connection, actor: str, action: str, now: datetime,
          detail: dict[str, object] | None = None) -> None:
    conn.execute(insert(audit_events).values(
        at=now, actor=actor[:255], action=action, target_type="console_user",
        target_id=actor[:255], detail=detail))


def create_user(engine: Engine, username: str, role: str, password: str | None = None, *,
                phi: bool = False, now: datetime | None = None) -> str:
    """Add a user; returns the password (a generated one when ``password`` is None)."""
    if not USERNAME.match(username):
        raise ValueError("a username is 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise ValueError(f"role: one of {', '.join(ROLES)}")
    if password is None:
        password = secrets.token_urlsafe(15)
    if len(password) < 12:
        raise ValueError("a password needs at least 12 characters")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    hashed = _hasher.hash(password)
    with write_lock(engine), engine.begin() as conn:
        if conn.execute(select(console_users.c.id).where(
                console_users.c.username == username)).first() is not None:
            raise UserExists(f"a user {username} already exists")
        conn.execute(insert(console_users).values(
            username=username, password_hash=hashed, role=role, disabled=False,
            failed_logins=0, created_at=now, phi=phi))
        audit(conn, "cli", "console.user_created", now,
              {"username": username, "role": role, "phi": phi})
    return password


def first_admin(engine: Engine, *, now: datetime | None = None) -> str | None:
    """On a first start with no console user at all: create ``admin`` (role admin, with PHI
    access: someone must be able to look at a failed message) and return
    its generated password, to be shown once; None when any user exists (or another replica
    made it first)."""
    with engine.connect() as conn:
        if conn.execute(select(console_users.c.id).limit(1)).first() is not None:
            return None
    try:
        return create_user(engine, "admin", "admin", phi=True, now=now)
    except (UserExists, IntegrityError):
        return None


def disable_user(engine: Engine, username: str, *, now: datetime | None = None) -> bool:
    """Disable a user (False when there is none); their sessions stop working at once."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    with write_lock(engine), engine.begin() as conn:
        done = conn.execute(update(console_users).where(
            console_users.c.username == username).values(disabled=True)).rowcount
        if done:
            audit(conn, "cli", "console.user_disabled", now, {"username": username})
    return bool(done)


def _verify(hashed: str | None, password: str) -> bool:
    global _dummy_hash  # noqa: PLW0603 - computed once, on first use
    if hashed is None:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash(secrets.token_urlsafe(16))
        hashed = _dummy_hash
        password = "\x00" + password  # never matches
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def authenticate(engine: Engine, username: str, password: str, *,
                 now: datetime | None = None) -> Login:
    """Check a username and password, count a failure, lock after :data:`MAX_FAILURES`."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    u = console_users
    with write_lock(engine), engine.begin() as conn:
        query = select(u).where(u.c.username == username)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()  # two attempts at once are both counted
        row = conn.execute(query).first()
        matched = _verify(row.password_hash if row is not None else None, password)
        if row is None:
            audit(conn, username, "console.login_failed", now, {"reason": "unknown"})
            return Login(False)
        locked_until = _aware(row.locked_until)
        locked = locked_until is not None and now < locked_until
        if matched and not locked and not row.disabled:
            values: dict[str, object] = {
                "failed_logins": 0, "locked_until": None, "last_login_at": now}
            if _hasher.check_needs_rehash(row.password_hash):
                values["password_hash"] = _hasher.hash(password)
            conn.execute(update(u).where(u.c.id == row.id).values(**values))
            audit(conn, username, "console.login", now)
            return Login(True, Person(int(row.id), row.username, row.role, bool(row.phi)))
        if locked:
            reason = "locked"
        elif row.disabled:
            reason = "disabled"
        else:
            reason = "wrong_password"
            # A lock that has run out starts a fresh count.
            failures = (0 if locked_until is not None else int(row.failed_logins or 0)) + 1
            lock = failures >= MAX_FAILURES
            conn.execute(update(u).where(u.c.id == row.id).values(
                failed_logins=0 if lock else failures,
                locked_until=now + LOCK_FOR if lock else None))
            if lock:
                reason = "wrong_password_locked"
        audit(conn, username, "console.login_failed", now, {"reason": reason})
        return Login(False)
