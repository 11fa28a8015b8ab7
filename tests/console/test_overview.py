"""The console's overview (``GET /console``): messages per minute and per hour by sender and
type, ACK codes, queues per stage, errors with the latest failed messages; charts with their
numbers; no patient data; error texts for PHI users only.

The helpers at the top (sign-in, table reading) are shared by the other console page tests.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert

from integration.api import create_app
from integration.db import write_lock
from integration.models import channel_events, ehr_outbox, inbox, touches
from integration.runtime import Runtime
from tests.console import support
from tests.console.support import Clock
from tests.helpers import settings_for

NOW = datetime(2025, 3, 4, 10, 30, 15, tzinfo=UTC)
SECRET = "pat-SECRET-4711"
PHONE = "+4915112345678"


def make_client(runtime: Runtime, clock: Clock) -> TestClient:
    app = create_app(runtime)
    app.state.console_clock = clock
    return TestClient(app, follow_redirects=False)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False),
                 with_mllp=False)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime: Runtime, clock: Clock) -> Iterator[TestClient]:
    with make_client(runtime, clock) as c:
        yield c


def sign_in(client: TestClient, runtime: Runtime, username: str, role: str = "viewer", *,
            phi: bool = False) -> str:
    """Create the user, sign in; returns the session's CSRF token."""
    return support.sign_in(client, runtime.engine, username, role, phi=phi)


def _text(cell: str) -> str:
    return html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", cell))).strip()


def table(page: str, table_id: str) -> dict[str, list[str]]:
    """A table's body rows: the row header's text → the data cells' texts."""
    body = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    body = body.split("<tbody>", 1)[-1]
    rows: dict[str, list[str]] = {}
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S):
        head = re.search(r'<th scope="row">(.*?)</th>', tr, re.S)
        if head:
            rows[_text(head.group(1))] = [_text(c) for c in
                                          re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
    return rows


def message(n: int, *, status: str = "processed", mtype: str = "ADT^A01",
            sender: str = "LAB|HOSP", ack: str = "AA", ago: timedelta = timedelta(hours=1),
            source: str = "mllp", error: str | None = None) -> dict[str, object]:
    return {"source": source, "peer": "10.0.0.1", "sender": sender, "dedup_key": f"k{n}",
            "message_type": mtype, "control_id": f"c{n}", "version": "2.5",
            "raw": f"MSH|^~\\&|X|Y|||||{mtype}|c{n}|P|2.5\rPID|1||{SECRET}".encode(),
            "status": status, "ack_code": ack, "attempts": 0, "received_at": NOW - ago,
            "last_error": error}


def touch(n: int, status: str, *, pathway: str = "reminder", ago: timedelta = timedelta(hours=1),
          due: timedelta | None = None, sent: bool = False, reason: str | None = None,
          delivery: str | None = None, channel: str = "sms",
          patient: str = SECRET) -> dict[str, object]:
    at = NOW - ago
    return {"key": f"{pathway}|0|e{n}", "pathway": pathway, "step": 0, "entry_id": f"e{n}",
            "patient_id": patient, "status": status, "address": PHONE, "channel": channel,
            "due_at": NOW + due if due is not None else at, "reason": reason,
            "sent_at": at if sent else None, "delivery": delivery, "created_at": at,
            "updated_at": at}


def outbox_row(n: int, status: str, *, resource_type: str = "Communication",
               error: str | None = None, attempts: int = 0,
               ago: timedelta = timedelta(minutes=10)) -> dict[str, object]:
    return {"key": f"o{n}", "connection": "ehr", "resource_type": resource_type,
            "operation": "create", "resource": {"subject": {"reference": SECRET}},
            "status": status, "attempts": attempts, "next_attempt_at": NOW + timedelta(minutes=5),
            "last_error": error, "created_at": NOW - ago, "updated_at": NOW - ago}


def seed(engine: Engine) -> None:
    minute, hour = timedelta(minutes=1), timedelta(hours=1)
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(inbox), [
            message(1, ago=2 * minute),
            message(2, ago=2 * minute, sender="ADT|MAIN"),
            message(3, mtype="ORU^R01", ago=3 * hour, sender="ADT|MAIN"),
            message(4, status="failed", mtype="ORU^R01", ack="AE", ago=30 * minute,
                    error=f"PID-3: no identifier for {SECRET}"),
            message(5, status="received", mtype="SIU^S12", ago=7 * minute),
            message(6, status="rejected", mtype="", sender="", ack="AR", ago=5 * hour,
                    error="MSH: unreadable"),
            message(7, status="received", source="fhir", mtype="", sender="ehr",
                    ack="", ago=90 * 1 * timedelta(seconds=1)),
            message(8, status="failed", ago=30 * hour),  # before the window
            *[message(10 + i, sender=f"S{i}|F", ago=20 * hour) for i in range(6)],
        ])
        conn.execute(insert(touches), [
            touch(1, "scheduled", due=-10 * minute),  # due 10 minutes ago
            touch(2, "scheduled", due=2 * hour),      # not yet due
            touch(3, "failed", reason=f"channel: 400 bad number {PHONE}"),
            touch(4, "sent", sent=True),
        ])
        conn.execute(insert(ehr_outbox), [
            outbox_row(1, "pending", ago=20 * minute),
            outbox_row(2, "failed", error="OperationOutcome: invalid subject", ago=hour),
            outbox_row(3, "written"),
        ])
        conn.execute(insert(channel_events), [
            {"channel": "sms", "kind": "inbound", "provider_id": "SM1", "address": PHONE,
             "payload": {"Body": "YES"}, "status": "pending", "attempts": 0,
             "received_at": NOW - 4 * minute},
        ])


