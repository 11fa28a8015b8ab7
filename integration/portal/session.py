"""The patient's own page is opened with a date of birth: the check, the lock, the session.

A ``p`` link names a patient; holding it is not enough to see their page. The patient first
confirms their date of birth, which is compared (in constant time, as ``YYYY-MM-DD``) with the
``birthDate`` of their record on the timeline. Every wrong answer is counted in
``portal_access``, keyed by the SHA-256 of the link's token: after
``[patient_page] max_dob_attempts`` of them the link locks for good, even for the right date
(the page then says to call the organisation). A right answer resets the count.

A right answer opens a session: the ``careloop_portal`` cookie, whose value is
``<token hash>|<session id>|<expiry>|<signature>``, signed with HMAC-SHA256 under the portal
secret (the one that signs the links; the signed text starts with ``session|``, which no link
payload can). It is HttpOnly, SameSite=Strict, Secure when ``base_url`` is https, limited to
the ``/p/`` paths, and lasts ``[patient_page] session_ttl`` after the last request (each page
renews it: an idle timeout). It only opens the page of the link it was issued for.

Every form on the page carries a CSRF token, the HMAC of the session (its token hash and id,
under a ``csrf|`` prefix): a form posted from anywhere else, without it, is refused. The
session id is random per date-of-birth check, so a token never outlives its session, yet stays
the same when the cookie is renewed (a page left open in another tab still posts).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, select, update

from integration.db import dialect_insert, write_lock
from integration.models import portal_access

__all__ = [
    "COOKIE",
    "Access",
    "Session",
    "SessionKeeper",
    "Verdict",
    "access",
    "is_open",
    "normal_date",
    "token_hash",
    "verify_birth_date",
]

COOKIE = "careloop_portal"
_SEP = "|"


def token_hash(token: str) -> str:
    """The key of a link in ``portal_access`` (and in its session): SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def normal_date(value: object) -> str | None:
    """A full date as ``YYYY-MM-DD`` (a FHIR ``birthDate``, or a :class:`date`); None when it is
    partial (``1980``, ``1980-01``) or not a date."""
    if isinstance(value, date):
        return value.isoformat()
    if not isinstance(value, str):
        return None
    text = value.strip()[:10]
    try:
        return date.fromisoformat(text).isoformat() if len(text) == 10 else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Session:
    token_hash: str
    sid: str
    expires_at: datetime
    value: str
    """The cookie's value."""


class SessionKeeper:
    """Issues, reads and renews sessions and their CSRF tokens."""

    def __init__(self, secret: bytes, ttl: timedelta, *, secure: bool, path: str) -> None:
        if len(secret) < 16:
            raise ValueError("the portal secret must be at least 16 bytes")
        self._secret = secret
        self.ttl = ttl
        self.secure = secure
        self.path = path

    def _mac(self, text: str) -> str:
        digest = hmac.new(self._secret, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, token_hash: str, *, now: datetime, sid: str | None = None) -> Session:
        """A new session for the link (``sid`` given: the same session, renewed)."""
        sid = sid or secrets.token_urlsafe(12)
        expires_at = datetime.fromtimestamp(int((now + self.ttl).timestamp()), UTC)
        payload = _SEP.join((token_hash, sid, _b36(int(expires_at.timestamp()))))
        value = f"{payload}{_SEP}{self._mac('session' + _SEP + payload)}"
        return Session(token_hash, sid, expires_at, value)

    def read(self, cookie: str | None, token_hash: str, *, now: datetime) -> Session | None:
        """The session in ``cookie`` when it is ours, unexpired and for this link."""
        if not cookie or len(cookie) > 256:
            return None
        parts = cookie.split(_SEP)
        if len(parts) != 4:
            return None
        payload = _SEP.join(parts[:3])
        if not hmac.compare_digest(self._mac("session" + _SEP + payload), parts[3]):
            return None
        if not hmac.compare_digest(parts[0], token_hash):
            return None
        try:
            expires_at = datetime.fromtimestamp(int(parts[2], 36), UTC)
        except (ValueError, OverflowError):
            return None
        if now >= expires_at:
            return None
        return Session(parts[0], parts[1], expires_at, cookie)

    def renew(self, session: Session, *, now: datetime) -> Session:
        return self.issue(session.token_hash, now=now, sid=session.sid)

    def slot_mac(self, text: str) -> str:
        """The signature of a slot a page offers (so the form's choice can be trusted)."""
        return self._mac("slot" + _SEP + text)

    def csrf(self, session: Session) -> str:
        return self._mac(_SEP.join(("csrf", session.token_hash, session.sid)))

    def csrf_ok(self, session: Session, given: str) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf(session), given)

    def set_cookie(self, response: Any, session: Session) -> None:
        response.set_cookie(
            COOKIE, session.value, max_age=int(self.ttl.total_seconds()), path=self.path,
            secure=self.secure, httponly=True, samesite="strict",
        )


# --- the date-of-birth check ---------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """A link's row in ``portal_access`` (none yet: no failures, never verified)."""

    failures: int = 0
    locked: bool = False
    verified: bool = False


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["ok", "wrong", "locked"]
    left: int = 0
    """Tries left after a wrong answer."""


def access(conn: Connection, token_hash: str) -> Access:
    row = conn.execute(select(portal_access).where(
        portal_access.c.token_hash == token_hash)).first()
    if row is None:
        return Access()
    return Access(failures=int(row.failures or 0), locked=row.locked_at is not None,
                  verified=row.verified_at is not None)



def verify_birth_date(  # noqa: PLR0917
    engine: Engine,
    token_hash: str,
    patient_id: str,
    given: str,
    birth_date: Any,
    max_attempts: int,
    now: datetime,
) -> Verdict:
    """Check ``given`` (``YYYY-MM-DD``) against the patient's birth date and count the answer.

    ``birth_date``: a callable taking the connection and returning the record's
    ``birthDate`` (read inside the same transaction as the count), or the value itself.
    A locked link stays locked whatever the answer; an unknown or partial birth date never
    matches (the patient is asked to call).
    """
    now = now.astimezone(UTC)
    p = portal_access
    with write_lock(engine), engine.begin() as conn:
        conn.execute(
            dialect_insert(conn, p)
            .values(token_hash=token_hash, patient_id=patient_id, failures=0, updated_at=now)
            .on_conflict_do_nothing(index_elements=["token_hash"])
        )
        query = select(p.c.failures, p.c.locked_at).where(p.c.token_hash == token_hash)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()  # two answers at once are both counted
        row = conn.execute(query).one()
        if row.locked_at is not None:
            return Verdict("locked")
        known = birth_date(conn) if callable(birth_date) else birth_date
        expected = normal_date(known) or ""
        # Constant time: the same work whether the answer is right, wrong or unknowable.
        matched = hmac.compare_digest((expected or "-").encode(), given.encode())
        if matched and expected:
            conn.execute(update(p).where(p.c.token_hash == token_hash).values(
                failures=0, verified_at=now, updated_at=now))
            return Verdict("ok")
        failures = int(row.failures or 0) + 1
        locked = failures >= max_attempts
        conn.execute(update(p).where(p.c.token_hash == token_hash).values(
            failures=failures, locked_at=now if locked else None, updated_at=now))
        return Verdict("locked") if locked else Verdict("wrong", left=max_attempts - failures)


def is_open(conn: Connection, token_hash: str) -> bool:
    """The link was verified and is not locked (a session is only good while this holds)."""
    found = access(conn, token_hash)
    return found.verified and not found.locked
