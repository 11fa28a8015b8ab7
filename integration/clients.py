"""API clients (vendor apps, interface engines) and their secrets.

Secrets are 256-bit random values, so a single SHA-256 is as strong as a slow password hash
for them and costs microseconds per request; they are compared in constant time and shown only
once, when created. Token issuing (OAuth client credentials) builds on this table.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from integration.models import api_clients

__all__ = ["SCOPES", "Client", "ClientRegistry", "hash_secret"]

SCOPES = frozenset({"timeline.read", "outreach.read", "hl7.write", "admin"})


def hash_secret(secret: str) -> str:
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class ClientRegistry:
    """Creates and authenticates clients; caches lookups for a few seconds."""

    def __init__(self, engine: Engine, *, cache_ttl_s: float = 5.0) -> None:
        self._engine = engine
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, str, Client | None]] = {}

    def create(
        self, name: str, scopes: list[str], *, jwks: dict[str, Any] | None = None
    ) -> tuple[str, str]:
        """Register a client; returns its id and its secret (empty for a client that
        authenticates with a key pair only, i.e. when ``jwks`` is given)."""
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            raise ValueError(
                f"unknown scope {unknown[0]!r}; choose from {', '.join(sorted(SCOPES))}"
            )
        if not scopes:
            raise ValueError("give at least one scope")
        if jwks is not None and not jwks.get("keys"):
            raise ValueError("the JWKS has no keys")
        client_id = "cl_" + secrets.token_hex(8)
        secret = "" if jwks is not None else secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            conn.execute(
                insert(api_clients).values(
                    client_id=client_id,
                    name=name,
                    # A key-pair client has no secret: no hash can match an empty one.
                    secret_hash=hash_secret(secret) if secret else "none",
                    jwks=jwks,
                    scopes=" ".join(sorted(set(scopes))),
                    disabled=False,
                    created_at=datetime.now(UTC),
                )
            )
        return client_id, secret

    def disable(self, client_id: str) -> bool:
        with self._engine.begin() as conn:
            result = conn.execute(
                update(api_clients)
                .where(api_clients.c.client_id == client_id)
                .values(disabled=True)
            )
        self._cache.pop(client_id, None)
        return result.rowcount == 1

    def authenticate(self, client_id: str, secret: str) -> Client | None:
        now = time.monotonic()
        cached = self._cache.get(client_id)
        if cached is None or now - cached[0] > self._ttl:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(api_clients).where(api_clients.c.client_id == client_id)
                ).first()
            if row is None or row.disabled:
                cached = (now, "", None)
            else:
                found = Client(row.client_id, row.name, frozenset(row.scopes.split()))
                cached = (now, row.secret_hash, found)
            self._cache[client_id] = cached
        _, stored_hash, client = cached
        # Compare even when the client is unknown, so timing says nothing about which ids exist.
        ok = hmac.compare_digest(stored_hash or "sha256$", hash_secret(secret))
        return client if ok and client is not None else None

    @staticmethod
    def decode_basic(value: str) -> tuple[str, str]:
        """The id and secret in a Basic credential (empty strings when malformed)."""
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return "", ""
        client_id, sep, secret = decoded.partition(":")
        return (client_id, secret) if sep else ("", "")

    def authenticate_basic(self, authorization: str) -> Client | None:
        """``Authorization: Basic base64(client_id:secret)``."""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        client_id, secret = self.decode_basic(value)
        if not client_id:
            return None
        return self.authenticate(client_id, secret)
