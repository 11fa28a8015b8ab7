"""SMART Backend Services authentication as an ``httpx.Auth`` flow.

https://hl7.org/fhir/smart-app-launch/backend-services.html: the client finds the token endpoint
in ``{fhir_base}/.well-known/smart-configuration``, then asks it for an access token with
``grant_type=client_credentials`` and a ``private_key_jwt`` client assertion (RFC 7523): a JWT
signed with careloop's private key (RS384 or ES384), header ``kid`` naming the published key,
claims ``iss`` = ``sub`` = client id, ``aud`` = the token endpoint, ``exp`` at most five minutes
ahead, and a ``jti`` the server has never seen (it refuses replays until ``exp``).

:class:`SmartBackendAuth` follows httpx's ``Auth.auth_flow`` design (``httpx/_auth.py``): it
yields the discovery and token requests through the same client, so transports, mocks and
timeouts apply to them too, and serves sync and async clients alike. It

* caches the token until shortly before ``expires_in`` runs out (a fifth of the lifetime, at
  most a minute), and fetches one token for many concurrent requests;
* on a 401 fetches a new token once and repeats the request once: tokens die early (the EHR
  restarted, revoked them, or advertised a longer life than it grants). A second 401 is
  returned to the caller, which reports it as an :class:`AuthenticationError`;
* never signs two assertions with the same ``jti`` (fresh UUID4 each time, checked).

Token endpoint failures raise from inside the flow: 429/5xx as :class:`RetryableFHIRError` (the
client's retry loop backs off and repeats the whole request), OAuth errors (``invalid_client``,
``invalid_scope``...) as :class:`AuthenticationError` with the ``error_description``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jwt

from adapters.fhir.errors import (
    RETRYABLE_STATUSES,
    AuthenticationError,
    RetryableFHIRError,
    outcome_text,
    parse_retry_after,
)
from adapters.fhir.keys import SigningKey

log = logging.getLogger(__name__)

__all__ = [
    "ASSERTION_TYPE",
    "MAX_ASSERTION_LIFETIME_S",
    "AccessToken",
    "SmartBackendAuth",
    "build_client_assertion",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300  # SMART: exp "no more than five minutes in the future"
# Four minutes leaves room for our clock running ahead of the EHR's.
DEFAULT_ASSERTION_LIFETIME_S = 240
DEFAULT_TOKEN_LIFETIME_S = 300  # when a token response omits expires_in (SMART requires it)


@dataclass(frozen=True)
class AccessToken:
    """A bearer token and when careloop stops using it (``refresh_at``, epoch seconds)."""

    value: str
    expires_at: float
    refresh_at: float
    scope: str

    def usable(self, now: float) -> bool:
        return now < self.refresh_at


def build_client_assertion(
    key: SigningKey,
    *,
    client_id: str,
    token_url: str,
    jti: str,
    now: float,
    lifetime_s: int = DEFAULT_ASSERTION_LIFETIME_S,
) -> str:
    """A signed ``private_key_jwt`` client assertion (compact JWS)."""
    if not 0 < lifetime_s <= MAX_ASSERTION_LIFETIME_S:
        raise ValueError(f"assertion lifetime must be 1..{MAX_ASSERTION_LIFETIME_S} s")
    issued = int(now)
    header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": issued,
        "exp": issued + lifetime_s,
        "jti": jti,
    }
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


def _json_body(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None


class SmartBackendAuth(httpx.Auth):
    """``httpx.Auth`` for SMART Backend Services (see the module docstring)."""

    def __init__(
        self,
        *,
        fhir_base: str,
        client_id: str,
        key: SigningKey,
        scopes: Sequence[str],
        token_url: str | None = None,
        clock: Callable[[], float] = time.time,
        new_jti: Callable[[], str] = lambda: str(uuid.uuid4()),
        assertion_lifetime_s: int = DEFAULT_ASSERTION_LIFETIME_S,
        max_refresh_margin_s: float = 60.0,
        on_token: Callable[[AccessToken], None] | None = None,
    ) -> None:
        """``on_token`` is told of each new token (to record its expiry; it must not block
        long and its errors are ignored: a token is never refused because of it)."""
        if not client_id:
            raise ValueError("SMART Backend Services needs a client_id")
        self.fhir_base = fhir_base.rstrip("/")
        self.client_id = client_id
        self.key = key
        self.scope = " ".join(scopes)
        self._token_url = token_url
        self._clock = clock
        self._new_jti = new_jti
        self._assertion_lifetime = assertion_lifetime_s
        self._max_margin = max_refresh_margin_s
        self._token: AccessToken | None = None
        self._used_jti: dict[str, float] = {}
        self._thread_lock = threading.Lock()
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary())
        self.tokens_fetched = 0
        self._on_token = on_token

    # -- state ------------------------------------------------------------------------------
    @property
    def token_url(self) -> str | None:
        """The token endpoint, once discovered (or as configured)."""
        return self._token_url

    @property
    def token(self) -> AccessToken | None:
        return self._token

    def invalidate(self) -> None:
        """Forget the cached token (the next request fetches a new one)."""
        self._token = None

    # -- the flows --------------------------------------------------------------------------
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response,
                                                                  None]:
        with self._thread_lock:
            token = yield from self._sync_token(stale=None)
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code == 401:
            with self._thread_lock:
                token = yield from self._sync_token(stale=token.value)
            request.headers["Authorization"] = f"Bearer {token.value}"
            yield request

    def _sync_token(self, stale: str | None) -> Generator[httpx.Request, httpx.Response,
                                                          AccessToken]:
        steps = self._token_steps(stale)
        response: httpx.Response | None = None
        while True:
            try:
                step = steps.send(response)  # type: ignore[arg-type]
            except StopIteration as done:
                token: AccessToken = done.value
                return token
            response = yield step
            response.read()

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request,
                                                                              httpx.Response]:
        lock = self._lock_for_loop()
        async with lock:
            token = None
            steps = self._token_steps(stale=None)
            response: httpx.Response | None = None
            while token is None:
                try:
                    step = steps.send(response)  # type: ignore[arg-type]
                except StopIteration as done:
                    token = done.value
                    break
                response = yield step
                await response.aread()
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code != 401:
            return
        async with lock:
            stale, token = token.value, None
            steps = self._token_steps(stale=stale)
            response = None
            while token is None:
                try:
                    step = steps.send(response)  # type: ignore[arg-type]
                except StopIteration as done:
                    token = done.value
                    break
                response = yield step
                await response.aread()
        request.headers["Authorization"] = f"Bearer {token.value}"
        yield request

    def _lock_for_loop(self) -> asyncio.Lock:
        # One lock per event loop: an asyncio.Lock is bound to the loop it is first used in, and
        # a CLI may run several loops (asyncio.run) over one client.
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            lock = self._async_locks[loop] = asyncio.Lock()
        return lock

    # -- the steps shared by both flows -----------------------------------------------------
    def _token_steps(self, stale: str | None) -> Generator[httpx.Request, httpx.Response,
                                                           AccessToken]:
        """Yields discovery / token requests as needed; returns a token that is usable now and,
        when ``stale`` is given, differs from it (someone else may have refreshed already)."""
        current = self._token
        if current is not None and current.usable(self._clock()) and current.value != stale:
            return current
        if stale is not None and current is not None and current.value == stale:
            self._token = None
        if self._token_url is None:
            response = yield httpx.Request(
                "GET", f"{self.fhir_base}/.well-known/smart-configuration",
                headers={"Accept": "application/json"},
            )
            self._token_url = self._read_discovery(response)
        response = yield self._token_request(self._token_url)
        token = self._read_token(response)
        self._token = token
        self.tokens_fetched += 1
        if self._on_token is not None:
            try:
                self._on_token(token)
            except Exception:
                log.warning("the token observer failed", exc_info=True)
        return token

    def _read_discovery(self, response: httpx.Response) -> str:
        where = f"SMART discovery at {response.request.url}"
        if response.status_code in RETRYABLE_STATUSES:
            raise RetryableFHIRError(
                response.status_code, f"{where}: HTTP {response.status_code}",
                url=str(response.request.url),
                retry_after=parse_retry_after(response.headers.get("Retry-After")))
        body = _json_body(response)
        if response.status_code != 200 or not isinstance(body, dict):
            raise AuthenticationError(
                response.status_code,
                f"{where}: HTTP {response.status_code}, no SMART configuration; check fhir_base "
                "or configure the token endpoint explicitly", url=str(response.request.url))
        token_url = body.get("token_endpoint")
        if not isinstance(token_url, str) or urlsplit(token_url).scheme not in ("http", "https"):
            raise AuthenticationError(response.status_code,
                                      f"{where}: no usable token_endpoint ({token_url!r})")
        methods = body.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and methods and "private_key_jwt" not in methods:
            raise AuthenticationError(
                response.status_code,
                f"{where}: the server does not offer private_key_jwt (offers {methods})")
        algs = body.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algs, list) and algs and self.key.alg not in algs:
            raise AuthenticationError(
                response.status_code,
                f"{where}: the server does not accept {self.key.alg} assertions (accepts {algs}); "
                "generate a key of an accepted type")
        return token_url

    def _fresh_jti(self) -> str:
        now = self._clock()
        for jti, expires in list(self._used_jti.items()):
            if expires < now:
                del self._used_jti[jti]
        for _ in range(5):
            jti = self._new_jti()
            if jti not in self._used_jti:
                self._used_jti[jti] = now + MAX_ASSERTION_LIFETIME_S + 60
                return jti
        raise RuntimeError("the jti source keeps repeating itself; refusing to reuse a jti")

    def _token_request(self, token_url: str) -> httpx.Request:
        assertion = build_client_assertion(
            self.key, client_id=self.client_id, token_url=token_url, jti=self._fresh_jti(),
            now=self._clock(), lifetime_s=self._assertion_lifetime,
        )
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        if self.scope:
            form["scope"] = self.scope
        return httpx.Request("POST", token_url, data=form, headers={"Accept": "application/json"})

    def _read_token(self, response: httpx.Response) -> AccessToken:
        where = f"token endpoint {response.request.url}"
        body = _json_body(response)
        status = response.status_code
        if status in RETRYABLE_STATUSES:
            said = outcome_text(body) or response.reason_phrase
            raise RetryableFHIRError(status, f"{where}: HTTP {status}: {said}",
                                     url=str(response.request.url),
                                     retry_after=parse_retry_after(
                                         response.headers.get("Retry-After")))
        if status != 200 or not isinstance(body, dict):
            said = outcome_text(body) or response.reason_phrase or "no details"
            raise AuthenticationError(
                status, f"{where} refused client {self.client_id!r} (key {self.key.kid}): "
                f"HTTP {status}: {said}", url=str(response.request.url))
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise AuthenticationError(status, f"{where}: the answer has no access_token")
        token_type = str(body.get("token_type", "bearer"))
        if token_type.lower() != "bearer":
            raise AuthenticationError(status, f"{where}: token_type {token_type!r} is not bearer")
        try:
            lifetime = float(body.get("expires_in", DEFAULT_TOKEN_LIFETIME_S))
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        lifetime = max(0.0, lifetime)
        now = self._clock()
        margin = min(self._max_margin, lifetime / 5)
        return AccessToken(value, now + lifetime, now + lifetime - margin,
                           str(body.get("scope", "")))
