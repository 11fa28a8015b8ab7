"""POST /hl7v2, health and metrics over HTTP."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from integration.api import create_app
from integration.models import inbox
from integration.runtime import Runtime
from tests.helpers import adt, msa, settings_for


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(
        settings_for(db_url, auth="required", inprocess_worker=False, http_max_body_bytes=4096),
        with_mllp=False,
    )
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as c:
        yield c


@pytest.fixture
def auth(runtime: Runtime) -> dict[str, str]:
    client_id, secret = runtime.clients.create("engine", ["hl7.write"])
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def rows(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(inbox)).scalar_one())


class TestPostHL7:
    def test_accepted_200_with_ack(self, client: TestClient, auth: dict[str, str],
                                   runtime: Runtime) -> None:
        r = client.post("/hl7v2", content=adt("H1"), headers=auth)
        assert r.status_code == 200
        assert msa(r.content)[1:3] == ["AA", "H1"]
        assert rows(runtime) == 1

    def test_several_messages_in_one_body(self, client: TestClient, auth: dict[str, str]) -> None:
        body = adt("H2").replace(b"\r", b"\n") + adt("H3").replace(b"\r", b"\r\n")
        r = client.post("/hl7v2", content=body, headers=auth)
        assert r.status_code == 200
        acks = [seg for seg in r.text.split("\r") if seg.startswith("MSA")]
        assert [a.split("|")[2] for a in acks] == ["H2", "H3"]

    def test_content_error_422(self, client: TestClient, auth: dict[str, str]) -> None:
        r = client.post("/hl7v2", content=adt("H4", pid=False), headers=auth)
        assert r.status_code == 422
        assert msa(r.content)[1] == "AE"

    def test_unreadable_400(self, client: TestClient, auth: dict[str, str]) -> None:
        r = client.post("/hl7v2", content=b"hello", headers=auth)
        assert r.status_code == 400
        assert msa(r.content)[1] == "AR"

    def test_body_too_large_413(self, client: TestClient, auth: dict[str, str],
                                runtime: Runtime) -> None:
        r = client.post("/hl7v2", content=adt("H5") + b"NTE|" + b"x" * 5000, headers=auth)
        assert r.status_code == 413
        assert r.json()["code"] == "body_too_large"
        assert rows(runtime) == 0

    def test_no_credentials_401(self, client: TestClient) -> None:
        r = client.post("/hl7v2", content=adt("H6"))
        assert r.status_code == 401
        assert r.json()["code"] == "unauthenticated"
        assert "Basic" in r.headers["www-authenticate"]

    def test_wrong_secret_401(self, client: TestClient, auth: dict[str, str]) -> None:
        client_id = base64.b64decode(auth["Authorization"][6:]).decode().split(":")[0]
        bad = base64.b64encode(f"{client_id}:wrong".encode()).decode()
        r = client.post("/hl7v2", content=adt("H7"), headers={"Authorization": f"Basic {bad}"})
        assert r.status_code == 401
        assert r.json()["code"] == "invalid_client"

    def test_wrong_scope_403(self, client: TestClient, runtime: Runtime) -> None:
        client_id, secret = runtime.clients.create("reader", ["timeline.read"])
        token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        r = client.post("/hl7v2", content=adt("H8"), headers={"Authorization": f"Basic {token}"})
        assert r.status_code == 403

    def test_disabled_client_refused(self, client: TestClient, runtime: Runtime) -> None:
        client_id, secret = runtime.clients.create("old", ["hl7.write"])
        runtime.clients.disable(client_id)
        token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        r = client.post("/hl7v2", content=adt("H9"), headers={"Authorization": f"Basic {token}"})
        assert r.status_code == 401

    def test_storage_down_503(self, client: TestClient, auth: dict[str, str],
                              runtime: Runtime) -> None:
        runtime.clients.authenticate_basic(auth["Authorization"])  # cached before the outage
        with runtime.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE inbox RENAME TO inbox_gone")
        r = client.post("/hl7v2", content=adt("H10"), headers=auth)
        assert r.status_code == 503
        assert r.headers["retry-after"]


class TestOps:
    def test_health(self, client: TestClient) -> None:
        assert client.get("/health/live").json() == {"status": "ok"}
        r = client.get("/health/ready")
        assert r.status_code == 200
        assert r.json()["checks"]["database"] == "ok"

    def test_metrics(self, client: TestClient, auth: dict[str, str]) -> None:
        client.post("/hl7v2", content=adt("M1"), headers=auth)
        text = client.get("/metrics").text
        assert 'careloop_messages_total{ack_code="AA",message_type="ADT^A01",source="http"}' in text
        assert "careloop_ack_latency_seconds_bucket" in text
        assert 'careloop_queue_depth{stage="intake"} 1.0' in text

    def test_unknown_path_json_error(self, client: TestClient) -> None:
        r = client.get("/nope")
        assert r.status_code == 404
        assert r.json()["code"] == "not_found"


class TestJWKS:
    def test_published_keys_served(self, runtime: Runtime, tmp_path: object) -> None:
        from pathlib import Path

        from integration.keys import JWKSFile

        folder = Path(str(tmp_path)) / "keys"
        rt = Runtime(settings_for(str(runtime.engine.url), inprocess_worker=False,
                                  keys_dir=folder), with_mllp=False)
        with TestClient(create_app(rt)) as c:
            assert c.get("/.well-known/jwks.json").json() == {"keys": []}
            key = JWKSFile(folder / "jwks.json").generate("ES384", folder / "k.pem")
            body = c.get("/.well-known/jwks.json").json()
        rt.engine.dispose()
        assert [k["kid"] for k in body["keys"]] == [key.kid]
        assert "d" not in body["keys"][0]
