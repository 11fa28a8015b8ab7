"""The console's operations pages: EHR connections, outreach counts, the write-back outbox with
its retries (operator, CSRF, audited), the audit log (operators and admins), and the outcomes
page opened with a console session."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select

from adapters.fhir.smart import AccessToken
from integration.console.outreach import failure_group, reason_group
from integration.db import write_lock
from integration.models import audit_events, ehr_outbox, fhir_subscriptions, touches
from integration.runtime import Runtime
from subscriptions.tracking import TrackerState
from tests.console.test_overview import (
    NOW,
    PHONE,
    SECRET,
    Clock,
    client,
    clock,
    make_client,
    outbox_row,
    runtime,
    sign_in,
    table,
    touch,
)
from tests.helpers import settings_for

__all__ = ["client", "clock", "runtime"]  # fixtures shared from test_overview

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


# ------------------------------------------------------------------------- EHR connections

CONNECTIONS = [
    {"name": "ehr", "fhir_base": "https://ehr.example.org/fhir", "client_id": "careloop",
     "mode": "backport", "heartbeat_s": 60, "resource_types": ["Appointment", "CarePlan"],
     "topics": {"Appointment": "http://example.org/topic/appointment",
                "CarePlan": "http://example.org/topic/careplan"}},
    {"name": "poller", "fhir_base": "https://other.example.org/r4", "client_id": "cl",
     "mode": "poll", "resource_types": ["Appointment"], "private_key": "var/keys/cl.pem"},
]


@pytest.fixture
def ehr_runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False,
                              connections=CONNECTIONS), with_mllp=False)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def ehr_client(ehr_runtime: Runtime, clock: Clock) -> Iterator[TestClient]:
    with make_client(ehr_runtime, clock) as c:
        yield c


def _subscription(connection: str, resource_type: str, **values: Any) -> dict[str, Any]:
    row = {"connection": connection, "resource_type": resource_type, "subscription_id": None,
           "mode": "backport", "topic": None, "status": None, "tracker": None,
           "poll_cursor": None, "last_notification_at": None, "last_heartbeat_at": None,
           "last_error": None, "catchup_claimed_at": None, "updated_at": NOW - HOUR}
    row.update(values)
    return row


def seed_subscriptions(engine: Engine) -> None:
    tracker = TrackerState("sub-1", contiguous=41, ahead={43: None}, highest_known=44,
                           gap_seen_at=NOW - 4 * MINUTE).to_json()
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(fhir_subscriptions), [
            _subscription("ehr", "Appointment", subscription_id="sub-1", status="active",
                          topic="http://example.org/topic/appointment", tracker=tracker,
                          last_notification_at=NOW - 5 * MINUTE,
                          last_heartbeat_at=NOW - 3 * MINUTE,
                          catchup_claimed_at=NOW - 2 * MINUTE,
                          last_error="$events: HTTP 503 from the EHR"),
            _subscription("poller", "Appointment", mode="poll", poll_cursor={
                "v": 1, "resource_type": "Appointment", "since": "2025-03-04T10:00:00Z",
                "seen": []}),
            _subscription("retired", "Appointment", subscription_id="old-7", status="off",
                          last_heartbeat_at=NOW - 48 * HOUR,
                          catchup_claimed_at=NOW - 3 * HOUR),
        ])


def test_connections_page(ehr_client: TestClient, ehr_runtime: Runtime) -> None:
    seed_subscriptions(ehr_runtime.engine)
    sign_in(ehr_client, ehr_runtime, "vera")
    r = ehr_client.get("/console/connections")
    assert r.status_code == 200
    page = r.text
    rows = page.split('id="connections"', 1)[1].split("</table>", 1)[0]
    appointment = rows.split('id="sub-ehr-Appointment"', 1)[1].split("</tr>", 1)[0]
    for text in ("sub-1", "active", "topic http://example.org/topic/appointment", "41",
                 ">gap</span>", "44 announced since 2025-03-04 10:26:15",
                 "2025-03-04 10:25:15", "2025-03-04 10:27:15", "3 min 0 s ago",
                 "(heartbeat 60 s)", ">silent<", ">running</span> since 2025-03-04 10:28:15",
                 "$events: HTTP 503 from the EHR"):
        assert text in appointment, text
    careplan = rows.split('id="sub-ehr-CarePlan"', 1)[1].split("</tr>", 1)[0]
    assert "not set up" in careplan and "http://example.org/topic/careplan" in careplan
    assert "silent" not in careplan
    polled = rows.split('id="sub-poller-Appointment"', 1)[1].split("</tr>", 1)[0]
    assert "polled since 2025-03-04T10:00:00Z" in polled and "silent" not in polled
    retired = rows.split('id="sub-retired-Appointment"', 1)[1].split("</tr>", 1)[0]
    assert "not configured" in retired and "old-7" in retired
    assert "running" not in retired  # a claim older than the timeout is not a catch-up
    assert "silent" not in retired
    tokens = table(page, "tokens")
    assert tokens["ehr"][-1] == "no private key configured"
    assert tokens["poller"][-1] == "none obtained yet"


def test_the_latest_token_of_each_connection(ehr_client: TestClient,
                                             ehr_runtime: Runtime) -> None:
    """A token obtained in any process (here: recorded as a worker would) shows its expiry and
    holder, never its value; a newer token replaces the older one's row."""
    from integration import fhir_tokens

    expires = (NOW + 4 * MINUTE).timestamp()
    fhir_tokens.record(ehr_runtime.engine, "poller",
                       AccessToken("old-token", expires - 300, expires - 360, "s"),
                       now=NOW - 5 * MINUTE)
    fhir_tokens.record(ehr_runtime.engine, "poller",
                       AccessToken("secret-token", expires, expires - 60, "system/*.rs"),
                       now=NOW - MINUTE)
    sign_in(ehr_client, ehr_runtime, "vera")
    page = ehr_client.get("/console/connections").text
    cell = table(page, "tokens")["poller"][-1]
    assert cell.startswith("2025-03-04 10:34:15 (in 4 min 0 s) obtained 2025-03-04 10:29:15 by ")
    assert "secret-token" not in page and "old-token" not in page


