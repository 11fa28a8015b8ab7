"""OpenID Connect sign-in against the hospital's identity provider, when ``[console_oidc]`` is
set: ``GET /console/login/oidc`` and ``GET /console/login/oidc/callback``.

The authorization code flow with PKCE (S256), as OpenID Connect Core 1.0 section 3.1 has it:

1. ``GET /console/login/oidc`` reads the provider's metadata
   (``{issuer}/.well-known/openid-configuration``, fetched on first use with a timeout and kept
   for an hour) and answers 302 to its authorization endpoint with ``state``, ``nonce`` and a
   ``code_challenge``. The browser gets the ``careloop_console_oidc`` cookie (HttpOnly,
   SameSite=Lax, so that it comes back with the provider's cross-site redirect; ``Path=
   /console/login``, 10 minutes): the random state, when it was issued, and an HMAC over both.
   The nonce and the PKCE verifier are HMACs of the state too, so nothing is stored on the
   server and the verifier never leaves it. The HMAC key is derived from the portal secret
   (``[channels.portal] secret``, else ``keys_dir/portal.secret``), so every replica agrees.
2. ``GET /console/login/oidc/callback?code&state``: the cookie's MAC, age and state (compared in
   constant time) are checked and the state is spent (a second use in this process is refused;
   across replicas the provider's single-use code refuses it). The code is exchanged at the
   token endpoint (``client_secret_basic`` or ``client_secret_post``, as the metadata offers;
   ``none`` for a public client) with the verifier. The ID token's signature is checked
   against the provider's JWKS (kept for an hour; fetched again once for a ``kid`` it does not
   hold), then ``iss``, ``aud``/``azp``, ``exp``/``iat`` (60 s leeway), ``nonce`` and
   ``at_hash``.
3. The claims decide the role (``roles_claim`` values through ``role_map``, the highest wins;
   none: refused) and PHI access (any of ``phi_values``). The ``console_users`` row is found by
   ``oidc_subject`` (``issuer|sub``) or made, named from ``username_claim``, else ``email``,
   else ``sub`` (``-2``, ``-3``... when the name is taken). Its password hash is an argon2id
   hash of a random secret nobody keeps, so a password sign-in never works for it (and costs
   the same as any wrong password). Role and PHI follow the claims at each sign-in; a disabled
   user stays refused. Then the console session starts as after a password sign-in.

Every outcome is audited (``console.login`` with ``{"method": "oidc"}``, or
``console.login_failed`` with the reason); a refusal is an HTML page with a link back to the
sign-in page and stores nothing else. The session cookie is SameSite=Strict, which a browser
does not send on the rest of a navigation that started on the provider's site, so the callback
answers with a page that moves on to ``/console`` itself (``<meta http-equiv="refresh">``)
rather than a redirect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from argon2 import PasswordHasher
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from integration.console.auth import (
    LOGIN_PATH,
    PATH,
    now_for,
    runtime_of,
    secure_cookies,
    set_session_cookie,
    start_session,
)
from integration.console.render import HEADERS, ConsoleError, render
from integration.console.users import ROLES, USERNAME, Person, audit
from integration.db import write_lock
from integration.logs import get_logger
from integration.models import console_users
from integration.portal.links import load_secret
from integration.settings import ConsoleOidc, Settings

__all__ = [
    "CALLBACK_PATH",
    "COOKIE",
    "START_PATH",
    "STATE_TTL",
    "Provider",
    "router",
]

log = get_logger("careloop.console.oidc")

START_PATH = "/console/login/oidc"
CALLBACK_PATH = "/console/login/oidc/callback"
COOKIE = "careloop_console_oidc"
STATE_TTL = timedelta(minutes=10)
"""How long a sign-in may take at the provider."""
LEEWAY_S = 60
"""Clock skew allowed for the ID token's ``exp`` and ``iat``."""
HTTP_TIMEOUT = httpx.Timeout(10.0)
METADATA_TTL_S = 3600.0
JWKS_TTL_S = 3600.0
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                        "ES256", "ES384", "ES512", "EdDSA", "Ed25519"})
"""Asymmetric signatures only: never ``none``, nor an HMAC keyed with the client secret."""
SYSTEM_ACTOR = "oidc"
"""The audit actor while the person is not known yet (the state or the token failed)."""

