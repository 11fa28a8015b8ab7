"""The console's senders: the list (senders seen, rules in effect and where they come from), the
form (admin only, validated, audited), and the "register the sender, replay, processed" story
end to end."""

from __future__ import annotations

import html
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select

from integration.api import create_app
from integration.intake import assess
from integration.models import audit_events, inbox, mapped_resources, sender_settings
from integration.runtime import Runtime
from integration.senders import save_sender
from integration.settings import HL7Sender
from tests.console.support import Clock, signed_in
from tests.helpers import adt, msa, settings_for

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
FILE_RULE = HL7Sender(application="EPIC", facility="MAIN", timezone="America/Chicago",
                      identifier_systems={"MRN": "urn:oid:1.2.3"})


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, inprocess_worker=False, hl7_senders=(FILE_RULE,)),
                 with_mllp=False)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    application = create_app(runtime, manage_runtime=False)
    application.state.console_clock = Clock(NOW)
    return application


def store(engine: Engine, raw: bytes, **values: Any) -> int:
    row = assess(raw, "mllp", "test").row(NOW, timedelta(seconds=60))
    row.update(values)
    with engine.begin() as conn:
        return int(conn.execute(insert(inbox).values(row).returning(inbox.c.id)).scalar_one())


def console_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(sender_settings).order_by(sender_settings.c.application)))


def table_row(page: str, table: str, sender: str) -> str:
    body = page.split(f'<table id="{table}">', 1)[1].split("</table>", 1)[0]
    found = re.search(rf'<tr data-sender="{re.escape(sender)}">(.*?)</tr>', body, re.S)
    assert found, f"{sender} not in #{table}"
    return found.group(1)


FORM = {"application": "NEWLAB", "facility": "NORTH", "timezone": "Europe/London",
        "identifier_systems": "MRN = urn:oid:2.16.840.1.113883.3.1\nPI = https://lab.example/pi",
        "ack_to": "lab.example:2576"}


def test_senders_page_lists_senders_seen_and_rules(app: FastAPI, runtime: Runtime) -> None:
    engine = runtime.engine
    store(engine, adt("S1", sender="EPIC"))
    store(engine, adt("S2", sender="EPIC"), status="failed")
    store(engine, adt("S3", sender="NEWLAB").replace(b"|MAIN|", b"|NORTH|", 1))
    save_sender(engine, HL7Sender(application="OTHER", ack_to="o.example:1"), actor="ada",
                now=NOW)

    vera, _ = signed_in(app, "vera", "viewer")
    page = vera.get("/console/senders")
    assert page.status_code == 200 and '<div class="scroll">' in page.text
    epic = table_row(page.text, "seen", "EPIC|MAIN")
    assert "<td>2</td>" in epic and ">1</a>" in epic and "settings file" in epic
    newlab = table_row(page.text, "seen", "NEWLAB|NORTH")
    assert "not registered" in newlab and "Register this sender" not in newlab  # not admin
    rule = table_row(page.text, "rules", "EPIC|MAIN")
    assert "settings file" in rule and "America/Chicago" in rule and "MRN = urn:oid:1.2.3" in rule
    other = table_row(page.text, "rules", "OTHER|")
    assert "console" in other and "o.example:1" in other and "by ada" in other
    assert "Delete" not in page.text and 'id="add-sender"' not in page.text

    ada, _ = signed_in(app, "ada", "admin")
    page = ada.get("/console/senders")
    newlab = table_row(page.text, "seen", "NEWLAB|NORTH")
    link = re.search(r'class="register" href="([^"]+)">Register this sender', newlab)
    assert link is not None
    form = ada.get(html.unescape(link.group(1)))
    assert form.status_code == 200
    assert 'id="application" name="application" value="NEWLAB"' in form.text
    assert 'id="facility" name="facility" value="NORTH"' in form.text
    # Editing the file's rule starts from its values (saving makes a console override).
    form = ada.get("/console/senders/edit", params={"application": "EPIC", "facility": "MAIN"})
    assert 'value="America/Chicago"' in form.text and "MRN = urn:oid:1.2.3</textarea>" in form.text


