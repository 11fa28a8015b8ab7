"""SMART Backend Services: discovery, client assertions, token cache, re-authentication."""

from __future__ import annotations

import asyncio
import uuid
from itertools import chain

import httpx
import pytest
from joserfc.jwk import KeySet

from adapters.fhir import (
    AuthenticationError,
    FHIRClient,
    SigningKey,
    SmartBackendAuth,
    jwks,
)
from tests.adapters import test_fhir_fakes as fakes
from tests.adapters.test_fhir_fakes import BASE, CLIENT_ID, TOKEN_URL, FakeEHR

ehr = fakes.ehr
es_key = fakes.es_key
rs_key = fakes.rs_key

PATIENT = {"resourceType": "Patient", "id": "p1"}


def _patient_route(ehr: FakeEHR) -> None:
    ehr.router.get(f"{BASE}/Patient/p1", name="patient").respond(json=PATIENT)


class TestAssertion:
    async def test_claims_follow_smart_backend_services(self, ehr: FakeEHR) -> None:
        """iss = sub = client id, aud = token endpoint, exp at most 5 minutes, kid header."""
        _patient_route(ehr)
        await ehr.client.read("Patient", "p1")
        claims, header = ehr.token.assertions[0], ehr.token.headers[0]
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["aud"] == TOKEN_URL
        assert claims["iat"] == int(ehr.clock.now)
        assert 0 < claims["exp"] - ehr.clock.now <= 300
        assert uuid.UUID(claims["jti"]).version == 4
        assert header["alg"] == "ES384"
        assert header["kid"] == ehr.auth.key.kid
        assert header["typ"] == "JWT"
        assert ehr.token.forms[0]["scope"] == "system/Appointment.rs system/Patient.rs"

    async def test_rs384_keys_sign_rs384(self, ehr: FakeEHR, rs_key: SigningKey) -> None:
        """An RSA key signs RS384 assertions the server verifies with the published JWK."""
        ehr.token.keys = KeySet.import_key_set(jwks([rs_key]))
        auth = SmartBackendAuth(fhir_base=BASE, client_id=CLIENT_ID, key=rs_key, scopes=[],
                                clock=ehr.clock)
        _patient_route(ehr)
        async with FHIRClient(BASE, auth=auth) as client:
            await client.read("Patient", "p1")
        assert ehr.token.headers[0]["alg"] == "RS384"
        assert "scope" not in ehr.token.forms[0]

    async def test_discovery_happens_once(self, ehr: FakeEHR) -> None:
        """The token endpoint comes from .well-known/smart-configuration, asked once."""
        _patient_route(ehr)
        await ehr.client.read("Patient", "p1")
        ehr.auth.invalidate()
        await ehr.client.read("Patient", "p1")
        assert ehr.router["discovery"].call_count == 1
        assert ehr.router["token"].call_count == 2
        assert ehr.auth.token_url == TOKEN_URL

    async def test_jti_is_never_reused(self, ehr: FakeEHR) -> None:
        """Every token request carries a new jti, even when the jti source repeats itself."""
        repeated = chain(["a", "a", "b", "b", "b", "c"], (str(i) for i in range(100)))
        ehr.auth._new_jti = lambda: next(repeated)
        _patient_route(ehr)
        for _ in range(5):
            ehr.auth.invalidate()
            await ehr.client.read("Patient", "p1")
        jtis = [c["jti"] for c in ehr.token.assertions]
        assert jtis[:3] == ["a", "b", "c"]
        assert len(set(jtis)) == len(jtis) == 5

    async def test_a_stuck_jti_source_is_refused(self, ehr: FakeEHR) -> None:
        """A jti source that only repeats stops the flow instead of replaying an assertion."""
        ehr.auth._new_jti = lambda: "same"
        _patient_route(ehr)
        await ehr.client.read("Patient", "p1")
        ehr.auth.invalidate()
        with pytest.raises(RuntimeError, match="jti"):
            await ehr.client.read("Patient", "p1")


class TestTokenCache:
    async def test_one_token_serves_many_requests(self, ehr: FakeEHR) -> None:
        """Requests within the token's life reuse it."""
        _patient_route(ehr)
        for _ in range(3):
            await ehr.client.read("Patient", "p1")
        assert ehr.router["token"].call_count == 1
        sent = ehr.router["patient"].calls
        assert {c.request.headers["Authorization"] for c in sent} == {"Bearer tok-1"}

    async def test_concurrent_requests_share_one_token_fetch(self, ehr: FakeEHR) -> None:
        """Twenty requests started together fetch a single token."""
        _patient_route(ehr)
        await asyncio.gather(*(ehr.client.read("Patient", "p1") for _ in range(20)))
        assert ehr.router["token"].call_count == 1

    async def test_token_is_renewed_shortly_before_expiry(self, ehr: FakeEHR) -> None:
        """A 300 s token is used for 240 s (a fifth of its life kept in reserve), then renewed."""
        _patient_route(ehr)
        await ehr.client.read("Patient", "p1")
        ehr.clock.now += 239
        await ehr.client.read("Patient", "p1")
        assert ehr.router["token"].call_count == 1
        ehr.clock.now += 2
        await ehr.client.read("Patient", "p1")
        assert ehr.router["token"].call_count == 2
        assert ehr.router["patient"].calls[-1].request.headers["Authorization"] == "Bearer tok-2"

    async def test_short_tokens_keep_a_proportional_margin(self, ehr: FakeEHR) -> None:
        """A 10 s token is renewed after 8 s, not treated as already expired."""
        ehr.token.expires_in = 10
        _patient_route(ehr)
        await ehr.client.read("Patient", "p1")
        ehr.clock.now += 7
        await ehr.client.read("Patient", "p1")
        assert ehr.router["token"].call_count == 1