def test_clients_record_their_tokens(engine: Any) -> None:
    """The stages' SMART clients tell the ledger of each token they obtain."""
    from adapters.fhir.keys import SigningKeyError
    from integration import fhir_tokens
    from integration.fhir_ingest import recording_clients
    from integration.settings import Connection

    connection = Connection(name="ehr", fhir_base="https://ehr.example.org/fhir",
                            client_id="careloop", private_key=Path("var/keys/none.pem"),
                            mode="poll")
    with pytest.raises(SigningKeyError):  # no key file: the factory is the one reading it
        recording_clients(engine)(connection)
    observer = fhir_tokens.observer(engine, "ehr")
    observer(AccessToken("v", 2_000_000_000.0, 1_999_999_000.0, "system/Patient.rs"))
    tokens = fhir_tokens.read(engine)
    assert list(tokens) == ["ehr"] and tokens["ehr"].scope == "system/Patient.rs"
    assert tokens["ehr"].expires_at == datetime.fromtimestamp(2_000_000_000.0, UTC)


def test_connections_page_without_connections(client: TestClient, runtime: Runtime) -> None:
    assert client.get("/console/connections").status_code == 303
    sign_in(client, runtime, "vera")
    page = client.get("/console/connections").text
    assert 'id="no-connections"' in page
    assert table(page, "connections") == {"none": ["No subscription."]}


# ---------------------------------------------------------------------------------- outreach


def seed_touches(engine: Engine) -> None:
    rows = [
        touch(1, "scheduled", due=-10 * MINUTE),
        touch(2, "scheduled", due=2 * HOUR),
        touch(3, "scheduled", due=30 * HOUR),  # beyond the next 24 hours
        touch(4, "sent", sent=True, delivery="delivered", ago=2 * HOUR),
        touch(5, "sent", sent=True, delivery="failed", ago=2 * HOUR),
        touch(6, "sent", sent=True, ago=30 * MINUTE),
        touch(7, "sent", sent=True, delivery="delivered", ago=72 * HOUR),  # 7 days only
        touch(8, "failed", reason=f"channel: SMTP 550 <{PHONE}> rejected"),
        touch(9, "failed", pathway="follow-up", reason="template: 'when' is undefined"),
        touch(10, "skipped", reason="quiet hours: the next allowed time is too close to the "
              "appointment"),
        touch(11, "cancelled", reason="quiet hours at send time; the next allowed time is "
              "too close to the moment"),
        touch(12, "skipped", reason="cap: 2 touch(es) already on 2025-03-04"),
        touch(13, "cancelled", reason="at send time: cap: more than 5 touches within seven "
              "days"),
        touch(14, "cancelled", pathway="follow-up", reason="opted out by reply"),
        touch(15, "skipped", reason="opted out of sms"),
        touch(16, "cancelled", reason="at send time: status cancelled is not one of booked"),
        touch(17, "cancelled", reason="the patient asked to cancel"),
        touch(18, "cancelled", reason="something nobody planned for"),
        touch(19, "skipped", reason="opted out of sms", ago=72 * HOUR),  # 7 days only
    ]
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(touches), rows)


