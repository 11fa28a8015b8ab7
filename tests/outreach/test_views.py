"""GET /patients/{id}/outreach, ``careloop outreach preview``, and the stage's wiring (the
in-process thread, the Celery tasks and beat schedule)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from integration.api import create_app
from integration.models import touches
from integration.runtime import Runtime
from tests.helpers import settings_for
from tests.outreach.support import PATHWAYS, T0_SIU, ny, receive, stage, touch

T0 = ny(2026, 3, 1, 9, 0)


class TestOutreachApi:
    def test_lists_touches_with_reasons(self, engine: Engine, db_url: str,
                                        tmp_path: Path) -> None:
        """Scheduled and skipped touches, newest first, each with its reason; paging; audit."""
        s = stage(engine, tmp_path)
        receive(engine, T0_SIU(ny(2026, 3, 2, 14)), T0)
        s.reconcile(T0)
        pid = touch(engine, "appointment-reminder|1|").patient_id
        runtime = Runtime(settings_for(db_url), engine=engine, with_mllp=False,
                          dispatcher=_Nothing())
        client = TestClient(create_app(runtime))
        r = client.get(f"/patients/{pid}/outreach")
        assert r.status_code == 200
        body = r.json()
        by_step = {i["step"]: i for i in body["items"]}
        assert by_step[0]["status"] == "skipped" and "had passed" in by_step[0]["reason"]
        assert by_step[1]["status"] == "scheduled" and by_step[1]["channel"] == "sms"
        assert "address" not in by_step[1]
        page = client.get(f"/patients/{pid}/outreach", params={"limit": 1}).json()
        assert len(page["items"]) == 1 and page["next_cursor"]
        rest = client.get(f"/patients/{pid}/outreach",
                          params={"limit": 1, "cursor": page["next_cursor"]}).json()
        assert rest["items"][0]["id"] != page["items"][0]["id"]
        only = client.get(f"/patients/{pid}/outreach", params={"status": "skipped"}).json()
        assert {i["status"] for i in only["items"]} == {"skipped"}
        bad = client.get(f"/patients/{pid}/outreach", params={"status": "nope"})
        assert bad.status_code == 400


class _Nothing:
    def dispatch(self, inbox_ids: object) -> None:
        return None


class TestPreview:
    def test_prints_what_would_be_sent_and_why_not(self, sqlite_url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        from integration.cli import main
        from integration.db import create_db_engine

        engine = create_db_engine(sqlite_url)
        receive(engine, T0_SIU(ny(2026, 3, 2, 14)), T0)
        with engine.connect() as conn:
            from integration.models import patients

            pid = conn.execute(select(patients.c.id)).scalar_one()
        config = tmp_path / "careloop.toml"
        config.write_text(_toml())
        monkeypatch.setenv("CARELOOP_CONFIG", str(config))
        monkeypatch.setenv("CARELOOP_DATABASE_URL", sqlite_url)
        # configure_logging caches loggers for the rest of the session: keep it out of here
        monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
        result = CliRunner().invoke(main, ["outreach", "preview", pid,
                                           "--at", T0.isoformat()])
        assert result.exit_code == 0, result.output
        assert "SEND  2026-03-02 12:00 EST" in result.output
        assert "sms, es, template appointment-reminder-short" in result.output
        assert "SKIP" in result.output and "had passed" in result.output
        with engine.connect() as conn:
            assert conn.execute(select(touches)).first() is None  # nothing written
        missing = CliRunner().invoke(main, ["outreach", "preview", "nobody"])
        assert missing.exit_code == 1


def _toml() -> str:
    lines = ['timezone = "America/New_York"']
    for p in PATHWAYS:
        lines.append("[[pathways]]")
        lines.append(f'name = "{p.name}"')
        lines.append(f'on = "{p.on.value}"')
        if p.when.status:
            lines.append(f'when = {{ status = ["{p.when.status[0]}"] }}')
        if p.survey_url:
            lines.append(f'survey_url = "{p.survey_url}"')
        steps = ", ".join(
            f'{{ at = "{_iso(s.at)}", channel = "{s.channel}", template = "{s.template}" }}'
            for s in p.steps)
        lines.append(f"steps = [{steps}]")
    return "\n".join(lines) + "\n"


def _iso(delta: Any) -> str:
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    return f"{sign}PT{abs(seconds)}S"


class TestWiring:
    def test_in_process_thread_sends(self, sqlite_url: str, tmp_path: Path) -> None:
        """``serve`` without a broker: the outreach thread reconciles and sweeps on its own."""
        from datetime import UTC, datetime, timedelta

        from integration.db import create_db_engine

        engine = create_db_engine(sqlite_url)
        settings = settings_for(sqlite_url, pathways=[p.model_dump() for p in PATHWAYS[1:2]],
                                outreach={"outbox_dir": str(tmp_path), "interval_s": 0.05,
                                          "quiet_hours": "off"},
                                timezone="America/New_York")
        runtime = Runtime(settings, engine=engine, with_mllp=False, dispatcher=_Nothing())
        assert runtime.outreach is not None
        runtime.outreach = type(runtime.outreach)(engine, runtime.outreach.config,
                                                  channels=runtime.outreach.channels)
        now = datetime.now(UTC)
        from tests.outreach.support import adt_a03

        receive(engine, adt_a03("A1", visit="V1", admitted=now - timedelta(hours=6),
                                discharged=now - timedelta(hours=4, seconds=-2)), now)
        runtime.outreach.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not list(tmp_path.rglob("*.json")):
                time.sleep(0.05)
        finally:
            runtime.outreach.stop()
        assert len(list(tmp_path.rglob("*.json"))) == 1

    def test_celery_tasks_and_beat(self, sqlite_url: str) -> None:
        """The Celery app has both outreach tasks, scheduled by beat on the outreach queue."""
        from integration.tasks import QUEUES, make_celery

        settings = settings_for(sqlite_url, broker_url="redis://127.0.0.1:1/0",
                                pathways=[p.model_dump() for p in PATHWAYS])
        app = make_celery(settings)
        assert {"careloop.outreach.reconcile", "careloop.outreach.send_due"} <= set(app.tasks)
        schedule = app.conf.beat_schedule
        assert schedule["outreach-send-due"]["options"]["queue"] == "outreach"
        assert schedule["outreach-reconcile"]["schedule"] == settings.outreach.interval_s
        assert "outreach" in QUEUES