router = APIRouter(include_in_schema=False, tags=["console"])

_hasher = PasswordHasher()


class ProviderUnavailable(Exception):
    """The provider cannot be reached or answers something unusable (502)."""


class SignInRefused(Exception):
    """A sign-in that must not go through: the page's status, title and message, the audit
    reason, and who it was for when the ID token told us."""

    def __init__(self, status: int, title: str, message: str, reason: str, *,
                 actor: str = SYSTEM_ACTOR, detail: dict[str, object] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.title = title
        self.message = message
        self.reason = reason
        self.actor = actor
        self.detail = detail or {}
        self.recorded = False
        """Whether its audit row was already written."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _secure_url(url: object) -> bool:
    """An https URL, or plain http to a loopback address (a provider in tests)."""
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------- the state


class StateSigner:
    """The ``careloop_console_oidc`` cookie: ``v1.<state>.<issued>.<mac>``, and the nonce and
    PKCE verifier that follow from the state (HMACs, so the server keeps nothing)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the state key must be at least 16 bytes")
        self._key = key

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def issue(self, now: datetime) -> tuple[str, str]:
        """A new state and the cookie that carries it."""
        state = secrets.token_urlsafe(32)
        issued = str(int(now.timestamp()))
        return state, f"v1.{state}.{issued}.{self._mac(f'cookie|{state}|{issued}')}"

    def nonce(self, state: str) -> str:
        return self._mac(f"nonce|{state}")

    def verifier(self, state: str) -> str:
        """43 characters of base64url: a valid PKCE ``code_verifier`` (RFC 7636 section 4.1)."""
        return self._mac(f"verifier|{state}")

    def check(self, cookie: str | None, given: str | None, now: datetime) -> tuple[str, float]:
        """The state the cookie carries and when it expires (a POSIX time), when it is ours,
        fresh and equal to ``given``; else :class:`SignInRefused`."""
        if not cookie:
            raise _refused_state("state_missing")
        parts = cookie.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[2].isdigit() or not hmac.compare_digest(
                self._mac(f"cookie|{parts[1]}|{parts[2]}").encode(), parts[3].encode()):
            raise _refused_state("state_invalid")
        state, issued = parts[1], int(parts[2])
        age = now.timestamp() - issued
        if age > STATE_TTL.total_seconds() or age < -LEEWAY_S:
            raise _refused_state("state_expired")
        if not given or not hmac.compare_digest(state.encode(), given.encode()):
            raise _refused_state("state_mismatch")
        return state, issued + STATE_TTL.total_seconds()


def _refused_state(reason: str) -> SignInRefused:
    return SignInRefused(
        400, "Sign-in expired",
        "This sign-in could not be matched to one started in this browser, or it took longer "
        f"than {int(STATE_TTL.total_seconds() // 60)} minutes. Nothing was changed. Start "
        "again from the sign-in page.", reason)


# ------------------------------------------------------------------------------- the provider


@dataclass(frozen=True)
class Metadata:
    """What careloop uses of the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    """ID token signature algorithms both sides accept."""
    auth_method: str
    """``client_secret_basic``, ``client_secret_post`` or ``none``."""


def read_metadata(config: ConsoleOidc, document: object) -> Metadata:
    """Check the discovery document against the settings; :class:`ProviderUnavailable` when
    careloop cannot use it."""
    if not isinstance(document, dict):
        raise ProviderUnavailable("the discovery document is not a JSON object")
    issuer = document.get("issuer")
    if not isinstance(issuer, str) or issuer.rstrip("/") != config.issuer.rstrip("/"):
        raise ProviderUnavailable(f"the discovery document names issuer {issuer!r}, "
                                  f"not {config.issuer!r}")
    endpoints = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = document.get(name)
        if not _secure_url(value):
            raise ProviderUnavailable(f"the discovery document's {name} is not an https URL")
        endpoints[name] = str(value)
    challenges = document.get("code_challenge_methods_supported")
    if isinstance(challenges, list) and "S256" not in challenges:
        raise ProviderUnavailable("the provider does not offer PKCE with S256")
    offered = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    algorithms = tuple(a for a in offered if isinstance(a, str) and a in ALGORITHMS)
    if not algorithms:
        raise ProviderUnavailable("the provider signs ID tokens with no algorithm careloop "
                                  "accepts (asymmetric ones only)")
    methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    if not config.client_secret:
        auth_method = "none"
    elif "client_secret_basic" in methods:
        auth_method = "client_secret_basic"
    elif "client_secret_post" in methods:
        auth_method = "client_secret_post"
    else:
        raise ProviderUnavailable("the token endpoint takes neither client_secret_basic nor "
                                  "client_secret_post")
    return Metadata(issuer=issuer, algorithms=algorithms, auth_method=auth_method, **endpoints)


@dataclass
class Provider:
    """One configured provider: its cached metadata and keys, the state signer, and the states
    spent in this process. Kept on ``app.state`` for the app's life."""

    config: ConsoleOidc
    redirect_uri: str
    signer: StateSigner
    _metadata: tuple[float, Metadata] | None = None
    _jwks: tuple[float, KeySet] | None = None
    _spent: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Provider:
        assert settings.console_oidc is not None
        portal_secret = load_secret(settings.channels.portal.secret, settings.keys_dir)
        key = hmac.new(portal_secret, b"careloop console oidc state v1", hashlib.sha256).digest()
        return cls(settings.console_oidc, settings.base_url.rstrip("/") + CALLBACK_PATH,
                   StateSigner(key))

    async def _get_json(self, url: str) -> object:
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                response = await http.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"GET {url}: {type(exc).__name__}") from exc

    async def metadata(self) -> Metadata:
        """The provider's metadata, fetched at most once an hour while it is usable."""
        if self._metadata is not None and time.monotonic() < self._metadata[0]:
            return self._metadata[1]
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        metadata = read_metadata(self.config, await self._get_json(url))
        self._metadata = (time.monotonic() + METADATA_TTL_S, metadata)
        return metadata

    async def keys(self, *, refresh: bool = False) -> KeySet:
        """The provider's signing keys (its JWKS), fetched again when ``refresh``."""
        if not refresh and self._jwks is not None and time.monotonic() < self._jwks[0]:
            return self._jwks[1]
        metadata = await self.metadata()
        document = await self._get_json(metadata.jwks_uri)
        try:
            keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise ProviderUnavailable(f"the provider's JWKS cannot be read: {exc}") from exc
        self._jwks = (time.monotonic() + JWKS_TTL_S, keys)
        return keys

    def spend(self, state: str, expires_at: float, now: datetime) -> None:
        """Refuse a state seen before in this process; remember this one until it expires."""
        moment = now.timestamp()
        for old in [s for s, until in self._spent.items() if until < moment]:
            del self._spent[old]
        if state in self._spent:
            raise _refused_state("state_replayed")
        self._spent[state] = expires_at

    def authorization_url(self, metadata: Metadata, state: str) -> str:
        verifier = self.signer.verifier(state)
        url: str = prepare_grant_uri(
            metadata.authorization_endpoint, self.config.client_id, "code",
            redirect_uri=self.redirect_uri, scope=list(self.config.scopes), state=state,
            nonce=self.signer.nonce(state), code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256")
        return url

    async def exchange(self, metadata: Metadata, code: str, state: str) -> dict[str, Any]:
        """The token response for ``code``: its JSON, with an ``id_token``."""
        body = prepare_token_request("authorization_code", code=code,
                                     redirect_uri=self.redirect_uri,
                                     code_verifier=self.signer.verifier(state))
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Accept": "application/json"}
        auth = ClientAuth(self.config.client_id, self.config.client_secret, metadata.auth_method)
        uri, headers, body = auth.prepare("POST", metadata.token_endpoint, headers, body)
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                response = await http.post(uri, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"POST {uri}: {type(exc).__name__}") from exc
        if response.status_code >= 500:
            raise ProviderUnavailable(f"POST {uri}: HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise SignInRefused(
                400, "Sign-in failed",
                f"{self.config.name} did not accept careloop's request to complete the sign-in. "
                "Nothing was changed. Start again from the sign-in page.",
                "token_refused", detail={"error": str(error or response.status_code)[:64]})
        if not isinstance(answer.get("id_token"), str):
            raise SignInRefused(400, "Sign-in failed",
                                f"{self.config.name} sent no ID token. Start again from the "
                                "sign-in page.", "no_id_token")
        return answer

    async def id_token_claims(self, metadata: Metadata, id_token: str, *, state: str,
                              access_token: object, now: datetime) -> dict[str, Any]:
        """The ID token's claims once its signature and claims are checked."""
        keys = await self.keys()
        try:
            try:
                token = jwt.decode(id_token, keys, algorithms=list(metadata.algorithms))
            except InvalidKeyIdError:
                keys = await self.keys(refresh=True)  # the provider may have rotated its keys
                token = jwt.decode(id_token, keys, algorithms=list(metadata.algorithms))
        except BadSignatureError:
            raise _refused_token("bad_signature") from None
        except InvalidKeyIdError:
            raise _refused_token("unknown_key") from None
        except JoseError as exc:
            raise _refused_token(f"bad_id_token:{exc.error}") from None
        claims = CodeIDToken(
            token.claims, token.header,
            options={
                "iss": {"essential": True, "value": metadata.issuer},
                "aud": {"essential": True, "value": self.config.client_id},
                "sub": {"essential": True},
                "exp": {"essential": True},
                "iat": {"essential": True},
                "nonce": {"essential": True, "value": self.signer.nonce(state)},
            },
            params={"nonce": self.signer.nonce(state), "client_id": self.config.client_id,
                    "access_token": access_token if isinstance(access_token, str) else None})
        try:
            claims.validate(now=int(now.timestamp()), leeway=LEEWAY_S)
        except ExpiredTokenError:
            raise _refused_token("expired") from None
        except MissingClaimError as exc:
            raise _refused_token(f"missing_{exc.claim}"[:64]) from None
        except ClaimError as exc:
            raise _refused_token(f"invalid_{exc.claim}"[:64]) from None
        except JoseError as exc:
            raise _refused_token(f"bad_id_token:{exc.error}") from None
        return dict(token.claims)


def _refused_token(reason: str) -> SignInRefused:
    return SignInRefused(
        403, "Sign-in refused",
        "The identity provider's answer did not pass careloop's checks, so you were not signed "
        "in. Start again from the sign-in page; if this keeps happening, tell the administrator "
        "(the reason is in the audit log).", reason)


# ------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claimed:
    """Who the ID token says signed in, and what the settings give them."""

    subject: str
    """``issuer|sub``: the row's ``oidc_subject``."""
    username: str
    """The name a new row gets (before de-duplication)."""
    role: str | None
    phi: bool
    values: tuple[str, ...]
    """The ``roles_claim`` values."""


def claim_values(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    """The strings a claim holds (one string or a list); a dotted name reaches into objects."""
    value: object = claims.get(name)
    if value is None and "." in name:
        value = claims
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def username_hint(text: str) -> str:
    """``text`` made into a valid console username (letters, digits, ``._@-``, 64 at most)."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._@-") else "-"
                      for c in text.strip())
    cleaned = cleaned.lstrip("._@-")[:64]
    return cleaned if USERNAME.match(cleaned) else "user"


def read_claims(config: ConsoleOidc, claims: dict[str, Any]) -> Claimed:
    """Role, PHI access and username from the ID token's (checked) claims."""
    values = claim_values(claims, config.roles_claim)
    ranks = [ROLES.index(config.role_map[v]) for v in values if v in config.role_map]
    name = next((c for c in (claims.get(config.username_claim), claims.get("email"),
                             claims.get("sub")) if isinstance(c, str) and c.strip()), "user")
    return Claimed(
        subject=f"{claims['iss']}|{claims['sub']}",
        username=username_hint(name),
        role=ROLES[max(ranks)] if ranks else None,
        phi=any(v in config.phi_values for v in values),
        values=values,
    )


# ------------------------------------------------------------------------------- the user


def _free_username(conn: Connection, hint: str) -> str:
    u = console_users
    for n in range(1, 1000):
        suffix = "" if n == 1 else f"-{n}"
        candidate = hint[:64 - len(suffix)] + suffix
        if conn.execute(select(u.c.id).where(u.c.username == candidate)).first() is None:
            return candidate
    return f"user-{secrets.token_hex(8)}"


def sign_in_user(engine: Engine, claimed: Claimed, *, now: datetime) -> Person:
    """Find or make the ``console_users`` row of ``claimed``, bring its role and PHI access up
    to date and audit the sign-in; :class:`SignInRefused` for a disabled user."""
    assert claimed.role is not None
    u = console_users
    refusal: SignInRefused | None = None
    for _attempt in range(3):
        with engine.connect() as conn:
            known = conn.execute(select(u.c.id).where(u.c.oidc_subject == claimed.subject)
                                 ).first() is not None
        # Hashing is slow: done outside the write lock, and only for a new user.
        unusable = None if known else _hasher.hash(secrets.token_urlsafe(32))
        try:
            with write_lock(engine), engine.begin() as conn:
                query = select(u).where(u.c.oidc_subject == claimed.subject)
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update()
                row = conn.execute(query).first()
                if row is None:
                    if unusable is None:
                        continue  # removed meanwhile: make it again
                    username = _free_username(conn, claimed.username)
                    new_id = conn.execute(insert(u).values(
                        username=username, password_hash=unusable, role=claimed.role,
                        disabled=False, failed_logins=0, created_at=now, last_login_at=now,
                        phi=claimed.phi, oidc_subject=claimed.subject)).inserted_primary_key
                    assert new_id is not None
                    audit(conn, username, "console.user_created", now,
                          {"username": username, "role": claimed.role, "phi": claimed.phi,
                           "method": "oidc"})
                    audit(conn, username, "console.login", now, {"method": "oidc"})
                    return Person(int(new_id[0]), username, claimed.role, claimed.phi)
                if row.disabled:
                    refusal = SignInRefused(
                        403, "Account disabled",
                        "Your careloop console account is disabled. Ask an administrator.",
                        "disabled", actor=row.username)
                    audit_failure(conn, refusal, now=now)
                    refusal.recorded = True
                    break
                if row.role != claimed.role or bool(row.phi) != claimed.phi:
                    audit(conn, row.username, "console.user_updated", now,
                          {"method": "oidc", "role": claimed.role, "phi": claimed.phi,
                           "previous_role": row.role, "previous_phi": bool(row.phi)})
                conn.execute(update(u).where(u.c.id == row.id).values(
                    role=claimed.role, phi=claimed.phi, last_login_at=now))
                audit(conn, row.username, "console.login", now, {"method": "oidc"})
                return Person(int(row.id), row.username, claimed.role, claimed.phi)
        except IntegrityError:
            continue  # another sign-in made the row or took the name first: look again
    if refusal is not None:
        raise refusal
    raise RuntimeError("the console user could not be stored (three conflicting attempts)")


def audit_failure(conn: Connection, refusal: SignInRefused, *, now: datetime) -> None:
    """The ``console.login_failed`` row of a refused sign-in."""
    audit(conn, refusal.actor, "console.login_failed", now,
          {"method": "oidc", "reason": refusal.reason, **refusal.detail})


def record_refusal(engine: Engine, refusal: SignInRefused, *, now: datetime) -> None:
    """:func:`audit_failure` in its own transaction (unless the user's row already has it)."""
    if refusal.recorded:
        return
    with write_lock(engine), engine.begin() as conn:
        audit_failure(conn, refusal, now=now)


# ------------------------------------------------------------------------------- routes


async def provider_of(request: Request) -> Provider:
    """The app's :class:`Provider` (made on first use); 404 when ``[console_oidc]`` is unset."""
    settings = runtime_of(request).settings
    if settings.console_oidc is None:
        raise ConsoleError(404, "Not found",
                           "Sign-in through an identity provider is not set up here.")
    provider: Provider | None = getattr(request.app.state, "console_oidc", None)
    if provider is None or provider.config is not settings.console_oidc:
        provider = await asyncio.to_thread(Provider.from_settings, settings)
        request.app.state.console_oidc = provider
    return provider


def _unavailable(provider: Provider, exc: ProviderUnavailable) -> ConsoleError:
    log.warning("console_oidc_unavailable", error=str(exc)[:200])
    return ConsoleError(
        502, "Sign-in service unavailable",
        f"careloop cannot reach {provider.config.name} right now, or its answer cannot be used. "
        "Try again in a few minutes; people with a careloop password can still sign in with it.")


def _clear_state_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(COOKIE, path=LOGIN_PATH, secure=secure_cookies(request),
                           httponly=True, samesite="lax")


@router.get(START_PATH)
async def oidc_start(request: Request) -> Response:
    """Send the browser to the provider, with a fresh state cookie."""
    provider = await provider_of(request)
    try:
        metadata = await provider.metadata()
    except ProviderUnavailable as exc:
        raise _unavailable(provider, exc) from None
    state, cookie = provider.signer.issue(now_for(request))
    response = RedirectResponse(provider.authorization_url(metadata, state), status_code=302,
                                headers=HEADERS)
    response.set_cookie(COOKIE, cookie, max_age=int(STATE_TTL.total_seconds()), path=LOGIN_PATH,
                        secure=secure_cookies(request), httponly=True, samesite="lax")
    return response


async def _complete(request: Request, provider: Provider, now: datetime) -> Person:
    """Everything the callback checks, in order; the signed-in person."""
    params = request.query_params
    error = params.get("error")
    if error:
        denied = error == "access_denied"
        raise SignInRefused(
            403 if denied else 400, "Not signed in",
            (f"{provider.config.name} did not sign you in (you may have cancelled). "
             if denied else f"{provider.config.name} answered with an error ({error[:64]}). ")
            + "Nothing was changed. Start again from the sign-in page.",
            "provider_error", detail={"error": error[:64]})
    state, expires_at = provider.signer.check(request.cookies.get(COOKIE), params.get("state"),
                                              now)
    provider.spend(state, expires_at, now)
    code = params.get("code")
    if not code:
        raise SignInRefused(400, "Sign-in failed", "The identity provider sent no code. Start "
                            "again from the sign-in page.", "no_code")
    metadata = await provider.metadata()
    answer = await provider.exchange(metadata, code, state)
    claims = await provider.id_token_claims(metadata, answer["id_token"], state=state,
                                            access_token=answer.get("access_token"), now=now)
    claimed = read_claims(provider.config, claims)
    if len(claimed.subject) > 512:
        raise _refused_token("subject_too_long")
    if claimed.role is None:
        raise SignInRefused(
            403, "No access to the console",
            f"Your account at {provider.config.name} is not in any group that gives access to "
            "the careloop console. Ask an administrator to add you to one, then sign in again.",
            "no_role", actor=claimed.username,
            detail={"subject": claimed.subject, "values": list(claimed.values[:20])})
    return await asyncio.to_thread(sign_in_user, runtime_of(request).engine, claimed, now=now)


@router.get(CALLBACK_PATH)
async def oidc_callback(request: Request) -> Response:
    """Where the provider sends the browser back: check everything, then start the session."""
    provider = await provider_of(request)
    engine = runtime_of(request).engine
    now = now_for(request)
    response: HTMLResponse
    try:
        person = await _complete(request, provider, now)
    except SignInRefused as refusal:
        log.info("console_oidc_refused", reason=refusal.reason)
        await asyncio.to_thread(record_refusal, engine, refusal, now=now)
        response = render("error.html", refusal.status, title=refusal.title,
                          message=refusal.message)
    except ProviderUnavailable as exc:
        error = _unavailable(provider, exc)
        await asyncio.to_thread(record_refusal, engine, SignInRefused(
            error.status, error.title, error.message, "provider_unavailable"), now=now)
        response = render("error.html", error.status, title=error.title, message=error.message)
    else:
        token, _session = await asyncio.to_thread(start_session, engine, person, now=now)
        # A redirect would still belong to the navigation the provider's site started, and the
        # browser would hold back the SameSite=Strict session cookie; this page moves on itself.
        response = render("oidc_signed_in.html", username=person.username, next_url=PATH)
        set_session_cookie(request, response, token)
    _clear_state_cookie(request, response)
    return response