def test_reason_groups() -> None:
    assert reason_group("at send time: quiet hours at send time") == "quiet-hours"
    assert reason_group("no channel: sms: opted out, email: no contact") == "opted-out"
    assert reason_group("no channel: sms: no contact") == "no-contact"
    assert reason_group("no email contact") == "no-contact"
    assert reason_group("its time (2025-03-01T09:00:00+00:00) had passed when planned") == (
        "too-late")
    assert reason_group("too late: due 2025-03-01T09:00:00+00:00") == "too-late"
    assert reason_group("the entry is no longer on the timeline (joined into another)") == (
        "stale")
    assert reason_group("at send time: no longer planned") == "stale"
    assert reason_group("service type does not match") == "not-applicable"
    assert reason_group(None) == "other"
    assert failure_group("interrupted sends; gave up") == "interrupted"
    assert failure_group("channel: timeout") == "channel"


def test_outreach_counts(client: TestClient, runtime: Runtime) -> None:
    seed_touches(runtime.engine)
    sign_in(client, runtime, "vera")
    page = client.get("/console/outreach").text
    assert table(page, "pathways") == {
        "follow-up": ["0", "0", "0", "0", "0", "1", "1"],
        "reminder": ["1", "1", "3", "1", "1", "1", "8"],
        "All pathways": ["1", "1", "3", "1", "1", "2", "9"],
    }
    assert table(page, "suppressed") == {
        "opted out": ["2"], "quiet hours": ["2"],
        "daily cap reached": ["1"], "other": ["1"],
        "the patient asked to cancel or reschedule": ["1"],
        "stale or cancelled (the entry changed)": ["1"], "weekly cap reached": ["1"]}
    assert table(page, "suppressed-pathways")["follow-up"] == ["opted out", "1"]
    failed = table(page, "failed")
    assert failed["8"][-1] == "the channel refused or failed"
    assert failed["9"][-1] == "the message could not be rendered"
    assert PHONE not in page and SECRET not in page
    sent = table(page, "chart-sent-data")
    assert len(sent) == 24
    assert sent["2025-03-04 08:00 UTC"] == ["2"] and sent["2025-03-04 10:00 UTC"] == ["1"]
    assert re.search(r'id="fig-suppressed"><strong>9</strong>', page)
    with runtime.engine.connect() as conn:
        assert conn.execute(select(audit_events).where(
            audit_events.c.action == "console.phi_view")).first() is None


def test_outreach_week_and_bad_window(client: TestClient, runtime: Runtime) -> None:
    seed_touches(runtime.engine)
    sign_in(client, runtime, "vera")
    page = client.get("/console/outreach", params={"window": "7d"}).text
    assert table(page, "pathways")["reminder"] == ["1", "1", "4", "2", "1", "1", "9"]
    assert len(table(page, "chart-sent-data")) == 168
    assert '<option value="7d" selected>' in page
    assert client.get("/console/outreach", params={"window": "1y"}).status_code == 400


def test_outreach_failure_text_for_phi_is_audited(client: TestClient,
                                                  runtime: Runtime) -> None:
    seed_touches(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    page = client.get("/console/outreach").text
    assert table(page, "failed")["8"][-1] == f"channel: SMTP 550 <{PHONE}> rejected"
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(audit_events).where(
            audit_events.c.action == "console.phi_view")).all()
    assert [(r.actor, r.target_type, r.target_id) for r in rows] == [("pia", "touch", "failed")]
    assert sorted(rows[0].detail["touches"]) == [8, 9]


# -------------------------------------------------------------------------------- write-back


def seed_outbox(engine: Engine) -> None:
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(ehr_outbox), [
            outbox_row(1, "pending", ago=40 * MINUTE),
            outbox_row(2, "pending", error="HTTP 503: try later", attempts=3),
            outbox_row(3, "failed", error="OperationOutcome: subject not found", attempts=1),
            outbox_row(4, "failed", error="OperationOutcome: duplicate", attempts=1),
            outbox_row(5, "failed", resource_type="Task", error="Task not supported",
                       attempts=1),
            outbox_row(6, "written"),
        ])


