"""Signed, expiring links to the patient page: short enough for an SMS.

A token is ``<kind><id>.<expiry>.<signature>``: ``kind`` says what the id names (``t`` a touch,
``o`` a waitlist offer, ``p`` a patient), ``expiry`` is the Unix time in base 36, and the
signature is the first 16 characters (96 bits) of the base64url HMAC-SHA256 of the rest under
the portal secret. Nothing in
the token is a patient identifier: a touch id or careloop's own patient id, which mean nothing
outside careloop. No login: holding the link is the authorisation, so links expire
(``[channels.portal] link_ttl``) and are only ever sent to the patient's own address.

The secret is ``[channels.portal] secret`` when set; otherwise a random one kept in
``keys_dir/portal.secret`` (mode 0600), created on first use, so links survive restarts and are
shared by every replica that shares ``keys_dir``. Rotating it invalidates every link.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = ["LinkError", "LinkSigner", "PortalLink", "load_secret"]

_KINDS = frozenset({"t", "p", "o"})
_SIG_LEN = 16


class LinkError(ValueError):
    """The link is malformed, forged, or expired (``expired`` says which)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class PortalLink:
    kind: str
    """``t``: a touch (its page shows that touch's entry); ``o``: a waitlist offer;
    ``p``: a patient's own page."""
    ident: str
    expires_at: datetime


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class LinkSigner:
    def __init__(self, secret: bytes, base_url: str, ttl: timedelta) -> None:
        if len(secret) < 16:
            raise ValueError("the portal secret must be at least 16 bytes")
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode()[:_SIG_LEN]

    def token(self, kind: str, ident: str | int, *, now: datetime,
              ttl: timedelta | None = None) -> str:
        if kind not in _KINDS:
            raise ValueError(f"unknown link kind {kind!r}")
        ident = str(ident)
        if not ident or "." in ident:
            raise ValueError("a link id must be non-empty and without dots")
        expiry = int((now + (ttl or self.ttl)).timestamp())
        payload = f"{kind}{ident}.{_b36(expiry)}"
        return f"{payload}.{self._sign(payload)}"

    def url(self, kind: str, ident: str | int, *, now: datetime,
            ttl: timedelta | None = None) -> str:
        return f"{self.base_url}/p/{self.token(kind, ident, now=now, ttl=ttl)}"

    def read(self, token: str, *, now: datetime) -> PortalLink:
        """The link's contents; :class:`LinkError` when it is forged, damaged or expired."""
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or parts[0][0] not in _KINDS:
            raise LinkError("this link is not valid")
        payload = f"{parts[0]}.{parts[1]}"
        if not hmac.compare_digest(self._sign(payload), parts[2]):
            raise LinkError("this link is not valid")
        try:
            expires_at = datetime.fromtimestamp(int(parts[1], 36), UTC)
        except (ValueError, OverflowError):
            raise LinkError("this link is not valid") from None
        if now >= expires_at:
            raise LinkError("this link has expired", expired=True)
        return PortalLink(parts[0][0], parts[0][1:], expires_at)


def load_secret(configured: str, keys_dir: Path) -> bytes:
    """The configured secret, or the one kept in ``keys_dir/portal.secret`` (made if absent)."""
    if configured:
        return configured.encode()
    path = keys_dir / "portal.secret"
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes().strip()
    keys_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_urlsafe(32).encode())
    try:
        os.link(tmp, path)  # the first process to get here wins; the others read its secret
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes().strip()