def test_admin_saves_a_sender(app: FastAPI, runtime: Runtime) -> None:
    ada, csrf = signed_in(app, "ada", "admin")
    r = ada.post("/console/senders", data={**FORM, "csrf": csrf})
    assert r.status_code == 303
    assert r.headers["location"] == "/console/senders?saved=NEWLAB%7CNORTH"
    (row,) = console_rows(runtime.engine)
    assert (row.application, row.facility, row.timezone, row.ack_to, row.updated_by) == (
        "NEWLAB", "NORTH", "Europe/London", "lab.example:2576", "ada")
    assert row.identifier_systems == {"MRN": "urn:oid:2.16.840.1.113883.3.1",
                                      "PI": "https://lab.example/pi"}
    with runtime.engine.connect() as conn:
        (audit,) = conn.execute(select(audit_events).where(
            audit_events.c.action == "console.sender_saved")).all()
    assert (audit.actor, audit.target_type, audit.target_id) == ("ada", "sender", "NEWLAB|NORTH")
    assert audit.detail["before"] is None and audit.detail["after"]["ack_to"] == "lab.example:2576"

    page = ada.get(r.headers["location"])
    assert 'id="notice"' in page.text and "Sender NEWLAB|NORTH saved" in page.text
    assert "console" in table_row(page.text, "rules", "NEWLAB|NORTH")

    # Saved again: replaced, not doubled; overriding the file's rule is shown as such.
    r = ada.post("/console/senders", data={**FORM, "timezone": "", "csrf": csrf})
    assert r.status_code == 303
    (row,) = console_rows(runtime.engine)
    assert row.timezone is None
    r = ada.post("/console/senders", data={"application": "EPIC", "facility": "MAIN",
                                           "timezone": "America/Denver", "csrf": csrf})
    assert r.status_code == 303
    page = ada.get("/console/senders")
    assert "overrides the settings file" in table_row(page.text, "rules", "EPIC|MAIN")

    r = ada.post("/console/senders/delete", data={"application": "EPIC", "facility": "MAIN",
                                                  "csrf": csrf})
    assert r.status_code == 303 and "deleted=EPIC%7CMAIN" in r.headers["location"]
    page = ada.get("/console/senders")
    assert "settings file" in table_row(page.text, "rules", "EPIC|MAIN")
    assert [r.application for r in console_rows(runtime.engine)] == ["NEWLAB"]
    r = ada.post("/console/senders/delete", data={"application": "EPIC", "facility": "MAIN",
                                                  "csrf": csrf})
    assert r.status_code == 404


@pytest.mark.parametrize(("field", "value", "message"), [
    ("timezone", "Mars/Olympus", "time zone: unknown time zone"),
    ("identifier_systems", "MRN: urn:oid:1", "identifier systems, line 1"),
    ("identifier_systems", "MRN = nope", "is not a URI"),
    ("ack_to", "lab.example", "ACK to: &#39;lab.example&#39; is not host:port"),
    ("application", "", "application: required"),
    ("application", "NEW|LAB", "may not contain"),
])
def test_form_errors_are_shown_and_nothing_is_saved(app: FastAPI, runtime: Runtime, field: str,
                                                    value: str, message: str) -> None:
    ada, csrf = signed_in(app, "ada", "admin")
    r = ada.post("/console/senders", data={**FORM, field: value, "csrf": csrf})
    assert r.status_code == 400
    assert 'id="form-error"' in r.text and message in r.text
    assert 'value="lab.example:2576"' in r.text or field == "ack_to"  # the values are kept
    assert console_rows(runtime.engine) == []


def test_only_admins_change_senders(app: FastAPI, runtime: Runtime) -> None:
    save_sender(runtime.engine, HL7Sender(application="KEEP"), actor="ada", now=NOW)
    olga, csrf = signed_in(app, "olga", "operator")
    assert olga.get("/console/senders").status_code == 200
    assert olga.get("/console/senders/edit").status_code == 403
    r = olga.post("/console/senders", data={**FORM, "csrf": csrf})
    assert r.status_code == 403 and "needs the admin role" in r.text
    r = olga.post("/console/senders/delete", data={"application": "KEEP", "csrf": csrf})
    assert r.status_code == 403
    ada, _ = signed_in(app, "ada", "admin")
    assert ada.post("/console/senders", data=FORM).status_code == 403  # no CSRF token
    assert [r.application for r in console_rows(runtime.engine)] == ["KEEP"]


