"""Retention: ``[retention]`` settings, :func:`integration.retention.purge`, ``careloop purge``
and the daily beat entry."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy import Engine, event, func, insert, select

from integration.cli import main
from integration.db import write_lock
from integration.loop_tasks import loop_schedule
from integration.models import (
    audit_events,
    channel_events,
    ehr_outbox,
    inbox,
    mapped_resources,
    touches,
)
from integration.retention import TABLES, purge
from integration.settings import Retention, SettingsError, load_settings
from tests.helpers import settings_for

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
OLD = timedelta(days=100)
NEW = timedelta(days=1)
ALL = dict.fromkeys(("raw_messages", "resources", "touches", "channel_events", "writeback",
                     "audit_events"), "P30D")
TOUCH_STATUSES = ("scheduled", "sending", "sent", "cancelled", "skipped", "failed")


def seed(engine: Engine, now: datetime = NOW) -> None:
    """Rows of every kind, in every state, 100 days old and 1 day old."""
    with write_lock(engine), engine.begin() as conn:
        n = 0
        for age_name, age in (("old", OLD), ("new", NEW)):
            at = now - age
            for status in ("received", "processed", "failed", "rejected"):
                n += 1
                inbox_id = conn.execute(insert(inbox).values(
                    source="mllp", dedup_key=f"k{n}", raw=b"MSH|^~\\&|", status=status,
                    received_at=at, message_type="ADT^A01", control_id=f"{age_name}-{status}",
                ).returning(inbox.c.id)).scalar_one()
                if status in ("processed", "received"):
                    # received: a failed message put back for a replay keeps its resources
                    for i in range(2 if status == "processed" else 1):
                        conn.execute(insert(mapped_resources).values(
                            inbox_id=inbox_id, resource_type="Patient", resource_id=f"r{i}",
                            resource={"resourceType": "Patient"}, created_at=at))
                if (age_name, status) == ("new", "processed"):
                    # a resource older than its message (its own period applies)
                    conn.execute(insert(mapped_resources).values(
                        inbox_id=inbox_id, resource_type="Patient", resource_id="early",
                        resource={"resourceType": "Patient"}, created_at=now - OLD))
            for status in TOUCH_STATUSES:
                # two of each, so that the purge needs several batches of two
                for copy in range(2):
                    conn.execute(insert(touches).values(
                        key=f"p|1|{age_name}-{status}-{copy}", pathway="p", step=1,
                        entry_id="e", patient_id="pat", status=status, body="hello",
                        created_at=at, updated_at=at))
            for status in ("pending", "processed", "failed"):
                conn.execute(insert(channel_events).values(
                    channel="sms", kind="inbound", provider_id=f"{age_name}-{status}",
                    address="+15550100", payload={}, status=status, received_at=at))
            for status in ("pending", "sending", "failed", "written"):
                conn.execute(insert(ehr_outbox).values(
                    key=f"{age_name}-{status}", connection="ehr", resource_type="Communication",
                    operation="create", resource={}, status=status, next_attempt_at=at,
                    created_at=at, updated_at=at))
            conn.execute(insert(audit_events).values(
                at=at, actor="client", action="timeline.read", target_type="Patient",
                target_id="pat"))


EXPECTED = {"mapped_resources": 3, "inbox": 3, "touches": 8, "channel_events": 2,
            "ehr_outbox": 1, "timeline_changes": 0, "audit_events": 1}


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "inbox": select(inbox.c.control_id),
        "mapped_resources": select(inbox.c.control_id, mapped_resources.c.resource_id)
        .join(inbox, inbox.c.id == mapped_resources.c.inbox_id),
        "touches": select(touches.c.key),
        "channel_events": select(channel_events.c.provider_id),
        "ehr_outbox": select(ehr_outbox.c.key),
        "audit_events": select(audit_events.c.action, audit_events.c.at),
    }
    with engine.connect() as conn:
        return {name: sorted(tuple(r) for r in conn.execute(query))
                for name, query in queries.items()}


@pytest.fixture
def deletes(engine: Engine) -> Iterator[list[str]]:
    """The DELETE statements run, by table."""
    seen: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM"):
            seen.append(statement.split()[2].strip('"'))

    event.listen(engine, "before_cursor_execute", spy)
    yield seen
    event.remove(engine, "before_cursor_execute", spy)


def test_purge_removes_only_old_final_rows_in_batches(
    engine: Engine, db_url: str, deletes: list[str]
) -> None:
    seed(engine)
    settings = settings_for(db_url, retention=ALL)
    counts = purge(engine, settings, now=NOW, batch=2)
    assert counts == EXPECTED
    assert deletes.count("touches") == 4  # 8 rows, two per transaction
    assert deletes.count("inbox") == 2

    left = snapshot(engine)
    assert left["inbox"] == [(f"{a}-{s}",) for a, s in [
        ("new", "failed"), ("new", "processed"), ("new", "received"), ("new", "rejected"),
        ("old", "received")]]
    assert left["mapped_resources"] == [
        ("new-processed", "r0"), ("new-processed", "r1"), ("new-received", "r0"),
        ("old-received", "r0")]
    kept_touches = {k for (k,) in left["touches"]}
    assert {k.split("|")[2].rsplit("-", 1)[0] for k in kept_touches} == {
        *(f"new-{s}" for s in TOUCH_STATUSES), "old-scheduled", "old-sending"}
    assert left["channel_events"] == [("new-failed",), ("new-pending",), ("new-processed",),
                                      ("old-pending",)]
    assert left["ehr_outbox"] == [(k,) for k in (
        "new-failed", "new-pending", "new-sending", "new-written", "old-failed", "old-pending",
        "old-sending")]

    with engine.connect() as conn:
        audits = conn.execute(select(audit_events).order_by(audit_events.c.id)).all()
    assert [a.action for a in audits] == ["timeline.read", "retention.purge"]
    run = audits[-1]
    assert (run.actor, run.target_id) == ("retention", "")
    assert run.detail["removed"] == EXPECTED
    assert run.detail["complete"] is True
    assert run.detail["cutoffs"]["touches"] == "2030-05-02T12:00:00Z"
    assert set(run.detail["cutoffs"]) == set(ALL)

    # forty days on, the remaining read and the first run's record are past retention too;
    # the second run's own record is not removed by that run
    second = NOW + timedelta(days=40)
    assert purge(engine, settings, now=second, batch=2)["audit_events"] == 2
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events.c.action, audit_events.c.at)).all()
    assert [r.action for r in rows] == ["retention.purge"]
    assert rows[0].at.replace(tzinfo=UTC) == second


def test_dry_run_counts_the_same_and_removes_nothing(engine: Engine, db_url: str) -> None:
    seed(engine)
    settings = settings_for(db_url, retention=ALL)
    before = snapshot(engine)
    assert purge(engine, settings, now=NOW, batch=2, dry_run=True) == EXPECTED
    assert snapshot(engine) == before  # not even an audit event
    assert purge(engine, settings, now=NOW, batch=1000) == EXPECTED


def test_each_period_on_its_own(engine: Engine, db_url: str) -> None:
    seed(engine)
    only_resources = settings_for(db_url, retention={"resources": "P30D"})
    counts = purge(engine, only_resources, now=NOW)
    # old processed message's two and the new message's early one; never the received one's
    assert counts == dict.fromkeys(TABLES, 0) | {"mapped_resources": 3}
    assert len(snapshot(engine)["inbox"]) == 8

    only_raw = settings_for(db_url, retention={"raw_messages": "P30D"})
    assert purge(engine, only_raw, now=NOW) == dict.fromkeys(TABLES, 0) | {"inbox": 3}
    left = snapshot(engine)
    assert ("old-received",) in left["inbox"] and len(left["touches"]) == 24

    long_touches = settings_for(db_url, retention={"touches": "P200D"})
    assert purge(engine, long_touches, now=NOW)["touches"] == 0


def test_nothing_set_keeps_everything(engine: Engine, db_url: str) -> None:
    seed(engine)
    before = snapshot(engine)
    assert purge(engine, settings_for(db_url), now=NOW) == dict.fromkeys(TABLES, 0)
    assert snapshot(engine) == before


def test_settings() -> None:
    r = Retention(raw_messages="P90D", touches="P1D", audit_events="P52W")
    assert r.raw_messages == timedelta(days=90) and r.audit_events == timedelta(weeks=52)
    assert r.resources is None and r.any_set()
    assert not Retention().any_set()
    for bad in ("PT23H", "-P30D", "PT0S", "P1M", "soon"):
        with pytest.raises(ValidationError):
            Retention(touches=bad)
    with pytest.raises(SettingsError, match=r"^retention\.writeback: .*at least one day"):
        load_settings(database_url="sqlite:///x.db", retention={"writeback": "PT12H"})
    with pytest.raises(SettingsError, match=r"retention\.forever: unknown setting"):
        load_settings(database_url="sqlite:///x.db", retention={"forever": "P1D"})


def test_beat_entry_only_when_a_period_is_set() -> None:
    kept = load_settings(database_url="sqlite:///x.db")
    assert "retention-purge" not in loop_schedule(kept)
    purged = load_settings(database_url="sqlite:///x.db", retention={"touches": "P30D"})
    entry = loop_schedule(purged)["retention-purge"]
    assert entry["task"] == "careloop.retention.purge"
    assert entry["schedule"] == 24 * 3600 and entry["options"]["queue"] == "outreach"


def table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """The printed table (structlog, unconfigured in tests, may print to stdout as well)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("TABLE"))
    rows = [line.split() for line in lines[start + 1:start + 1 + len(TABLES)]]
    return lines[start].split(), {row[0]: row[1:] for row in rows}


