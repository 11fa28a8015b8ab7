"""``careloop writeback list`` and ``careloop writeback replay``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from integration.cli import main
from integration.db import create_db_engine, write_lock
from integration.models import ehr_outbox
from integration.writeback import enqueue
from tests.writeback.support import EHR, NOW, outbox


def test_list_and_replay(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = create_db_engine(sqlite_url)
    with write_lock(engine), engine.begin() as conn:
        for key in ("touch-aaa", "touch-bbb", "request-1-confirm"):
            enqueue(conn, key=key, connection=EHR, resource_type="Communication", now=NOW,
                    resource={"resourceType": "Communication", "status": "completed"})
        conn.execute(update(ehr_outbox).where(ehr_outbox.c.key == "touch-aaa").values(
            status="failed", attempts=2,
            last_error="POST Communication: HTTP 422: payload is required"))
        conn.execute(update(ehr_outbox).where(ehr_outbox.c.key == "touch-bbb").values(
            status="written", ehr_ref="Communication/c1"))
    monkeypatch.delenv("CARELOOP_CONFIG", raising=False)
    monkeypatch.setenv("CARELOOP_DATABASE_URL", sqlite_url)
    # configure_logging caches loggers for the rest of the session: keep it out of here
    monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
    runner = CliRunner()

    listed = runner.invoke(main, ["writeback", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:3] == ["ID", "KEY", "CONNECTION"]
    assert "request-1-confirm" in lines[1] and "pending" in lines[1]
    assert "Communication/c1" in lines[2]
    assert "touch-aaa" in lines[3] and "HTTP 422: payload is required" in lines[3]

    failed = runner.invoke(main, ["writeback", "list", "--status", "failed", "--limit", "5"])
    assert failed.exit_code == 0 and len(failed.output.splitlines()) == 2

    usage = runner.invoke(main, ["writeback", "replay"])
    assert usage.exit_code == 2 and "--failed" in usage.output

    replayed = runner.invoke(main, ["writeback", "replay", "--failed"])
    assert replayed.exit_code == 0 and "1 row will be written again" in replayed.output
    assert [(r.key, r.status, r.attempts) for r in outbox(engine)] == [
        ("touch-aaa", "pending", 0), ("touch-bbb", "written", 0),
        ("request-1-confirm", "pending", 0)]
    again = runner.invoke(main, ["writeback", "replay", "--id", "2"])
    assert again.exit_code == 0 and "nothing to replay" in again.output
    engine.dispose()
