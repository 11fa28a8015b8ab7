"""POST /fhir/notify/{connection}: the channel secret, durable storage before the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from integration.api import create_app
from integration.fhir_state import ensure_secret
from integration.models import inbox
from integration.runtime import Runtime
from tests.helpers import settings_for
from tests.subscriptions.corpus_paths import SUBSCRIPTIONS, corpus_files

CONNECTION = {"name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
              "mode": "classic"}


def notification_files() -> list[Path]:
    """The corpus's notification Bundles (not the ``$status`` searchset)."""
    return [p for p in corpus_files()
            if json.loads(p.read_bytes().decode("utf-8-sig")).get("type")
            in ("history", "subscription-notification")]


def _sample() -> bytes:
    files = [p for p in corpus_files() if p.name == "heartbeat_bundle_example.json"]
    if not files:
        pytest.skip("shared corpus not found")
    return files[0].read_bytes()


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False,
                              http_max_body_bytes=64 * 1024, connections=[CONNECTION]),
                 with_mllp=False)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def secret(runtime: Runtime) -> str:
    return ensure_secret(runtime.engine, "ehr1")


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as c:
        yield c


def _rows(runtime: Runtime) -> list[dict[str, Any]]:
    with runtime.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(inbox).order_by(inbox.c.id))]


class TestSecret:
    @pytest.mark.parametrize("headers", [
        {}, {"Authorization": "Bearer wrong-secret-000000"}, {"Authorization": "Basic abc"},
        {"X-Careloop-Secret": "nope"},
    ])
    def test_wrong_or_missing_is_401_and_nothing_stored(
            self, client: TestClient, runtime: Runtime, secret: str,
            headers: dict[str, str]) -> None:
        r = client.post("/fhir/notify/ehr1", content=_sample(), headers=headers)
        assert r.status_code == 401
        assert r.json()["resourceType"] == "OperationOutcome"
        assert _rows(runtime) == []

    def test_no_secret_made_yet_is_401(self, client: TestClient, runtime: Runtime) -> None:
        r = client.post("/fhir/notify/ehr1", content=_sample(),
                        headers={"Authorization": "Bearer anything-at-all-1234"})
        assert r.status_code == 401
        assert _rows(runtime) == []

    def test_unknown_connection_is_404(self, client: TestClient, secret: str) -> None:
        r = client.post("/fhir/notify/other", content=_sample(),
                        headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 404
        assert r.json()["resourceType"] == "OperationOutcome"

    def test_api_tokens_are_not_needed_nor_taken(self, client: TestClient, runtime: Runtime,
                                                 secret: str) -> None:
        _client_id, api_secret = runtime.clients.create("app", ["admin"])
        r = client.post("/fhir/notify/ehr1", content=_sample(),
                        headers={"Authorization": f"Bearer {api_secret}"})
        assert r.status_code == 401


class TestStored:
    def test_good_secret_stored_then_200(self, client: TestClient, runtime: Runtime,
                                         secret: str) -> None:
        body = _sample()
        r = client.post("/fhir/notify/ehr1", content=body,
                        headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200
        (row,) = _rows(runtime)
        assert row["source"] == "fhir" and row["peer"] == "ehr1" and row["sender"] == "ehr1"
        assert row["message_type"] == "notification" and row["status"] == "received"
        assert bytes(row["raw"]) == body
        assert str(row["dedup_key"]).startswith("fhir:ehr1:")

    def test_x_careloop_secret_header_accepted(self, client: TestClient, runtime: Runtime,
                                               secret: str) -> None:
        r = client.post("/fhir/notify/ehr1", content=_sample(),
                        headers={"X-Careloop-Secret": secret})
        assert r.status_code == 200

    def test_duplicate_body_stored_once(self, client: TestClient, runtime: Runtime,
                                        secret: str) -> None:
        for _ in range(3):
            r = client.post("/fhir/notify/ehr1", content=_sample(),
                            headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200
        assert len(_rows(runtime)) == 1

    def test_too_large_is_413(self, client: TestClient, runtime: Runtime, secret: str) -> None:
        r = client.post("/fhir/notify/ehr1", content=b"{" + b" " * 70_000 + b"}",
                        headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 413
        assert _rows(runtime) == []

    def test_unreadable_is_kept_rejected_and_400(self, client: TestClient, runtime: Runtime,
                                                 secret: str) -> None:
        r = client.post("/fhir/notify/ehr1", content=b'{"resourceType": "Patient"}',
                        headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 400
        assert r.json()["resourceType"] == "OperationOutcome"
        (row,) = _rows(runtime)
        assert row["status"] == "rejected" and row["last_error"]

    def test_storage_down_is_503(self, client: TestClient, runtime: Runtime,
                                 secret: str) -> None:
        async def broken(rows: object) -> object:
            from integration.intake import StorageUnavailable
            raise StorageUnavailable("down")
        runtime.committer.submit = broken  # type: ignore[method-assign,assignment]
        r = client.post("/fhir/notify/ehr1", content=_sample(),
                        headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"

    @pytest.mark.corpus
    def test_every_corpus_notification_is_stored(self, client: TestClient, runtime: Runtime,
                                                 secret: str) -> None:
        files = notification_files()
        if not files:
            pytest.skip("shared corpus not found")
        for path in files:
            r = client.post("/fhir/notify/ehr1", content=path.read_bytes(),
                            headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200, (path.relative_to(SUBSCRIPTIONS), r.text)
        rows = _rows(runtime)
        assert len(rows) == len(files)
        assert {r["status"] for r in rows} == {"received"}
