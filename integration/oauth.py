"""OAuth 2.0 client credentials for vendor apps and engines (``POST /oauth/token``).

Client authentication, as RFC 6749 section 2.3 and RFC 7523 describe it:

* ``client_secret_basic``: ``Authorization: Basic`` with the URL-encoded id and secret;
* ``client_secret_post``: ``client_id`` and ``client_secret`` form fields;
* ``private_key_jwt``: a JWT client assertion signed with the client's private key and checked
  against the public keys registered for it (``careloop clients create --jwks FILE``), the way
  SMART Backend Services clients authenticate: ``iss`` = ``sub`` = client id, ``aud`` = this
  token endpoint, ``exp`` at most five minutes ahead, and a ``jti`` never seen before (each
  assertion is kept until it expires, so a replayed one is refused).

Access tokens are opaque random strings, short-lived (``token_ttl_s``), stored only as their
SHA-256 and checked on every request (with a few seconds of cache), so disabling a client stops
its tokens too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from integration.clients import Client, ClientRegistry
from integration.models import access_tokens, api_clients, used_assertions

__all__ = [
    "ALGORITHMS",
    "ASSERTION_TYPE",
    "IssuedToken",
    "OAuthError",
    "TokenService",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services requires RS384 and ES384; the 256 and 512 variants cost nothing more.
ALGORITHMS = ["RS384", "ES384", "RS256", "ES256", "RS512", "ES512", "PS384"]
MAX_ASSERTION_LIFETIME = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=60)


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error: ``error`` code, description, and the HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str

    def as_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenService:
    """Authenticates clients at the token endpoint and checks bearer tokens."""

    def __init__(
        self,
        engine: Engine,
        clients: ClientRegistry,
        *,
        token_url: str,
        ttl_s: int = 300,
        cache_ttl_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._clients = clients
        self.token_url = token_url
        self._ttl = ttl_s
        self._cache_ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, Client | None, datetime | None]] = {}

    # -- the token endpoint -----------------------------------------------------------------
    def issue(self, form: dict[str, str], authorization: str = "") -> IssuedToken:
        client = self._authenticate(form, authorization)
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            raise OAuthError(
                "unsupported_grant_type",
                f"grant_type {grant!r} is not supported; use client_credentials"
                if grant
                else "grant_type is required (client_credentials)",
            )
        scope = self._granted_scope(client, form.get("scope", ""))
        token = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(delete(access_tokens).where(access_tokens.c.expires_at < now))
            conn.execute(
                insert(access_tokens).values(
                    token_hash=_token_hash(token),
                    client_id=client.client_id,
                    scopes=scope,
                    expires_at=now + timedelta(seconds=self._ttl),
                    created_at=now,
                )
            )
        return IssuedToken(token, self._ttl, scope)

    @staticmethod
    def _granted_scope(client: Client, requested: str) -> str:
        wanted = set(requested.split())
        if not wanted:
            return " ".join(sorted(client.scopes))
        refused = sorted(s for s in wanted if not client.allows(s))
        if refused:
            raise OAuthError("invalid_scope", f"scope {refused[0]!r} is not granted to this client")
        return " ".join(sorted(wanted))

    def _authenticate(self, form: dict[str, str], authorization: str) -> Client:
        assertion_type = form.get("client_assertion_type")
        if assertion_type is not None:
            if assertion_type != ASSERTION_TYPE:
                raise OAuthError(
                    "invalid_client", f"client_assertion_type must be {ASSERTION_TYPE}", 401
                )
            return self._authenticate_assertion(form.get("client_assertion", ""),
                                                form.get("client_id"))
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "basic" and value:
            client_id, secret = self._clients.decode_basic(value)
            # RFC 6749 2.3.1: both parts are form-urlencoded before being joined.
            client = self._clients.authenticate(unquote(client_id), unquote(secret))
        elif "client_secret" in form:
            client = self._clients.authenticate(form.get("client_id", ""), form["client_secret"])
        else:
            raise OAuthError("invalid_client", "client authentication is required", 401)
        if client is None:
            raise OAuthError("invalid_client", "unknown client, wrong secret or disabled client",
                             401)
        return client

    def _authenticate_assertion(self, assertion: str, claimed_id: str | None) -> Client:
        fail = OAuthError("invalid_client", "the client assertion is not valid", 401)
        client_id = _unverified_issuer(assertion)
        if not client_id or (claimed_id and claimed_id != client_id):
            raise fail
        found = self._client_keys(client_id)
        if found is None:
            raise fail
        client, keys = found
        try:
            token = jwt.decode(assertion, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError):
            raise OAuthError("invalid_client", "the client assertion signature does not verify",
                             401) from None
        claims = token.claims
        now = datetime.now(UTC)
        self._check_claims(claims, client_id, now)
        self._remember_jti(client_id, str(claims["jti"]),
                           datetime.fromtimestamp(int(claims["exp"]), UTC))
        return client

    def _check_claims(self, claims: dict[str, Any], client_id: str, now: datetime) -> None:
        def bad(why: str) -> OAuthError:
            return OAuthError("invalid_client", f"the client assertion {why}", 401)

        if claims.get("sub") != client_id:
            raise bad("sub must equal iss (the client id)")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.token_url not in audiences:
            raise bad(f"aud must be {self.token_url}")
        try:
            exp = datetime.fromtimestamp(int(claims["exp"]), UTC)
        except (KeyError, TypeError, ValueError):
            raise bad("has no valid exp") from None
        if exp < now - CLOCK_SKEW:
            raise bad("has expired")
        if exp > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
            raise bad("lives longer than five minutes")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and datetime.fromtimestamp(nbf, UTC) > now + CLOCK_SKEW:
            raise bad("is not valid yet")
        if not claims.get("jti"):
            raise bad("has no jti")

    def _client_keys(self, client_id: str) -> tuple[Client, KeySet] | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(api_clients).where(api_clients.c.client_id == client_id)
            ).first()
        if row is None or row.disabled or not row.jwks:
            return None
        try:
            keys = KeySet.import_key_set(row.jwks)
        except (JoseError, ValueError, TypeError):
            return None
        return Client(row.client_id, row.name, frozenset(row.scopes.split())), keys

    def _remember_jti(self, client_id: str, jti: str, expires: datetime) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    delete(used_assertions).where(
                        used_assertions.c.expires_at < datetime.now(UTC) - CLOCK_SKEW
                    )
                )
                conn.execute(
                    insert(used_assertions).values(
                        client_id=client_id, jti=jti[:255], expires_at=expires + CLOCK_SKEW
                    )
                )
        except IntegrityError:
            raise OAuthError(
                "invalid_client", "the client assertion was already used (jti replayed)", 401
            ) from None

    # -- resource requests ------------------------------------------------------------------
    def check_bearer(self, token: str) -> tuple[Client, datetime] | None:
        """The client and expiry for a live access token, or None (unknown, expired,
        client disabled)."""
        key = _token_hash(token)
        now_m = time.monotonic()
        cached = self._cache.get(key)
        if cached is None or now_m - cached[0] > self._cache_ttl:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(
                        access_tokens.c.scopes,
                        access_tokens.c.expires_at,
                        api_clients.c.client_id,
                        api_clients.c.name,
                        api_clients.c.disabled,
                    )
                    .join(api_clients, api_clients.c.client_id == access_tokens.c.client_id)
                    .where(access_tokens.c.token_hash == key)
                ).first()
            if row is None or row.disabled:
                cached = (now_m, None, None)
            else:
                expires = row.expires_at
                if expires.tzinfo is None:
                    expires = expires.replace(tzinfo=UTC)
                cached = (now_m, Client(row.client_id, row.name,
                                        frozenset(row.scopes.split())), expires)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = cached
        _, client, expires_at = cached
        if client is None or expires_at is None or expires_at <= datetime.now(UTC):
            return None
        return client, expires_at


def _unverified_issuer(assertion: str) -> str:
    """``iss`` read from the assertion before its signature is checked, only to find whose
    keys to check it with. Nothing else read this way is trusted."""
    parts = assertion.split(".")
    if len(parts) != 3:
        return ""
    segment = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment))
    except (ValueError, TypeError):
        return ""
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else ""
