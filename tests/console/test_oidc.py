"""Console sign-in through OpenID Connect, against a real (small) identity provider.

The provider is a FastAPI app served by uvicorn on a free loopback port in its own thread: it
publishes discovery metadata and a JWKS, approves every authorization request at once
(redirecting back with a code, or with ``error=access_denied``), and at its token endpoint
checks the client's credentials, the redirect URI, the single use of each code and the PKCE
verifier against the challenge before it issues an RS256 ID token. Tests bend it to send what a
broken or hostile provider would (another audience, issuer or nonce, an expired token, a
signature from another key). The browser is the TestClient; the hop to the provider and back is
made with httpx by hand.
"""

from __future__ import annotations

import base64
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookiejar import Cookie
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import uvicorn
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core.util import create_half_hash
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from sqlalchemy import select

from integration.api import create_app
from integration.console.auth import COOKIE as SESSION_COOKIE
from integration.console.oidc import CALLBACK_PATH, COOKIE, START_PATH
from integration.console.users import authenticate, create_user, disable_user
from integration.models import audit_events, console_sessions, console_users
from integration.runtime import Runtime
from integration.settings import SettingsError
from tests.helpers import settings_for

CLIENT_ID = "careloop-console"
CLIENT_SECRET = "s3cret/client+value"
BASE_URL = "http://127.0.0.1:8000"
REDIRECT_URI = BASE_URL + CALLBACK_PATH
ROLE_MAP = {"careloop-admins": "admin", "careloop-operators": "operator",
            "careloop-viewers": "viewer"}


# ------------------------------------------------------------------------------- the provider