class TestReauthentication:
    async def test_a_401_fetches_one_new_token_and_repeats_once(self, ehr: FakeEHR) -> None:
        """A token that died early (401) is replaced once and the request repeated."""
        ehr.router.get(f"{BASE}/Patient/p1", name="patient").mock(side_effect=[
            httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}),
            httpx.Response(200, json=PATIENT),
        ])
        assert await ehr.client.read("Patient", "p1") == PATIENT
        assert ehr.router["token"].call_count == 2
        auths = [c.request.headers["Authorization"] for c in ehr.router["patient"].calls]
        assert auths == ["Bearer tok-1", "Bearer tok-2"]

    async def test_a_second_401_is_an_authentication_error(self, ehr: FakeEHR) -> None:
        """Still 401 with a fresh token: no loop, a clear error."""
        ehr.router.get(f"{BASE}/Patient/p1", name="patient").respond(401)
        with pytest.raises(AuthenticationError, match="after a fresh token") as info:
            await ehr.client.read("Patient", "p1")
        assert info.value.status == 401
        assert ehr.router["token"].call_count == 2
        assert ehr.router["patient"].call_count == 2

    async def test_concurrent_401s_refresh_once(self, ehr: FakeEHR) -> None:
        """Many requests hitting 401 with the same dead token cause one refresh, not many."""
        dead = {"Bearer tok-1"}

        def answer(request: httpx.Request) -> httpx.Response:
            if request.headers["Authorization"] in dead:
                return httpx.Response(401)
            return httpx.Response(200, json=PATIENT)

        ehr.router.get(f"{BASE}/Patient/p1", name="patient").mock(side_effect=answer)
        await asyncio.gather(*(ehr.client.read("Patient", "p1") for _ in range(10)))
        assert ehr.router["token"].call_count == 2


class TestTokenEndpointErrors:
    async def test_oauth_error_description_is_surfaced(self, ehr: FakeEHR) -> None:
        """invalid_client: an AuthenticationError naming the client, key and the server's
        reason, without retries."""
        ehr.router.post(TOKEN_URL, name="token").respond(400, json={
            "error": "invalid_client", "error_description": "kid not in the client's key set"})
        with pytest.raises(AuthenticationError, match="kid not in the client's key set") as info:
            await ehr.client.read("Patient", "p1")
        assert CLIENT_ID in str(info.value) and ehr.auth.key.kid in str(info.value)
        assert ehr.router["token"].call_count == 1
        assert ehr.sleeps.delays == []

    async def test_busy_token_endpoint_is_retried(self, ehr: FakeEHR) -> None:
        """429 from the token endpoint: back off (Retry-After) and try again."""
        calls = iter([httpx.Response(429, headers={"Retry-After": "3"},
                                     json={"error": "slow_down"})])

        def answer(request: httpx.Request) -> httpx.Response:
            return next(calls, None) or ehr.token(request)

        ehr.router["token"].mock(side_effect=answer)
        _patient_route(ehr)
        assert await ehr.client.read("Patient", "p1") == PATIENT
        assert ehr.sleeps.delays == [3.0]

    async def test_missing_discovery_says_what_to_do(self, ehr: FakeEHR) -> None:
        """No smart-configuration: an error pointing at fhir_base or an explicit endpoint."""
        ehr.router.get(f"{BASE}/.well-known/smart-configuration", name="discovery").respond(404)
        with pytest.raises(AuthenticationError, match="token endpoint explicitly"):
            await ehr.client.read("Patient", "p1")

    async def test_discovery_without_our_algorithm_is_refused(self, ehr: FakeEHR) -> None:
        """A server that only takes RS384 is told apart from a key problem."""
        ehr.router.get(f"{BASE}/.well-known/smart-configuration", name="discovery").respond(
            json={"token_endpoint": TOKEN_URL,
                  "token_endpoint_auth_signing_alg_values_supported": ["RS384"]})
        with pytest.raises(AuthenticationError, match="does not accept ES384"):
            await ehr.client.read("Patient", "p1")

    async def test_configured_token_url_skips_discovery(self, ehr: FakeEHR,
                                                        es_key: SigningKey) -> None:
        """A token_url given in the configuration is used as is."""
        auth = SmartBackendAuth(fhir_base=BASE, client_id=CLIENT_ID, key=es_key, scopes=[],
                                token_url=TOKEN_URL, clock=ehr.clock)
        _patient_route(ehr)
        async with FHIRClient(BASE, auth=auth) as client:
            await client.read("Patient", "p1")
        assert ehr.router["discovery"].call_count == 0


class TestSyncClients:
    def test_the_same_flow_serves_a_sync_httpx_client(self, ehr: FakeEHR) -> None:
        """httpx.Client with the auth: discovery, token, request, 401 and one re-auth."""
        answers = iter([httpx.Response(401), httpx.Response(200, json=PATIENT)])
        ehr.router.get(f"{BASE}/Patient/p1", name="patient").mock(
            side_effect=lambda request: next(answers))
        with httpx.Client(auth=ehr.auth) as client:
            response = client.get(f"{BASE}/Patient/p1")
        assert response.json() == PATIENT
        assert ehr.router["token"].call_count == 2