def test_cli_purge(engine: Engine, db_url: str, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    seed(engine, now)
    config = tmp_path / "careloop.toml"
    config.write_text('[retention]\ntouches = "P30D"\nraw_messages = "P30D"\n')
    monkeypatch.setenv("CARELOOP_CONFIG", str(config))
    monkeypatch.setenv("CARELOOP_DATABASE_URL", db_url)
    monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
    runner = CliRunner()

    dry = runner.invoke(main, ["purge", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    header, rows = table(dry.stdout)
    assert header == ["TABLE", "RETENTION", "WOULD", "REMOVE"]
    assert rows["touches"] == ["P30D", "8"]
    assert rows["inbox"] == ["P30D", "3"]
    assert rows["mapped_resources"] == ["forever", "2"]  # with their messages
    assert rows["audit_events"] == ["forever", "0"]

    done = runner.invoke(main, ["purge", "--batch", "3"])
    assert done.exit_code == 0, done.output
    header, removed = table(done.stdout)
    assert header == ["TABLE", "RETENTION", "REMOVED"]
    assert removed["touches"] == ["P30D", "8"] and removed["inbox"] == ["P30D", "3"]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(touches)).scalar_one() == 16
        assert conn.execute(select(audit_events.c.action).order_by(audit_events.c.id.desc())
                            ).scalars().first() == "retention.purge"

    monkeypatch.delenv("CARELOOP_CONFIG")
    nothing = runner.invoke(main, ["purge"])
    assert nothing.exit_code == 0
    assert "no [retention] period is set" in nothing.stdout


def test_celery_task(sqlite_url: str) -> None:
    """The worker's task purges with the settings it was built with."""
    from integration.db import create_db_engine
    from integration.tasks import make_celery

    engine = create_db_engine(sqlite_url)
    seed(engine, datetime.now(UTC))
    settings = settings_for(sqlite_url, broker_url="redis://127.0.0.1:1/0",
                            retention={"touches": "P30D"})
    app = make_celery(settings)
    assert app.conf.beat_schedule["retention-purge"]["task"] == "careloop.retention.purge"
    assert app.tasks["careloop.retention.purge"]() == 8
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(touches)).scalar_one() == 16
    engine.dispose()


def test_timeline_changes_go_once_every_consumer_has_read_them(engine: Engine,
                                                               db_url: str) -> None:
    """The change log is purged by age, but never past the slowest consumer's cursor."""
    from integration.models import outreach_cursors, timeline_changes

    with write_lock(engine), engine.begin() as conn:
        ids = [int(conn.execute(insert(timeline_changes).values(
            entry_id=f"e{i}", patient_id="pat", kind="appointment", change="created",
            status="booked", at=NOW - (OLD if i < 4 else NEW),
        ).returning(timeline_changes.c.id)).scalar_one()) for i in range(6)]
    settings = settings_for(db_url, retention={"timeline_changes": "P30D"})

    # No consumer has started: age alone decides.
    assert purge(engine, settings, now=NOW, dry_run=True)["timeline_changes"] == 4
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(outreach_cursors).values(name="outreach", last_id=ids[3],
                                                     updated_at=NOW))
        conn.execute(insert(outreach_cursors).values(name="waitlist", last_id=ids[1],
                                                     updated_at=NOW))
    # The waitlist has read only the first two: only those go.
    assert purge(engine, settings, now=NOW, batch=1)["timeline_changes"] == 2
    with engine.connect() as conn:
        left = conn.execute(select(timeline_changes.c.id).order_by(timeline_changes.c.id))
        assert [r.id for r in left] == ids[2:]