@dataclass
class FakeIdP:
    """A small OpenID provider; its attributes steer what it answers."""

    issuer: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(
        2048, parameters={"kid": "k1"}, private=True))
    published: list[RSAKey] = field(default_factory=list)
    signing_key: RSAKey | None = None
    user: dict[str, Any] = field(default_factory=dict)
    tamper: dict[str, Any] = field(default_factory=dict)
    """Claims to override in the next ID tokens (None removes one)."""
    deny: bool = False
    auth_methods: list[str] = field(default_factory=list)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_errors: list[str] = field(default_factory=list)
    fetches: dict[str, int] = field(default_factory=dict)
    redirect_uri: str = REDIRECT_URI
    """The one redirect URI registered for the client."""

    def reset(self) -> None:
        self.redirect_uri = REDIRECT_URI
        self.published = [self.key]
        self.signing_key = self.key
        self.user = {"sub": "u-1001", "preferred_username": "dana", "email": "dana@example.org",
                     "groups": ["careloop-operators", "all-staff"]}
        self.tamper = {}
        self.deny = False
        self.auth_methods = ["client_secret_basic"]
        self.codes = {}
        self.token_errors = []
        self.fetches = {"metadata": 0, "jwks": 0}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/.well-known/openid-configuration")
        async def metadata() -> dict[str, Any]:
            self.fetches["metadata"] += 1
            return {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": self.auth_methods,
                "code_challenge_methods_supported": ["S256"],
                "scopes_supported": ["openid", "profile", "email"],
            }

        @app.get("/jwks")
        async def jwks() -> dict[str, Any]:
            self.fetches["jwks"] += 1
            return dict(KeySet(list(self.published)).as_dict(private=False))

        @app.get("/authorize")
        async def authorize(request: Request) -> Response:
            q = request.query_params
            problems = [
                name for name, ok in (
                    ("response_type", q.get("response_type") == "code"),
                    ("client_id", q.get("client_id") == CLIENT_ID),
                    ("redirect_uri", q.get("redirect_uri") == self.redirect_uri),
                    ("scope", "openid" in (q.get("scope") or "").split()),
                    ("code_challenge_method", q.get("code_challenge_method") == "S256"),
                    ("code_challenge", len(q.get("code_challenge") or "") == 43),
                    ("nonce", bool(q.get("nonce"))),
                    ("state", bool(q.get("state"))),
                ) if not ok]
            if problems:
                return JSONResponse({"error": "invalid_request", "bad": problems}, 400)
            back = {"state": q["state"]}
            if self.deny:
                back["error"] = "access_denied"
            else:
                code = secrets.token_urlsafe(16)
                self.codes[code] = {"challenge": q["code_challenge"], "nonce": q["nonce"],
                                    "redirect_uri": q["redirect_uri"]}
                back["code"] = code
            return RedirectResponse(f"{q['redirect_uri']}?{urlencode(back)}", 302)

        @app.post("/token")
        async def token(request: Request) -> Response:
            form = await request.form()
            client = self._client(request, {k: str(v) for k, v in form.items()})
            if client != (CLIENT_ID, CLIENT_SECRET):
                return self._token_error("invalid_client", 401)
            grant = self.codes.pop(str(form.get("code")), None)  # a code works once
            if form.get("grant_type") != "authorization_code" or grant is None:
                return self._token_error("invalid_grant")
            if form.get("redirect_uri") != grant["redirect_uri"]:
                return self._token_error("invalid_grant")
            verifier = str(form.get("code_verifier") or "")
            if create_s256_code_challenge(verifier) != grant["challenge"]:
                return self._token_error("invalid_grant")
            access_token = secrets.token_urlsafe(24)
            now = int(time.time())
            claims: dict[str, Any] = {
                "iss": self.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 300,
                "auth_time": now, "nonce": grant["nonce"],
                "at_hash": create_half_hash(access_token, "RS256").decode(), **self.user}
            for name, value in self.tamper.items():
                if value is None:
                    claims.pop(name, None)
                else:
                    claims[name] = value
            signer = self.signing_key or self.key
            id_token = jwt.encode({"alg": "RS256", "kid": signer.kid}, claims, signer)
            return JSONResponse({"access_token": access_token, "token_type": "Bearer",
                                 "expires_in": 300, "id_token": id_token},
                                headers={"Cache-Control": "no-store"})

        return app

    def _client(self, request: Request, form: dict[str, str]) -> tuple[str, str] | None:
        header = request.headers.get("authorization", "")
        if "client_secret_basic" in self.auth_methods and header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return user, password
        if "client_secret_post" in self.auth_methods and "client_secret" in form:
            return form.get("client_id", ""), form["client_secret"]
        return None

    def _token_error(self, error: str, status: int = 400) -> Response:
        self.token_errors.append(error)
        return JSONResponse({"error": error}, status)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeIdP]:
    idp = FakeIdP()
    idp.reset()
    config = uvicorn.Config(idp.app(), host="127.0.0.1", port=0, log_config=None,
                            access_log=False, lifespan="off", ws="none", http="h11",
                            loop="asyncio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-idp", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake identity provider did not start")
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    idp.issuer = f"http://{host}:{port}"
    yield idp
    server.should_exit = True
    thread.join(20)


@pytest.fixture
def idp(provider: FakeIdP) -> FakeIdP:
    provider.reset()
    return provider


# ------------------------------------------------------------------------------- the console


class Clock:
    """The console's time: the real one (the provider signs with it), shifted when asked."""

    def __init__(self) -> None:
        self.shift = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.shift


@dataclass
class Console:
    client: TestClient
    runtime: Runtime
    idp: FakeIdP
    clock: Clock

    def begin(self) -> str:
        """Start a sign-in and go through the provider: the callback's path and query."""
        r = self.client.get(START_PATH)
        assert r.status_code == 302, r.text
        location = r.headers["location"]
        assert location.startswith(self.idp.issuer + "/authorize?")
        answer = httpx.get(location, follow_redirects=False, timeout=10)
        assert answer.status_code == 302, answer.text
        back = urlsplit(answer.headers["location"])
        assert f"{back.scheme}://{back.netloc}{back.path}" == REDIRECT_URI
        return f"{back.path}?{back.query}"

    def sign_in(self) -> httpx.Response:
        """A whole sign-in: the callback's answer."""
        answer: httpx.Response = self.client.get(self.begin())
        return answer

    def users(self) -> list[Any]:
        with self.runtime.engine.connect() as conn:
            return list(conn.execute(select(console_users).order_by(console_users.c.id)))

    def sessions(self) -> int:
        with self.runtime.engine.connect() as conn:
            return len(conn.execute(select(console_sessions.c.id)).all())

    def audits(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        with self.runtime.engine.connect() as conn:
            return [(r.actor, r.action, r.detail) for r in conn.execute(
                select(audit_events).where(audit_events.c.action.like("console.%"))
                .order_by(audit_events.c.id))]

    def refused(self, r: httpx.Response, status: int, reason: str) -> None:
        """A refusal: an HTML page linking back to sign-in, no session, no user, the audit."""
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("text/html")
        assert 'href="/console/login"' in r.text and "<script" not in r.text
        assert SESSION_COOKIE not in r.cookies and self.sessions() == 0
        assert self.users() == []
        failed = [d for _a, action, d in self.audits() if action == "console.login_failed"]
        assert failed and failed[-1] is not None
        assert failed[-1]["method"] == "oidc" and failed[-1]["reason"] == reason, failed


def oidc_settings(idp: FakeIdP, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "issuer": idp.issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "name": "St Elsewhere sign-in", "role_map": dict(ROLE_MAP),
        "phi_values": ["careloop-phi"],
    }
    values.update(overrides)
    return values


@contextmanager
def console_for(url: str, tmp_path: Any, idp: FakeIdP,
                oidc: dict[str, Any] | None) -> Iterator[Console]:
    settings = settings_for(url, auth="required", inprocess_worker=False, base_url=BASE_URL,
                            keys_dir=tmp_path / "keys", console_oidc=oidc)
    runtime = Runtime(settings, with_mllp=False)
    clock = Clock()
    app = create_app(runtime)
    app.state.console_clock = clock
    try:
        with TestClient(app, follow_redirects=False) as client:
            yield Console(client, runtime, idp, clock)
    finally:
        runtime.engine.dispose()


@pytest.fixture
def console(db_url: str, tmp_path: Any, idp: FakeIdP) -> Iterator[Console]:
    """On SQLite and PostgreSQL."""
    with console_for(db_url, tmp_path, idp, oidc_settings(idp)) as c:
        yield c


@pytest.fixture
def lite(sqlite_url: str, tmp_path: Any, idp: FakeIdP) -> Iterator[Console]:
    """On SQLite only: for checks where the database plays no part."""
    with console_for(sqlite_url, tmp_path, idp, oidc_settings(idp)) as c:
        yield c


# ------------------------------------------------------------------------------- sign-in


def test_first_sign_in_creates_the_user_with_the_mapped_role(console: Console) -> None:
    console.idp.user["groups"] = ["careloop-operators", "careloop-phi", "all-staff"]
    r = console.client.get(START_PATH)
    assert r.status_code == 302
    query = parse_qs(urlsplit(r.headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["scope"] == ["openid profile email"]
    assert query["redirect_uri"] == [REDIRECT_URI] and query["nonce"] and query["state"]
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(COOKIE + "="))
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=lax" in lowered
    assert "path=/console/login" in lowered and "max-age=600" in lowered
    assert query["state"][0] in cookie and query["nonce"][0] not in cookie

    answer = httpx.get(r.headers["location"], follow_redirects=False, timeout=10)
    back = urlsplit(answer.headers["location"])
    done = console.client.get(f"{back.path}?{back.query}")
    assert done.status_code == 200, done.text
    assert 'http-equiv="refresh" content="0; url=/console"' in done.text
    assert done.headers["referrer-policy"] == "no-referrer"
    set_cookies = done.headers.get_list("set-cookie")
    assert any(c.startswith(SESSION_COOKIE + "=") and "samesite=strict" in c.lower()
               for c in set_cookies)
    assert any(c.startswith(COOKIE + "=") and "max-age=0" in c.lower() for c in set_cookies)

    [user] = console.users()
    assert (user.username, user.role, user.phi, user.disabled) == ("dana", "operator", True, False)
    assert user.oidc_subject == f"{console.idp.issuer}|u-1001"
    assert [(a, action) for a, action, _d in console.audits()] == [
        ("dana", "console.user_created"), ("dana", "console.login")]
    assert console.audits()[-1][2] == {"method": "oidc"}
    page = console.client.get("/console")
    assert page.status_code == 200 and "dana (operator, PHI)" in page.text
    assert user.password_hash.startswith("$argon2id$")  # of a secret nobody kept
    assert not authenticate(console.runtime.engine, "dana", "").ok


def test_a_second_sign_in_follows_the_claims(console: Console) -> None:
    assert console.sign_in().status_code == 200
    [first] = console.users()
    assert (first.role, first.phi) == ("operator", False)
    console.client.cookies.clear()
    console.idp.user["groups"] = ["careloop-viewers", "careloop-admins", "careloop-phi"]
    console.idp.user["preferred_username"] = "dana.renamed"
    assert console.sign_in().status_code == 200
    [again] = console.users()
    assert (again.id, again.username, again.role, again.phi) == (first.id, "dana", "admin", True)
    console.client.cookies.clear()
    console.idp.user["groups"] = "careloop-viewers"  # one string, not a list
    assert console.sign_in().status_code == 200
    [last] = console.users()
    assert (last.role, last.phi) == ("viewer", False)
    actions = [(action, d) for _a, action, d in console.audits()]
    assert ("console.user_updated", {"method": "oidc", "role": "admin", "phi": True,
                                     "previous_role": "operator", "previous_phi": False}) in actions
    assert [a for a, _d in actions].count("console.login") == 3
    assert console.sessions() == 3


def test_a_taken_username_gets_a_suffix_and_no_password_works(console: Console) -> None:
    create_user(console.runtime.engine, "dana", "viewer", "correct horse battery")
    assert console.sign_in().status_code == 200
    users = {u.username: u for u in console.users()}
    assert set(users) == {"dana", "dana-2"}
    assert users["dana"].oidc_subject is None and users["dana-2"].role == "operator"
    for password in ("", "correct horse battery", users["dana-2"].password_hash):
        assert not authenticate(console.runtime.engine, "dana-2", password).ok
    assert authenticate(console.runtime.engine, "dana", "correct horse battery").ok


def test_a_disabled_user_stays_refused(console: Console) -> None:
    assert console.sign_in().status_code == 200
    disable_user(console.runtime.engine, "dana")
    console.client.cookies.clear()
    r = console.sign_in()
    assert r.status_code == 403 and "disabled" in r.text
    assert console.sessions() == 1  # the first one, which no longer works
    assert console.client.get("/console").status_code == 303
    assert console.audits()[-1] == ("dana", "console.login_failed",
                                    {"method": "oidc", "reason": "disabled"})


def test_no_matching_group_is_refused(console: Console) -> None:
    console.idp.user["groups"] = ["all-staff", "cafeteria"]
    r = console.sign_in()
    console.refused(r, 403, "no_role")
    assert "not in any group that gives access" in r.text
    assert console.audits()[-1] == ("dana", "console.login_failed", {
        "method": "oidc", "reason": "no_role", "subject": f"{console.idp.issuer}|u-1001",
        "values": ["all-staff", "cafeteria"]})


def test_nested_role_claims_and_the_username_fallbacks(lite: Console, sqlite_url: str,
                                                       tmp_path: Any) -> None:
    idp = lite.idp
    idp.user = {"sub": "Ω-7", "realm_access": {"roles": ["careloop-viewers"]}}
    with console_for(sqlite_url, tmp_path, idp,
                     oidc_settings(idp, roles_claim="realm_access.roles")) as c:
        assert c.sign_in().status_code == 200
        [user] = c.users()
        assert (user.username, user.role) == ("7", "viewer")  # the sub, made a valid name


# ------------------------------------------------------------------------------- the state


def test_a_wrong_state_is_refused(lite: Console) -> None:
    path = lite.begin()
    parts = urlsplit(path)
    query = parse_qs(parts.query)
    query["state"] = ["x" + query["state"][0][1:]]
    r = lite.client.get(f"{parts.path}?{urlencode(query, doseq=True)}")
    lite.refused(r, 400, "state_mismatch")
    assert lite.idp.codes  # the code was never exchanged


def test_a_callback_without_the_cookie_is_refused(lite: Console) -> None:
    path = lite.begin()
    lite.client.cookies.clear()
    lite.refused(lite.client.get(path), 400, "state_missing")


def test_a_forged_cookie_is_refused(lite: Console) -> None:
    path = lite.begin()
    [cookie] = [c for c in lite.client.cookies.jar if c.name == COOKIE]
    head, _, _mac = (cookie.value or "").rpartition(".")
    _set_cookie(lite, cookie, head + "." + "A" * 43)
    lite.refused(lite.client.get(path), 400, "state_invalid")


def test_an_expired_state_cookie_is_refused(lite: Console) -> None:
    path = lite.begin()
    lite.clock.shift = timedelta(minutes=10, seconds=5)
    r = lite.client.get(path)
    lite.refused(r, 400, "state_expired")
    assert "10 minutes" in r.text


def test_a_replayed_state_cookie_is_refused(console: Console) -> None:
    path = console.begin()
    [cookie] = [c for c in console.client.cookies.jar if c.name == COOKIE]
    assert console.client.get(path).status_code == 200
    assert COOKIE not in {c.name for c in console.client.cookies.jar}
    console.client.cookies.clear()
    _set_cookie(console, cookie, cookie.value or "")
    r = console.client.get(path)
    assert r.status_code == 400 and SESSION_COOKIE not in r.cookies
    assert console.audits()[-1][2] == {"method": "oidc", "reason": "state_replayed"}
    assert console.sessions() == 1


def _set_cookie(console: Console, like: Cookie, value: str) -> None:
    console.client.cookies.jar.set_cookie(Cookie(
        like.version, like.name, value, like.port, like.port_specified, like.domain,
        like.domain_specified, like.domain_initial_dot, like.path, like.path_specified,
        like.secure, like.expires, like.discard, like.comment, like.comment_url, {}))


# ------------------------------------------------------------------------------- the ID token


@pytest.mark.parametrize(("tamper", "reason"), [
    ({"nonce": "not-the-nonce"}, "invalid_nonce"),
    ({"nonce": None}, "missing_nonce"),
    ({"aud": "someone-else"}, "invalid_aud"),
    ({"aud": ["someone-else", "another"]}, "invalid_aud"),
    ({"iss": "https://login.example.org"}, "invalid_iss"),
    ({"exp": int(time.time()) - 600, "iat": int(time.time()) - 900}, "expired"),
    ({"iat": int(time.time()) + 3600}, "invalid_iat"),
    ({"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}, "invalid_at_hash"),
], ids=["bad-nonce", "no-nonce", "wrong-audience", "wrong-audiences", "wrong-issuer", "expired",
        "issued-in-the-future", "bad-at-hash"])
def test_a_bad_id_token_is_refused(lite: Console, tamper: dict[str, Any], reason: str) -> None:
    lite.idp.tamper = tamper
    r = lite.sign_in()
    lite.refused(r, 403, reason)
    assert "did not pass careloop" in r.text


def test_a_bad_signature_is_refused(lite: Console) -> None:
    lite.idp.signing_key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
    lite.refused(lite.sign_in(), 403, "bad_signature")


def test_a_key_the_provider_never_published_is_refused(lite: Console) -> None:
    lite.idp.signing_key = RSAKey.generate_key(2048, parameters={"kid": "rogue"}, private=True)
    lite.refused(lite.sign_in(), 403, "unknown_key")
    assert lite.idp.fetches["jwks"] == 2  # fetched again once for the unknown kid


def test_metadata_and_keys_are_cached_and_a_rotated_key_is_fetched(lite: Console) -> None:
    assert lite.sign_in().status_code == 200
    lite.client.cookies.clear()
    assert lite.sign_in().status_code == 200
    assert lite.idp.fetches == {"metadata": 1, "jwks": 1}
    new = RSAKey.generate_key(2048, parameters={"kid": "k2"}, private=True)
    lite.idp.published = [lite.idp.key, new]
    lite.idp.signing_key = new
    lite.client.cookies.clear()
    assert lite.sign_in().status_code == 200
    assert lite.idp.fetches == {"metadata": 1, "jwks": 2}


# ------------------------------------------------------------------------------- the provider


def test_access_denied_at_the_provider(lite: Console) -> None:
    lite.idp.deny = True
    r = lite.sign_in()
    lite.refused(r, 403, "provider_error")
    assert "St Elsewhere sign-in did not sign you in" in r.text
    assert any(c.startswith(COOKIE + "=") and "max-age=0" in c.lower()
               for c in r.headers.get_list("set-cookie"))  # the state cookie is cleared


def test_the_token_endpoint_checks_the_client_and_the_verifier(lite: Console, sqlite_url: str,
                                                               tmp_path: Any) -> None:
    idp = lite.idp
    with console_for(sqlite_url, tmp_path, idp,
                     oidc_settings(idp, client_secret="wrong-secret")) as c:
        c.refused(c.sign_in(), 400, "token_refused")
    assert idp.token_errors == ["invalid_client"]
    # The verifier the console sends matches the challenge it sent: a code taken to another
    # browser's sign-in (another state, so another verifier) is refused by the provider.
    first = urlsplit(lite.begin())
    lite.client.cookies.clear()
    second = urlsplit(lite.begin())
    stolen = dict(parse_qs(second.query), code=parse_qs(first.query)["code"])
    lite.refused(lite.client.get(f"{second.path}?{urlencode(stolen, doseq=True)}"), 400,
                 "token_refused")
    assert idp.token_errors[-1] == "invalid_grant"


def test_client_secret_post_when_the_provider_asks_for_it(lite: Console) -> None:
    lite.idp.auth_methods = ["client_secret_post"]
    assert lite.sign_in().status_code == 200
    assert lite.idp.token_errors == []


def test_a_provider_that_cannot_be_reached_gives_a_502_page(sqlite_url: str, tmp_path: Any,
                                                            idp: FakeIdP) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = oidc_settings(idp, issuer=f"http://127.0.0.1:{port}")
    with console_for(sqlite_url, tmp_path, idp, down) as c:
        r = c.client.get(START_PATH)
        assert r.status_code == 502 and r.headers["content-type"].startswith("text/html")
        assert "cannot reach St Elsewhere sign-in" in r.text
        assert COOKIE not in r.headers.get("set-cookie", "")


# ------------------------------------------------------------------------------- settings, page


def test_the_button_shows_only_when_configured(sqlite_url: str, tmp_path: Any,
                                               idp: FakeIdP) -> None:
    with console_for(sqlite_url, tmp_path, idp, None) as c:
        page = c.client.get("/console/login")
        assert page.status_code == 200 and "oidc-sign-in" not in page.text
        assert 'type="password"' in page.text
        assert c.client.get(START_PATH).status_code == 404
        assert c.client.get(CALLBACK_PATH + "?code=x&state=y").status_code == 404
    with console_for(sqlite_url, tmp_path, idp, oidc_settings(idp)) as c:
        page = c.client.get("/console/login")
        assert 'href="/console/login/oidc"' in page.text
        assert "Sign in with St Elsewhere sign-in" in page.text and 'type="password"' in page.text
        assert c.client.get(START_PATH).status_code == 302


def test_password_sign_in_keeps_working(lite: Console) -> None:
    create_user(lite.runtime.engine, "vera", "viewer", "correct horse battery")
    form = lite.client.get("/console/login")
    csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    r = lite.client.post("/console/login", data={"username": "vera",
                                                 "password": "correct horse battery",
                                                 "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/console"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"issuer": "http://login.example.org"}, "console_oidc.issuer: must be an https URL"),
    ({"issuer": "https://login.example.org/?x=1"}, "console_oidc.issuer: must be the provider"),
    ({"role_map": {}}, "console_oidc.role_map: must map at least one claim value"),
    ({"role_map": {"g": "root"}}, "console_oidc.role_map.g: Input should be"),
    ({"scopes": ["profile"]}, "console_oidc.scopes: must include openid"),
    ({"client_secret": "env:CARELOOP_TEST_NO_SUCH_VARIABLE"}, "console_oidc.client_secret:"),
    ({"colour": "blue"}, "console_oidc.colour: unknown setting"),
])
def test_bad_settings_fail_with_one_line(sqlite_url: str, overrides: dict[str, Any],
                                         message: str) -> None:
    values = {"issuer": "https://login.example.org/realms/staff", "client_id": CLIENT_ID,
              "role_map": ROLE_MAP, **overrides}
    with pytest.raises(SettingsError) as caught:
        settings_for(sqlite_url, console_oidc=values)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_settings_defaults_and_secret_from_the_environment(sqlite_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARELOOP_TEST_OIDC_SECRET", "from-the-environment")
    settings = settings_for(sqlite_url, console_oidc={
        "issuer": "https://login.example.org/realms/staff", "client_id": CLIENT_ID,
        "client_secret": "env:CARELOOP_TEST_OIDC_SECRET", "role_map": ROLE_MAP})
    oidc = settings.console_oidc
    assert oidc is not None and oidc.client_secret == "from-the-environment"
    assert (oidc.name, oidc.scopes, oidc.roles_claim, oidc.username_claim, oidc.phi_values) == (
        "your organisation's sign-in", ("openid", "profile", "email"), "groups",
        "preferred_username", ())
    assert settings_for(sqlite_url).console_oidc is None
