"""POST /oauth/token and bearer tokens: client secrets, private_key_jwt, scopes, expiry."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import update

from integration.api import create_app
from integration.models import access_tokens
from integration.runtime import Runtime
from tests.helpers import adt, settings_for

TOKEN_URL = "http://testserver.example/oauth/token"


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(
        settings_for(db_url, auth="required", inprocess_worker=False,
                     base_url="http://testserver.example"),
        with_mllp=False,
    )
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as c:
        yield c


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def assertion(key: Any, client_id: str, alg: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 240,
              "iat": now, "jti": uuid.uuid4().hex}
    claims.update(overrides)
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[alg])


def jwt_form(token: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": token,
        **extra,
    }


class TestSecrets:
    def test_client_secret_basic(self, client: TestClient, runtime: Runtime) -> None:
        cid, secret = runtime.clients.create("engine", ["hl7.write"])
        r = client.post("/oauth/token", data={"grant_type": "client_credentials"},
                        headers=basic(cid, secret))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"] == "Bearer"
        assert body["scope"] == "hl7.write"
        assert 0 < body["expires_in"] <= 3600
        assert r.headers["cache-control"] == "no-store"
        sent = client.post("/hl7v2", content=adt("T1"),
                           headers={"Authorization": f"Bearer {body['access_token']}"})
        assert sent.status_code == 200

    def test_client_secret_post_and_scope_subset(self, client: TestClient,
                                                 runtime: Runtime) -> None:
        cid, secret = runtime.clients.create("app", ["timeline.read", "outreach.read"])
        r = client.post("/oauth/token", data={"grant_type": "client_credentials",
                                              "client_id": cid, "client_secret": secret,
                                              "scope": "timeline.read"})
        assert r.status_code == 200
        assert r.json()["scope"] == "timeline.read"

    def test_wrong_secret_401(self, client: TestClient, runtime: Runtime) -> None:
        cid, _ = runtime.clients.create("engine", ["hl7.write"])
        r = client.post("/oauth/token", data={"grant_type": "client_credentials"},
                        headers=basic(cid, "nope"))
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_client"

    def test_scope_not_granted_400(self, client: TestClient, runtime: Runtime) -> None:
        cid, secret = runtime.clients.create("engine", ["hl7.write"])
        r = client.post("/oauth/token", data={"grant_type": "client_credentials",
                                              "scope": "admin"}, headers=basic(cid, secret))
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_scope"

    def test_unsupported_grant_400(self, client: TestClient, runtime: Runtime) -> None:
        cid, secret = runtime.clients.create("engine", ["hl7.write"])
        r = client.post("/oauth/token", data={"grant_type": "password"},
                        headers=basic(cid, secret))
        assert r.status_code == 400
        assert r.json()["error"] == "unsupported_grant_type"

    def test_no_client_authentication_401(self, client: TestClient) -> None:
        r = client.post("/oauth/token", data={"grant_type": "client_credentials"})
        assert r.status_code == 401


class TestBearer:
    def _token(self, client: TestClient, runtime: Runtime, scopes: list[str]) -> tuple[str, str]:
        cid, secret = runtime.clients.create("c", scopes)
        r = client.post("/oauth/token", data={"grant_type": "client_credentials"},
                        headers=basic(cid, secret))
        return cid, r.json()["access_token"]

    def test_wrong_scope_403(self, client: TestClient, runtime: Runtime) -> None:
        _, token = self._token(client, runtime, ["timeline.read"])
        r = client.post("/hl7v2", content=adt("B1"), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403
        assert r.json()["code"] == "insufficient_scope"

    def test_unknown_token_401(self, client: TestClient) -> None:
        r = client.post("/hl7v2", content=adt("B2"), headers={"Authorization": "Bearer made-up"})
        assert r.status_code == 401
        assert r.json()["code"] == "invalid_token"
        assert "invalid_token" in r.headers["www-authenticate"]

    def test_expired_token_401(self, client: TestClient, runtime: Runtime) -> None:
        _, token = self._token(client, runtime, ["hl7.write"])
        with runtime.engine.begin() as conn:
            conn.execute(update(access_tokens).values(expires_at=access_tokens.c.created_at))
        runtime.tokens._cache.clear()
        r = client.post("/hl7v2", content=adt("B3"), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401

    def test_disabled_client_token_refused(self, client: TestClient, runtime: Runtime) -> None:
        cid, token = self._token(client, runtime, ["hl7.write"])
        runtime.clients.disable(cid)
        runtime.tokens._cache.clear()
        r = client.post("/hl7v2", content=adt("B4"), headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


@pytest.fixture(params=["RS384", "ES384"])
def keypair(request: pytest.FixtureRequest) -> tuple[Any, str]:
    alg = request.param
    key = (RSAKey.generate_key(2048, parameters={"kid": "k1"}) if alg.startswith("RS")
           else ECKey.generate_key("P-384", parameters={"kid": "k1"}))
    return key, alg


class TestPrivateKeyJWT:
    def _register(self, runtime: Runtime, key: Any) -> str:
        cid, secret = runtime.clients.create(
            "backend", ["timeline.read"], jwks={"keys": [key.as_dict(private=False)]}
        )
        assert secret == ""
        return cid

    def test_valid_assertion_gets_token(self, client: TestClient, runtime: Runtime,
                                        keypair: tuple[Any, str]) -> None:
        key, alg = keypair
        cid = self._register(runtime, key)
        r = client.post("/oauth/token", data=jwt_form(assertion(key, cid, alg)))
        assert r.status_code == 200, r.text
        assert r.json()["scope"] == "timeline.read"

    def test_replayed_assertion_refused(self, client: TestClient, runtime: Runtime,
                                        keypair: tuple[Any, str]) -> None:
        key, alg = keypair
        cid = self._register(runtime, key)
        token = assertion(key, cid, alg)
        assert client.post("/oauth/token", data=jwt_form(token)).status_code == 200
        again = client.post("/oauth/token", data=jwt_form(token))
        assert again.status_code == 401
        assert "replayed" in again.json()["error_description"]

    def test_forged_assertion_refused(self, client: TestClient, runtime: Runtime,
                                      keypair: tuple[Any, str]) -> None:
        """Signed by another key with the registered kid: refused."""
        key, alg = keypair
        cid = self._register(runtime, key)
        other = (RSAKey.generate_key(2048, parameters={"kid": "k1"}) if alg.startswith("RS")
                 else ECKey.generate_key("P-384", parameters={"kid": "k1"}))
        r = client.post("/oauth/token", data=jwt_form(assertion(other, cid, alg)))
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_client"

    @pytest.mark.parametrize(
        ("claims", "why"),
        [
            ({"aud": "https://elsewhere/token"}, "aud"),
            ({"exp": int(time.time()) - 600}, "expired"),
            ({"exp": int(time.time()) + 3600}, "five minutes"),
            ({"sub": "someone-else"}, "sub"),
            ({"jti": ""}, "jti"),
        ],
    )
    def test_bad_claims_refused(self, client: TestClient, runtime: Runtime,
                                claims: dict[str, Any], why: str) -> None:
        key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        cid = self._register(runtime, key)
        r = client.post("/oauth/token", data=jwt_form(assertion(key, cid, "RS384", **claims)))
        assert r.status_code == 401
        assert why in r.json()["error_description"]

    def test_unsigned_assertion_refused(self, client: TestClient, runtime: Runtime) -> None:
        key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        cid = self._register(runtime, key)
        header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
        payload = base64.urlsafe_b64encode(
            f'{{"iss":"{cid}","sub":"{cid}","aud":"{TOKEN_URL}","exp":{int(time.time()) + 60},'
            f'"jti":"x"}}'.encode()
        ).rstrip(b"=").decode()
        r = client.post("/oauth/token", data=jwt_form(f"{header}.{payload}."))
        assert r.status_code == 401

    def test_key_client_cannot_use_empty_secret(self, client: TestClient,
                                                runtime: Runtime) -> None:
        key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        cid = self._register(runtime, key)
        r = client.post("/oauth/token", data={"grant_type": "client_credentials",
                                              "client_id": cid, "client_secret": ""})
        assert r.status_code == 401