def _outbox(engine: Engine) -> dict[int, tuple[str, int]]:
    with engine.connect() as conn:
        return {r.id: (r.status, r.attempts) for r in conn.execute(select(ehr_outbox))}


def _retries(engine: Engine) -> list[tuple[str, str, Any]]:
    with engine.connect() as conn:
        return [(r.actor, r.target_id, r.detail) for r in conn.execute(
            select(audit_events).where(audit_events.c.action == "console.writeback_retry")
            .order_by(audit_events.c.id))]


def test_outbox_page_for_a_viewer(client: TestClient, runtime: Runtime) -> None:
    seed_outbox(runtime.engine)
    csrf = sign_in(client, runtime, "vera")
    r = client.get("/console/outbox")
    page = r.text
    assert table(page, "outbox-by-status") == {"failed": ["3"], "pending": ["2"],
                                               "written": ["1"]}
    assert table(page, "outbox-by-kind")["Communication"] == ["create", "written", "1"]
    assert re.search(r'id="fig-waiting"><strong>2</strong> waiting, oldest 40 min 0 s', page)
    rows = table(page, "outbox")
    assert set(rows) == {"2", "3", "4", "5"}
    assert rows["3"][2:5] == ["rejected", "1", "-"]
    assert rows["3"][5] == "OperationOutcome: subject not found"
    assert rows["2"][2:5] == ["pending", "3", "2025-03-04 10:35:15"]
    assert "/retry" not in page and SECRET not in page
    before = _outbox(runtime.engine)
    r = client.post("/console/outbox/3/retry", data={"csrf": csrf})
    assert r.status_code == 403 and "needs the operator role" in r.text
    assert client.post("/console/outbox/retry", data={"csrf": csrf,
                                                      "resource_type": "Task"}).status_code == 403
    assert _outbox(runtime.engine) == before and _retries(runtime.engine) == []


def test_operator_retries_one_row(client: TestClient, runtime: Runtime) -> None:
    seed_outbox(runtime.engine)
    csrf = sign_in(client, runtime, "olga", "operator")
    page = client.get("/console/outbox").text
    assert 'action="/console/outbox/3/retry"' in page and 'id="retry-kind-Task"' in page
    before = _outbox(runtime.engine)
    r = client.post("/console/outbox/3/retry")  # no CSRF token
    assert r.status_code == 403 and "security token" in r.text
    r = client.post("/console/outbox/3/retry", data={"csrf": "forged" * 8})
    assert r.status_code == 403
    assert _outbox(runtime.engine) == before and _retries(runtime.engine) == []
    r = client.post("/console/outbox/3/retry", data={"csrf": csrf})
    assert (r.status_code, r.headers["location"]) == (303, "/console/outbox?retried=1")
    assert _outbox(runtime.engine)[3] == ("pending", 0)
    assert _retries(runtime.engine) == [("olga", "3", {"ids": [3], "changed": 1})]
    notice = client.get(r.headers["location"]).text
    assert '<p class="ok" role="status" id="notice">1 row will be written again.</p>' in notice
    r = client.post("/console/outbox/6/retry", data={"csrf": csrf})  # written: never again
    assert r.headers["location"] == "/console/outbox?retried=0"
    assert _outbox(runtime.engine)[6] == ("written", 0)
    assert client.post("/console/outbox/x/retry", data={"csrf": csrf}).status_code == 404


def test_operator_retries_every_rejected_row_of_a_kind(client: TestClient,
                                                        runtime: Runtime) -> None:
    seed_outbox(runtime.engine)
    csrf = sign_in(client, runtime, "adam", "admin")
    assert client.post("/console/outbox/retry", data={
        "resource_type": "Communication"}).status_code == 403  # no CSRF
    assert _retries(runtime.engine) == []
    r = client.post("/console/outbox/retry", data={"csrf": csrf,
                                                   "resource_type": "Communication"})
    assert (r.status_code, r.headers["location"]) == (303, "/console/outbox?retried=2")
    rows = _outbox(runtime.engine)
    assert rows[3] == rows[4] == ("pending", 0)
    assert rows[5] == ("failed", 1)  # a Task: another kind
    assert rows[2] == ("pending", 3)  # waiting, not rejected: left alone
    assert _retries(runtime.engine) == [("adam", "failed:Communication", {
        "resource_type": "Communication", "ids": [3, 4], "changed": 2})]
    assert client.post("/console/outbox/retry", data={"csrf": csrf}).status_code == 400