def _wait(engine: Engine, inbox_id: int, status: str, *, timeout: float = 20,
          log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            row = conn.execute(select(inbox).where(inbox.c.id == inbox_id)).one()
        if row.status == status:
            return row
        assert time.monotonic() < deadline, (
            f"message {inbox_id} is {row.status}"
            + (f"\n{log.read_text(errors='replace')[-3000:]}" if log else ""))
        time.sleep(0.05)


def test_register_the_sender_replay_and_see_it_processed(db_url: str) -> None:
    """hl7_unregistered_senders = "hold", the in-process worker with its work process: a new
    sender's message is acknowledged, fails with a clear error; an admin registers the sender;
    an operator replays the message; it is processed with the new rule."""
    runtime = Runtime(settings_for(db_url, auth="disabled", hl7_unregistered_senders="hold",
                                   sweep_interval_s=60, hl7_senders=(FILE_RULE,)),
                      with_mllp=False)
    try:
        application = create_app(runtime)
        application.state.console_clock = Clock(NOW)
        with TestClient(application, follow_redirects=False) as api:
            raw = adt("NL1", sender="NEWLAB").replace(b"|MAIN|", b"|NORTH|", 1)
            r = api.post("/hl7v2", content=raw, headers={"Content-Type": "application/hl7-v2"})
            assert r.status_code == 200 and msa(r.content)[1] == "AA"
            with runtime.engine.connect() as conn:
                inbox_id = int(conn.execute(select(inbox.c.id)).scalar_one())
            row = _wait(runtime.engine, inbox_id, "failed")
            assert row.last_error == (
                'sender "NEWLAB|NORTH" is not registered: add it under Senders in the console '
                "(or [[hl7_senders]]), then replay")

            paula, paula_csrf = signed_in(application, "paula", "operator", phi=True)
            page = paula.get(f"/console/messages/{inbox_id}")
            assert 'sender &#34;NEWLAB|NORTH&#34; is not registered' in page.text
            assert paula.post("/console/senders", data={**FORM, "csrf": paula_csrf}
                              ).status_code == 403

            ada, csrf = signed_in(application, "ada", "admin")
            senders = ada.get("/console/senders")
            assert "not registered" in table_row(senders.text, "seen", "NEWLAB|NORTH")
            r = ada.post("/console/senders", data={**FORM, "csrf": csrf})
            assert r.status_code == 303
            notice = ada.get(r.headers["location"])
            link = re.search(r'id="saved-failed" href="([^"]+)"', notice.text)
            assert link is not None
            failed = paula.get(html.unescape(link.group(1)))
            assert f'<tr id="message-{inbox_id}">' in failed.text
            assert "Replay all 1 failed message" in failed.text

            r = paula.post(f"/console/messages/{inbox_id}/replay", data={"csrf": paula_csrf})
            assert r.status_code == 303
            _wait(runtime.engine, inbox_id, "processed")
            page = paula.get(r.headers["location"])
            assert 'id="status">processed<' in page.text
            assert "urn:oid:2.16.840.1.113883.3.1" in page.text  # converted with the new rule
            senders = ada.get("/console/senders")
            assert "console" in table_row(senders.text, "seen", "NEWLAB|NORTH")
    finally:
        runtime.engine.dispose()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_register_and_replay_with_a_celery_worker(pg_url: str, redis_url: str,
                                                  tmp_path: Path) -> None:
    """The same story with Celery: the console's process only dispatches; a separate worker
    process holds the message, then converts it with the rule the console saved."""
    import redis

    from tests.e2e.conftest import CARELOOP, base_env

    prefix = f"careloop-test-{uuid.uuid4().hex[:8]}:"
    env = base_env(pg_url) | {"CARELOOP_BROKER_URL": redis_url,
                              "CARELOOP_BROKER_KEY_PREFIX": prefix,
                              "CARELOOP_HL7_UNREGISTERED_SENDERS": "hold"}
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen([CARELOOP, "worker", "--concurrency", "1"], env=env,
                                  stdout=out, stderr=out, cwd=tmp_path)
    runtime = Runtime(settings_for(pg_url, auth="disabled", broker_url=redis_url,
                                   broker_key_prefix=prefix, hl7_unregistered_senders="hold"),
                      with_mllp=False)
    try:
        application = create_app(runtime)
        application.state.console_clock = Clock(NOW)
        with TestClient(application, follow_redirects=False) as api:
            raw = adt("CL1", sender="NEWLAB").replace(b"|MAIN|", b"|NORTH|", 1)
            r = api.post("/hl7v2", content=raw, headers={"Content-Type": "application/hl7-v2"})
            assert r.status_code == 200
            with runtime.engine.connect() as conn:
                inbox_id = int(conn.execute(select(inbox.c.id)).scalar_one())
            row = _wait(runtime.engine, inbox_id, "failed", timeout=60, log=log)
            assert "is not registered" in row.last_error

            ada, csrf = signed_in(application, "ada", "admin")
            assert ada.post("/console/senders", data={**FORM, "csrf": csrf}).status_code == 303
            r = ada.post(f"/console/messages/{inbox_id}/replay", data={"csrf": csrf})
            assert r.status_code == 303
            _wait(runtime.engine, inbox_id, "processed", timeout=60, log=log)
            with runtime.engine.connect() as conn:
                patient = conn.execute(select(mapped_resources.c.resource).where(
                    mapped_resources.c.inbox_id == inbox_id,
                    mapped_resources.c.resource_type == "Patient")).scalar_one()
            assert patient["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.3.1"
    finally:
        runtime.engine.dispose()
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
