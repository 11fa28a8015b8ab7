"""The console's messages: list (filters, keyset pages), detail (PHI only, audited), replay of
one message and of every failed message of a filter, with its progress page."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, insert, select, update

from integration.api import create_app
from integration.console import messages as console_messages
from integration.intake import assess
from integration.models import audit_events, inbox, replay_jobs
from integration.pipeline import process_batch
from integration.runtime import Runtime
from tests.console.support import Clock, signed_in
from tests.helpers import adt, settings_for

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
NAME = b"Zebulon^Quixote"


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, inprocess_worker=False), with_mllp=False)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    application = create_app(runtime, manage_runtime=False)
    application.state.console_clock = Clock(NOW)
    return application


def message(control: str, *, sender: str = "EPIC", pid: bool = True,
            trigger: str = "A01") -> bytes:
    return adt(control, sender=sender, pid=pid, trigger=trigger).replace(b"Doe^Jane", NAME)


def store(engine: Engine, raw: bytes, **values: Any) -> int:
    row = assess(raw, "mllp", "10.0.0.7:4711").row(NOW, timedelta(seconds=60))
    row.update(values)
    with engine.begin() as conn:
        return int(conn.execute(insert(inbox).values(row).returning(inbox.c.id)).scalar_one())


def row_of(engine: Engine, inbox_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(inbox).where(inbox.c.id == inbox_id)).one()


def audits(engine: Engine, action: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(audit_events).where(audit_events.c.action == action)
                                 .order_by(audit_events.c.id)))


def listed_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr id="message-(\d+)">', html)]


# --- the list -----------------------------------------------------------------------------------


def test_list_filters_and_keyset_pages(app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    ids = []
    for i in range(120):
        sender = "LAB|NORTH" if i % 3 == 0 else "EPIC|MAIN"
        ids.append(store(
            engine, message(f"C{i:03d}"), sender=sender,
            message_type="ORU^R01" if i % 3 == 0 else "ADT^A01",
            status="failed" if i % 10 == 0 else "processed",
            last_error=f"PID-5 bad value {i}\nsecond line" if i % 10 == 0 else None,
            received_at=NOW + timedelta(minutes=i)))
    client, _ = signed_in(app, "vera", "viewer")

    page = client.get("/console/messages")
    assert page.status_code == 200
    assert 'id="messages"' in page.text and 'class="filters"' in page.text
    assert '<div class="scroll">' in page.text and ">Filter</button>" in page.text
    assert listed_ids(page.text) == ids[::-1][:50]
    assert '<span class="badge status-failed">failed</span>' in page.text
    assert "bad value" not in page.text and "Quixote" not in page.text  # no PHI access
    assert "replay-all" not in page.text  # viewers replay nothing
    older = re.search(r'id="older" href="([^"]+)"', page.text)
    assert older is not None and "before=" in older.group(1)
    second = client.get(older.group(1).replace("&amp;", "&"))
    assert listed_ids(second.text) == ids[::-1][50:100]
    third = client.get(re.search(r'id="older" href="([^"]+)"', second.text)
                       .group(1).replace("&amp;", "&"))  # type: ignore[union-attr]
    assert listed_ids(third.text) == ids[::-1][100:]
    assert 'id="older"' not in third.text and 'id="newest"' in third.text

    lab = client.get("/console/messages", params={"sender": "LAB|NORTH"})
    assert listed_ids(lab.text) == [i for n, i in enumerate(ids) if n % 3 == 0][::-1][:50]
    assert listed_ids(client.get("/console/messages", params={"sender": "LAB"}).text) == \
        listed_ids(lab.text)
    oru = client.get("/console/messages", params={"type": "oru"})
    assert listed_ids(oru.text) == listed_ids(lab.text)
    assert listed_ids(client.get("/console/messages", params={"type": "ADT^A01"}).text)[0] == \
        ids[119]
    failed = client.get("/console/messages", params={"status": "failed"})
    assert listed_ids(failed.text) == [ids[n] for n in range(110, -1, -10)]
    window = client.get("/console/messages", params={
        "since": (NOW + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M"),
        "until": (NOW + timedelta(minutes=13)).strftime("%Y-%m-%dT%H:%M"),
        "status": "processed"})
    assert listed_ids(window.text) == [ids[12], ids[11]]
    assert 'value="2025-03-04T10:10"' in window.text  # the form keeps the filter
    control = client.get("/console/messages", params={"control_id": "C007"})
    assert listed_ids(control.text) == [ids[7]]
    none = client.get("/console/messages", params={"sender": "NOBODY"})
    assert listed_ids(none.text) == [] and 'id="no-messages"' in none.text

    bad = client.get("/console/messages", params={"status": "lost", "sender": "EPIC"})
    assert bad.status_code == 400 and 'id="filter-error"' in bad.text
    assert "status: one of" in bad.text and 'value="EPIC"' in bad.text
    assert client.get("/console/messages", params={"since": "yesterday"}).status_code == 400
    assert client.get("/console/messages", params={"before": "x1"}).status_code == 400


def test_phi_users_see_the_first_line_of_errors(app: FastAPI, runtime: Runtime) -> None:
    store(runtime.engine, message("E1"), status="failed", last_error="PID-5 bad\nmore")
    client, _ = signed_in(app, "paula", "viewer", phi=True)
    page = client.get("/console/messages")
    assert ">PID-5 bad</td>" in page.text and "more" not in page.text
    assert audits(runtime.engine, "console.phi_view") == []  # a list is not a record view


# --- one message --------------------------------------------------------------------------------


def test_detail_shows_patient_data_only_with_phi_access_and_audits_it(
        app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    inbox_id = store(engine, message("D1"))
    process_batch(engine, [inbox_id], now=NOW, contexts=runtime.contexts)
    with engine.begin() as conn:
        conn.execute(update(inbox).where(inbox.c.id == inbox_id).values(
            ack="MSH|^~\\&|CARELOOP|HOSP\rMSA|AA|D1\r"))

    viewer, _ = signed_in(app, "vera", "viewer")
    page = viewer.get(f"/console/messages/{inbox_id}")
    assert page.status_code == 200
    assert 'id="status">processed<' in page.text and "EPIC|MAIN" in page.text
    assert "ADT^A01" in page.text and 'id="control-id">D1<' in page.text
    assert "Patient data is hidden: you need PHI access" in page.text
    for hidden in ("Quixote", "Zebulon", 'id="raw"', 'id="ack"', "MSA|AA", "/console/patients/",
                   '"resourceType"', 'id="resources"', 'id="replay"'):
        assert hidden not in page.text, hidden
    assert audits(engine, "console.phi_view") == []

    paula, _ = signed_in(app, "paula", "viewer", phi=True)
    page = paula.get(f"/console/messages/{inbox_id}")
    assert page.status_code == 200
    raw = re.search(r'<pre id="raw">(.*?)</pre>', page.text, re.S)
    assert raw is not None
    assert raw.group(1).splitlines()[0].startswith("MSH|^~\\&amp;|EPIC|MAIN|")
    assert any(line.startswith("PID|1||123^^^MRN||Zebulon^Quixote") for line in
               raw.group(1).splitlines())
    assert re.search(r'<pre id="ack">MSH\|\^~\\&amp;\|CARELOOP\|HOSP\nMSA\|AA\|D1</pre>',
                     page.text)
    assert "<h3>Patient/<wbr>" in page.text
    assert "&#34;resourceType&#34;: &#34;Patient&#34;" in page.text
    patients = re.findall(r'href="/console/patients/([0-9a-f]{32})"', page.text)
    assert patients and len(set(patients)) == 1
    assert re.search(r"<td class=\"text\">patient</td>", page.text)
    viewed = audits(engine, "console.phi_view")
    assert [(a.actor, a.target_type, a.target_id) for a in viewed] == [
        ("paula", "message", str(inbox_id))]

    assert paula.get("/console/messages/999999").status_code == 404
    assert paula.get("/console/messages/abc").status_code == 404
    # Past the largest row id: no such message, not a database overflow.
    assert paula.get("/console/messages/99999999999999999999").status_code == 404


def test_detail_of_a_failed_message_shows_the_error_to_phi_users(
        app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    inbox_id = store(engine, message("D2", trigger="A99"))
    process_batch(engine, [inbox_id], now=NOW, contexts=runtime.contexts)
    paula, _ = signed_in(app, "paula", "viewer", phi=True)
    page = paula.get(f"/console/messages/{inbox_id}")
    assert '<pre id="error">unsupported message type ADT^A99</pre>' in page.text
    vera, _ = signed_in(app, "vera", "viewer")
    assert "unsupported message type" not in vera.get(f"/console/messages/{inbox_id}").text


# --- replay one ---------------------------------------------------------------------------------


def test_replay_one_message(app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    inbox_id = store(engine, message("R1"), status="failed", attempts=5,
                     last_error="WorkerLost: boom", processed_at=NOW)
    before = row_of(engine, inbox_id)

    vera, vera_csrf = signed_in(app, "vera", "viewer")
    r = vera.post(f"/console/messages/{inbox_id}/replay", data={"csrf": vera_csrf})
    assert r.status_code == 403 and "needs the operator role" in r.text
    olga, csrf = signed_in(app, "olga", "operator")
    r = olga.post(f"/console/messages/{inbox_id}/replay")
    assert r.status_code == 403 and "security token" in r.text
    r = olga.post(f"/console/messages/{inbox_id}/replay", data={"csrf": "forged" * 8})
    assert r.status_code == 403
    assert row_of(engine, inbox_id) == before and audits(engine, "console.replay") == []

    page = olga.get(f"/console/messages/{inbox_id}")
    assert 'id="replay"' in page.text and ">Replay</button>" in page.text
    r = olga.post(f"/console/messages/{inbox_id}/replay", data={"csrf": csrf})
    assert r.status_code == 303
    assert r.headers["location"] == f"/console/messages/{inbox_id}?replayed=1"
    row = row_of(engine, inbox_id)
    assert (row.status, row.attempts) == ("received", 0)
    assert [(a.actor, a.target_type, a.target_id) for a in audits(engine, "console.replay")] == \
        [("olga", "message", str(inbox_id))]
    waiting = olga.get(r.headers["location"])
    assert 'id="notice"' in waiting.text and 'http-equiv="refresh"' in waiting.text

    process_batch(engine, [inbox_id], contexts=runtime.contexts)
    done = olga.get(r.headers["location"])
    assert 'id="status">processed<' in done.text and 'http-equiv="refresh"' not in done.text


def test_a_rejected_message_is_not_replayed(app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    inbox_id = store(engine, b"garbage that is not HL7")
    assert row_of(engine, inbox_id).status == "rejected"
    olga, csrf = signed_in(app, "olga", "operator")
    page = olga.get(f"/console/messages/{inbox_id}")
    assert 'id="replay-refused"' in page.text and 'id="replay"' not in page.text
    assert "could not read its MSH" in page.text
    r = olga.post(f"/console/messages/{inbox_id}/replay", data={"csrf": csrf})
    assert r.status_code == 409 and "rejected" in r.text
    assert row_of(engine, inbox_id).status == "rejected"
    assert olga.post("/console/messages/424242/replay", data={"csrf": csrf}).status_code == 404
    assert olga.post("/console/messages/99999999999999999999/replay",
                     data={"csrf": csrf}).status_code == 404


def test_replay_is_processed_by_the_in_process_worker(db_url: str) -> None:
    """With the in-process worker (and its work process), a replay is dispatched at once."""
    rt = Runtime(settings_for(db_url, sweep_interval_s=60), with_mllp=False)
    try:
        application = create_app(rt)
        application.state.console_clock = Clock(NOW)
        with TestClient(application, follow_redirects=False):
            inbox_id = store(rt.engine, message("W1"), status="failed", last_error="old")
            olga, csrf = signed_in(application, "olga", "operator")
            r = olga.post(f"/console/messages/{inbox_id}/replay", data={"csrf": csrf})
            assert r.status_code == 303
            deadline = time.monotonic() + 20
            while row_of(rt.engine, inbox_id).status == "received":
                assert time.monotonic() < deadline, "the replay was not processed"
                time.sleep(0.05)
            assert row_of(rt.engine, inbox_id).status == "processed"
    finally:
        rt.engine.dispose()


# --- replay every failed message of a filter -------------------------------------------------


def test_replay_all_failed_messages_of_a_filter_with_progress(
        app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    failed = [store(engine, message(f"F{i}", sender="LAB"), status="failed",
                    last_error="x") for i in range(3)]
    other = store(engine, message("F9", sender="EPIC"), status="failed", last_error="x")
    done = store(engine, message("P1", sender="LAB"), status="processed")

    vera, _ = signed_in(app, "vera", "viewer")
    assert "replay-all" not in vera.get("/console/messages", params={"sender": "LAB"}).text
    olga, csrf = signed_in(app, "olga", "operator")
    page = olga.get("/console/messages", params={"sender": "LAB"})
    assert 'id="replay-all"' in page.text and "Replay all 3 failed messages" in page.text
    assert 'name="sender" value="LAB"' in page.text
    assert "replay-all" not in olga.get("/console/messages",
                                        params={"status": "processed"}).text
    r = olga.post("/console/replays", data={"sender": "LAB"})
    assert r.status_code == 403
    r = olga.post("/console/replays", data={"csrf": csrf, "sender": "LAB", "type": "",
                                            "since": "", "until": "", "control_id": ""})
    assert r.status_code == 303
    job_url = r.headers["location"]
    assert re.fullmatch(r"/console/replays/\d+", job_url)
    with engine.connect() as conn:
        job = conn.execute(select(replay_jobs)).one()
    assert sorted(job.inbox_ids) == failed and job.total == 3 and job.actor == "olga"
    assert job.filters == {"sender": "LAB"}
    assert {row_of(engine, i).status for i in failed} == {"received"}
    assert row_of(engine, other).status == "failed" and row_of(engine, done).status == "processed"
    audit = audits(engine, "console.replay")
    assert [(a.actor, a.target_type, a.target_id, a.detail["total"]) for a in audit] == [
        ("olga", "replay_job", str(job.id), 3)]

    progress = vera.get(job_url)  # anyone may follow it
    assert progress.status_code == 200
    assert '<meta http-equiv="refresh" content="2">' in progress.text
    assert '<progress id="progress" max="3" value="0">' in progress.text
    assert re.search(r'id="waiting"><strong>3<', progress.text)

    process_batch(engine, failed[:2], contexts=runtime.contexts)
    with engine.begin() as conn:  # one fails again
        conn.execute(update(inbox).where(inbox.c.id == failed[2]).values(status="failed"))
    progress = vera.get(job_url)
    assert 'http-equiv="refresh"' not in progress.text
    assert re.search(r'id="processed"><strong>2<', progress.text)
    assert re.search(r'id="failed"><strong>1<', progress.text)
    assert re.search(r'id="waiting"><strong>0<', progress.text)
    assert 'value="3"' in progress.text and 'id="failed-again"' in progress.text
    assert vera.get("/console/replays/999").status_code == 404
    assert vera.get("/console/replays/99999999999999999999").status_code == 404

    r = olga.post("/console/replays", data={"csrf": csrf, "sender": "NOBODY"})
    assert r.status_code == 409 and "Nothing to replay" in r.text
    r = olga.post("/console/replays", data={"csrf": csrf, "status": "processed"})
    assert r.status_code == 400


def test_replay_all_is_bounded(app: FastAPI, runtime: Runtime,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_messages, "REPLAY_MAX", 2)
    for i in range(3):
        store(runtime.engine, message(f"B{i}"), status="failed", last_error="x")
    olga, csrf = signed_in(app, "olga", "operator")
    page = olga.get("/console/messages")
    assert 'id="replay-too-many"' in page.text and 'id="replay-all"' not in page.text
    r = olga.post("/console/replays", data={"csrf": csrf})
    assert r.status_code == 400 and "Narrow the filter" in r.text
    with runtime.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(replay_jobs)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(inbox).where(
            inbox.c.status == "failed")).scalar_one() == 3
