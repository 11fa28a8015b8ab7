"""A respx-mocked EHR shared by the FHIR client tests: SMART discovery, a token endpoint that
checks client assertions like a real one, a fake clock and recorded sleeps.

Other modules take the fixtures by assignment (``ehr = fakes.ehr``); the tests here check that
the fake token endpoint is as strict as a real one, so the client tests mean something."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from adapters.fhir import (
    ASSERTION_TYPE,
    FHIRClient,
    SigningKey,
    SmartBackendAuth,
    build_client_assertion,
    generate_signing_key,
    jwks,
)

BASE = "https://ehr.example.org/fhir/R4"
TOKEN_URL = "https://auth.example.org/oauth2/token"
CLIENT_ID = "careloop"


@dataclass
class FakeClock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sleeps:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@dataclass
class TokenServer:
    """Verifies each assertion against the registered keys and hands out tok-1, tok-2, ..."""

    keys: KeySet
    expires_in: int = 300
    assertions: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, Any]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.forms.append(form)
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == ASSERTION_TYPE
        token = jwt.decode(form["client_assertion"], self.keys, algorithms=["RS384", "ES384"])
        self.assertions.append(token.claims)
        self.headers.append(dict(token.header))
        return httpx.Response(200, json={
            "access_token": f"tok-{len(self.assertions)}", "token_type": "bearer",
            "expires_in": self.expires_in, "scope": form.get("scope", ""),
        })


@dataclass
class FakeEHR:
    router: respx.MockRouter
    token: TokenServer
    clock: FakeClock
    sleeps: Sleeps
    auth: SmartBackendAuth
    client: FHIRClient


@pytest.fixture(scope="session")
def es_key() -> SigningKey:
    return generate_signing_key("ES384")


@pytest.fixture(scope="session")
def rs_key() -> SigningKey:
    return generate_signing_key("RS384", rsa_bits=2048)


@pytest.fixture
def ehr(es_key: SigningKey) -> Iterator[FakeEHR]:
    clock, sleeps = FakeClock(), Sleeps()
    token = TokenServer(KeySet.import_key_set(jwks([es_key])))
    with respx.mock(assert_all_called=False) as router:
        router.get(f"{BASE}/.well-known/smart-configuration", name="discovery").respond(json={
            "token_endpoint": TOKEN_URL,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": ["client_credentials"],
        })
        router.post(TOKEN_URL, name="token").mock(side_effect=token)
        auth = SmartBackendAuth(fhir_base=BASE, client_id=CLIENT_ID, key=es_key,
                                scopes=["system/Appointment.rs", "system/Patient.rs"],
                                clock=clock, new_jti=lambda: str(uuid.uuid4()))
        client = FHIRClient(BASE, auth=auth, sleep=sleeps, rng=lambda: 1.0)
        yield FakeEHR(router, token, clock, sleeps, auth, client)


def bundle(resources: list[dict[str, Any]], next_url: str | None = None,
           mode: str = "match") -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Bundle", "type": "searchset",
        "entry": [{"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r,
                   "search": {"mode": mode}} for r in resources],
    }
    if next_url:
        out["link"] = [{"relation": "next", "url": next_url}]
    return out


def outcome(text: str, code: str = "invalid") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class TestTokenServerFake:
    def test_accepts_a_registered_key(self, es_key: SigningKey) -> None:
        """An assertion signed with the registered key gets a token."""
        server = TokenServer(KeySet.import_key_set(jwks([es_key])))
        assertion = build_client_assertion(es_key, client_id=CLIENT_ID, token_url=TOKEN_URL,
                                           jti="j1", now=FakeClock().now)
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion}
        response = server(httpx.Request("POST", TOKEN_URL, data=form))
        assert response.status_code == 200
        assert server.assertions[0]["jti"] == "j1"

    def test_refuses_an_unregistered_key(self, es_key: SigningKey) -> None:
        """An assertion signed with another key does not verify."""
        server = TokenServer(KeySet.import_key_set(jwks([es_key])))
        other = generate_signing_key("ES384", kid=es_key.kid)
        assertion = build_client_assertion(other, client_id=CLIENT_ID, token_url=TOKEN_URL,
                                           jti="j1", now=FakeClock().now)
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion}
        with pytest.raises(JoseError):
            server(httpx.Request("POST", TOKEN_URL, data=form))