def test_outbox_signed_out(client: TestClient) -> None:
    assert client.get("/console/outbox").status_code == 303
    assert client.post("/console/outbox/1/retry").status_code == 403


# --------------------------------------------------------------------------------- audit log


def seed_audit(engine: Engine) -> None:
    rows = [{"at": NOW - timedelta(minutes=i), "actor": "robot", "action":
             "console.phi_view" if i % 2 else "writeback.replay", "target_type": "patient",
             "target_id": f"p{i % 5}", "detail": {"n": i, "text": "<b>&</b>"}}
            for i in range(120)]
    rows.append({"at": NOW - timedelta(days=3), "actor": "cli", "action": "retention.purge",
                 "target_type": "", "target_id": "", "detail": None})
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(audit_events), rows)


def test_audit_log_roles(client: TestClient, runtime: Runtime) -> None:
    assert client.get("/console/audit").status_code == 303
    sign_in(client, runtime, "vera")
    r = client.get("/console/audit")
    assert r.status_code == 403 and "needs the operator role" in r.text


@pytest.mark.parametrize("role", ["operator", "admin"])
def test_audit_log_pages(client: TestClient, runtime: Runtime, role: str) -> None:
    seed_audit(runtime.engine)
    sign_in(client, runtime, "olga", role)
    seen: list[str] = []
    url: str | None = "/console/audit?actor=robot"
    sizes = []
    while url:
        page = client.get(url).text
        rows = table(page, "audit")
        sizes.append(len(rows))
        seen += list(rows)
        found = re.search(r'href="([^"]+)" id="audit-next"', page)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert sizes == [50, 50, 20]
    assert len(set(seen)) == 120 and seen == sorted(seen, reverse=True)  # newest first
    first = table(client.get("/console/audit?actor=robot").text, "audit")
    assert first["2025-03-04 10:30:15"] == ["robot", "writeback.replay", "patient p0",
                                            '{"n":0,"text":"<b>&</b>"}']


def test_audit_log_filters(client: TestClient, runtime: Runtime) -> None:
    seed_audit(runtime.engine)
    sign_in(client, runtime, "olga", "operator")

    def count(**params: str) -> int:
        r = client.get("/console/audit", params=params)
        assert r.status_code == 200, r.text
        rows = table(r.text, "audit")
        return 0 if "none" in rows else len(rows)

    assert count(action="console.phi_view") == 50  # one page of 60
    assert count(action="console.*", actor="robot", target_id="p1") == 12
    assert count(action="writeback.replay", target_type="patient", target_id="p0") == 12
    assert count(action="retention.purge") == 1
    assert count(action="nothing") == 0
    assert count(actor="robot", since="2025-03-04T10:00:00Z", action="console.*") == 15
    assert count(until="2025-03-01") == 1  # the purge, 3 days ago; a date includes its day
    assert count(since="2025-03-02", until="2025-03-02") == 0
    r = client.get("/console/audit", params={"since": "yesterday"})
    assert r.status_code == 400 and 'id="audit-error"' in r.text
    assert client.get("/console/audit", params={"cursor": "x!"}).status_code == 400
    huge = base64.urlsafe_b64encode(b"2025-03-04T10:00:00+00:00|99999999999999999999").decode()
    assert client.get("/console/audit", params={"cursor": huge}).status_code == 400
    page = client.get("/console/audit", params={"action": "console.*"}).text
    assert 'value="console.*"' in page and "<b>" not in page


# ---------------------------------------------------------------------------------- outcomes


def test_outcomes_with_a_console_session(client: TestClient, runtime: Runtime) -> None:
    from integration.outcomes.api import CSS_HASH

    r = client.get("/console/outcomes", headers={"Accept": "text/html,application/xhtml+xml"})
    assert (r.status_code, r.headers["location"]) == (303, "/console/login")
    r = client.get("/console/outcomes.csv")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    sign_in(client, runtime, "vera")
    r = client.get("/console/outcomes")
    assert r.status_code == 200
    page = r.text
    assert '<a href="/console/outcomes" aria-current="page">Outcomes</a>' in page
    assert 'action="/console/logout"' in page and "<h1>Outreach outcomes</h1>" in page
    assert f"'sha256-{CSS_HASH}'" in r.headers["content-security-policy"]
    assert page.count("<h1>") == 1 and "<script" not in page
    csv = client.get("/console/outcomes.csv", params={"table": "waitlist"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
