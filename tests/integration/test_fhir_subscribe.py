"""careloop subscriptions ensure: create, then only keep; secrets and state rows stored."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from adapters.fhir import FHIRRequest, FHIRResponse
from integration.db import create_db_engine
from integration.fhir_state import read_secret
from integration.fhir_subscribe import ensure_subscriptions
from integration.models import fhir_subscriptions
from tests.helpers import settings_for
from tests.subscriptions.fake_api import FakeApi, searchset

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
TOPIC = "http://example.org/topics/appointment-change"


class SubscriptionServer:
    def __init__(self) -> None:
        self.subs: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.writes: list[str] = []

    def __call__(self, request: FHIRRequest, params: dict[str, str]) -> Any:
        path = request.path
        if request.method == "GET" and path.startswith("Subscription"):
            url = params.get("url")
            return searchset([s for s in self.subs.values()
                              if s["channel"]["endpoint"] == url])
        if request.method == "POST" and path == "Subscription":
            assert request.body is not None
            sid = str(next(self.ids))
            body = {**request.body, "id": sid, "meta": {"versionId": "1"}}
            body["status"] = "active"
            self.subs[sid] = body
            self.writes.append(f"create {sid}")
            return FHIRResponse(201, body, {}, path)
        if request.method == "PUT":
            assert request.body is not None
            sid = path.split("/")[1]
            self.subs[sid] = {**request.body, "status": "active"}
            self.writes.append(f"update {sid}")
            return FHIRResponse(200, self.subs[sid], {}, path)
        if request.method == "DELETE":
            sid = path.split("/")[1]
            self.subs.pop(sid)
            self.writes.append(f"delete {sid}")
            return FHIRResponse(204, None, {}, path)
        if path == "metadata":
            return {"resourceType": "CapabilityStatement"}
        return searchset([])


def _settings(db_url: str, **conn: Any) -> Any:
    return settings_for(db_url, base_url="http://careloop.test", connections=[{
        "name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
        "mode": "backport", "payload": "id-only", "resource_types": ["Appointment"],
        "topics": {"Appointment": TOPIC}, **conn}])


async def test_create_then_keep(db_url: str) -> None:
    server = SubscriptionServer()
    api = FakeApi(server)
    settings = _settings(db_url)
    engine = create_db_engine(db_url)
    try:
        lines = await ensure_subscriptions(engine, settings, client_factory=lambda _c: api,
                                           now=NOW)
        assert [(ln.action, ln.subscription_id) for ln in lines] == [("created", "1")]
        sub = server.subs["1"]
        secret = read_secret(engine, "ehr1")
        assert secret and sub["channel"]["header"] == [f"Authorization: Bearer {secret}"]
        assert sub["channel"]["endpoint"] == "http://careloop.test/fhir/notify/ehr1"
        again = await ensure_subscriptions(engine, settings, client_factory=lambda _c: api,
                                           now=NOW)
        assert [(ln.action, ln.subscription_id) for ln in again] == [("kept", "1")]
        assert server.writes == ["create 1"]
        with engine.connect() as conn:
            row = conn.execute(select(fhir_subscriptions)).one()
        assert (row.subscription_id, row.mode, row.topic) == ("1", "backport", TOPIC)
        assert row.tracker["subscription"] == "1"
    finally:
        engine.dispose()


async def test_error_subscription_caught_up_then_reactivated(db_url: str) -> None:
    server = SubscriptionServer()
    api = FakeApi(server)
    settings = _settings(db_url)
    engine = create_db_engine(db_url)
    try:
        await ensure_subscriptions(engine, settings, client_factory=lambda _c: api, now=NOW)
        server.subs["1"]["status"] = "error"
        lines = await ensure_subscriptions(engine, settings, client_factory=lambda _c: api,
                                           now=NOW)
        assert [ln.action for ln in lines] == ["caught-up", "updated"]
        assert server.writes == ["create 1", "update 1"]
        assert server.subs["1"]["status"] == "active"
    finally:
        engine.dispose()


async def test_bad_spec_reported_and_others_go_on(db_url: str) -> None:
    settings = _settings(db_url, mode="classic", payload="id-only")
    engine = create_db_engine(db_url)
    try:
        lines = await ensure_subscriptions(
            engine, settings, client_factory=lambda _c: FakeApi(SubscriptionServer()), now=NOW)
        assert [ln.action for ln in lines] == ["error"]
        assert "id-only" in lines[0].detail
    finally:
        engine.dispose()


async def test_poll_connections_only_get_a_row(db_url: str) -> None:
    settings = _settings(db_url, mode="poll")
    engine = create_db_engine(db_url)
    try:
        lines = await ensure_subscriptions(engine, settings, now=NOW)
        assert [ln.action for ln in lines] == ["poll"]
    finally:
        engine.dispose()


def test_cli_ensure(db_url: str, tmp_path: Any, monkeypatch: Any) -> None:
    """``careloop subscriptions ensure`` prints a line per type; without connections, exit 2."""
    from click.testing import CliRunner

    from integration.cli import main

    # configure_logging caches loggers for the rest of the session: keep it out of here
    monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
    monkeypatch.setenv("CARELOOP_DATABASE_URL", db_url)
    monkeypatch.setenv("CARELOOP_LOG_LEVEL", "warning")
    monkeypatch.delenv("CARELOOP_CONFIG", raising=False)
    runner = CliRunner()
    empty = runner.invoke(main, ["subscriptions", "ensure"])
    assert empty.exit_code == 2 and "no [[connections]]" in empty.output
    cfg = tmp_path / "careloop.toml"
    cfg.write_text('[[connections]]\nname = "ehr1"\nfhir_base = "http://ehr.invalid/fhir"\n'
                   'client_id = "careloop"\nmode = "poll"\nresource_types = ["Appointment"]\n')
    monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
    done = runner.invoke(main, ["subscriptions", "ensure"])
    assert done.exit_code == 0, done.output
    assert "poll" in done.output and "Appointment" in done.output


async def test_timer_renews_subscriptions_hourly(sqlite_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The FHIR timer re-runs ``ensure`` every ``subscription_renew_s`` (never at start)."""
    from integration import fhir_subscribe
    from integration.db import create_db_engine
    from integration.fhir_ingest import FhirIngest
    from tests.helpers import settings_for

    calls: list[int] = []

    async def fake_ensure(*_a: object, **_k: object) -> list[object]:
        calls.append(1)
        return []

    monkeypatch.setattr(fhir_subscribe, "ensure_subscriptions", fake_ensure)
    engine = create_db_engine(sqlite_url)
    ingest = FhirIngest(engine, settings_for(sqlite_url, subscription_renew_s=3600))
    await ingest.tick()
    assert calls == []
    ingest._last_ensure -= 3601
    await ingest.tick()
    await ingest.tick()
    assert calls == [1]
    engine.dispose()