def test_signed_out_is_sent_to_sign_in(client: TestClient) -> None:
    r = client.get("/console")
    assert (r.status_code, r.headers["location"]) == (303, "/console/login")


def test_the_overview_from_seeded_rows(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "vera")
    r = client.get("/console")
    assert r.status_code == 200
    page = r.text
    # the existing tables, over 24 hours
    assert table(page, "inbox-status") == {"processed": ["9"], "failed": ["1"],
                                           "received": ["2"], "rejected": ["1"]}
    assert table(page, "ack-codes") == {"AA": ["10"], "AE": ["1"], "AR": ["1"]}
    assert re.search(r'id="fig-received"><strong>13</strong>', page)
    assert re.search(r'id="fig-errors"><strong>1</strong>', page)
    # queues per stage: waiting rows and the oldest's age
    assert table(page, "queues") == {
        "intake": ["1", "7 min 0 s"], "fhir": ["1", "1 min 30 s"],
        "outreach": ["1", "10 min 0 s"], "writeback": ["1", "20 min 0 s"],
        "replies": ["1", "4 min 0 s"]}
    assert re.search(r'id="fig-queue-writeback"><strong>1</strong>', page)
    # senders: the busiest five by name, then the rest; last hour and 24 hours
    # (ties by name; the rejected message has no sender, the notification's is the EHR's)
    senders = table(page, "senders")
    assert {name: cells[:2] for name, cells in senders.items()} == {
        "LAB|HOSP": ["3", "3"], "ADT|MAIN": ["1", "2"], "(none)": ["0", "1"],
        "S0|F": ["0", "1"], "S1|F": ["0", "1"], "(other)": ["1", "5"]}
    assert 'aria-label="LAB|HOSP, messages per hour: 24 values, total 3, highest 3"' in page
    types = table(page, "types")
    assert {name: cells[:2] for name, cells in types.items()} == {
        "ADT^A01": ["2", "8"], "(none)": ["1", "2"], "ORU^R01": ["1", "2"],
        "SIU^S12": ["1", "1"]}
    # errors of the last 24 hours
    assert table(page, "errors") == {
        "Messages failed": ["1"], "Messages rejected (unreadable)": ["1"],
        "Write-backs the EHR rejected": ["1"], "Touches that failed": ["1"]}
    latest = table(page, "latest-errors")
    assert list(latest) == ["4", "6", "8"]  # newest first
    assert '<a href="/console/messages/4">4</a>' in page
    assert latest["4"][:3] == ["2025-03-04 10:00:15", "failed", "ORU^R01"]
    # no patient data, no error text, no script
    assert SECRET not in page and PHONE not in page
    assert "PID-3" not in page and "<script" not in page


def test_charts_and_their_numbers(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "vera")
    page = client.get("/console").text
    for chart in ("chart-minute", "chart-hour", "chart-acks", "chart-queues", "chart-errors"):
        assert f'<figure id="{chart}"' in page, chart
        assert f'id="{chart}-data"' in page
    minute = table(page, "chart-minute-data")
    assert len(minute) == 60
    assert minute["2025-03-04 10:28 UTC"] == ["3"]  # two messages and a notification
    assert minute["2025-03-04 10:23 UTC"] == ["1"]
    assert minute["2025-03-04 10:00 UTC"] == ["1"]  # the failed one, 30 minutes ago
    hour = table(page, "chart-hour-data")
    assert len(hour) == 24
    assert hour["2025-03-04 10:00 UTC"] == ["5"]
    assert hour["2025-03-04 07:00 UTC"] == ["1"]
    assert hour["2025-03-03 14:00 UTC"] == ["6"]  # 20 hours ago
    assert sum(int(v[0]) for v in hour.values()) == 13
    errors = table(page, "chart-errors-data")
    assert errors["2025-03-04 10:00 UTC"] == ["1"] and errors["2025-03-04 05:00 UTC"] == ["1"]
    assert table(page, "chart-queues-data")["intake (HL7 v2 messages stored and acknowledged, "
                                            "not yet processed)"] == ["1"]
    assert '<rect class="bar bad"' in page  # AE/AR and error bars in the error colour
    assert "style=" not in page


def test_error_text_only_for_phi(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    page = client.get("/console").text
    latest = table(page, "latest-errors")
    assert latest["6"][-1] == "MSH: unreadable"
    assert "PID-3: no identifier" in page


def test_empty_database(client: TestClient, runtime: Runtime) -> None:
    sign_in(client, runtime, "vera")
    page = client.get("/console").text
    assert table(page, "queues") == {s: ["0", "-"] for s in
                                     ("intake", "fhir", "outreach", "writeback", "replies")}
    assert table(page, "latest-errors") == {"none": ["No failed or rejected message."]}
    assert table(page, "senders") == {"none": ["0", "0", "-"]}
