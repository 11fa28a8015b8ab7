"""The console's sign-in, session (CSRF, idle timeout, logout), roles and the overview page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, insert, select

from integration.api import create_app
from integration.console.auth import COOKIE, IDLE_TIMEOUT, Session, require_person
from integration.console.routes import router as console_router
from integration.console.users import create_user
from integration.db import write_lock
from integration.models import audit_events, console_sessions, ehr_outbox, inbox, touches
from integration.runtime import Runtime
from tests.helpers import settings_for

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
SECRET_PATIENT = "pat-SECRET-4711"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def console_app(runtime: Runtime, clock: Clock) -> FastAPI:
    """The real app with the console router (until create_app includes it), a clock, and a
    test-only route that needs the operator role."""
    app = create_app(runtime)
    if "/console/login" not in {getattr(r, "path", "") for r in app.routes}:
        app.include_router(console_router)
    app.state.console_clock = clock

    @app.post("/console/test-operator")
    async def operator_only(
        _s: Annotated[Session, Depends(require_person("operator"))],
    ) -> PlainTextResponse:
        return PlainTextResponse("replayed")

    return app


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False),
                 with_mllp=False)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(runtime: Runtime, clock: Clock) -> Iterator[TestClient]:
    with TestClient(console_app(runtime, clock), follow_redirects=False) as c:
        yield c


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def login(client: TestClient, username: str = "vera", password: str = PASSWORD) -> str:
    """Sign in; returns the session's CSRF token (from the overview page)."""
    form = client.get("/console/login")
    assert form.status_code == 200
    r = client.post("/console/login", data={"username": username, "password": password,
                                            "csrf": _csrf(form.text)})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console"
    page = client.get("/console")
    assert page.status_code == 200
    return _csrf(page.text)


def _sessions(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(console_sessions)).scalar_one())


def _actions(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r.actor, r.action) for r in conn.execute(
            select(audit_events).where(audit_events.c.action.like("console.log%"))
            .order_by(audit_events.c.id))]


def test_unauthenticated_overview_redirects(client: TestClient) -> None:
    r = client.get("/console")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    page = client.get("/console/login")
    assert 'type="password"' in page.text and "<script" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_login_sets_a_strict_cookie_and_stores_its_hash(client: TestClient,
                                                        runtime: Runtime) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    form = client.get("/console/login")
    r = client.post("/console/login", data={"username": "vera", "password": PASSWORD,
                                            "csrf": _csrf(form.text)})
    assert r.status_code == 303
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(COOKIE + "="))
    token = cookie.split(";")[0].split("=", 1)[1]
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/console" in lowered
    assert "secure" not in lowered  # base_url is http here
    with runtime.engine.connect() as conn:
        ids = [row.id for row in conn.execute(select(console_sessions))]
    assert len(ids) == 1 and token not in ids and len(ids[0]) == 64
    assert _actions(runtime.engine) == [("vera", "console.login")]


def test_wrong_password_and_unknown_user_get_the_same_page(client: TestClient,
                                                           runtime: Runtime) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    answers = []
    for name, password in (("vera", "wrong password!"), ("nobody", PASSWORD)):
        form = client.get("/console/login")
        r = client.post("/console/login", data={"username": name, "password": password,
                                                "csrf": _csrf(form.text)})
        assert r.status_code == 401
        answers.append(r.text.replace(name, "NAME"))
    assert re.sub(r'value="[^"]*"', "", answers[0]) == re.sub(r'value="[^"]*"', "", answers[1])
    assert _sessions(runtime.engine) == 0
    assert _actions(runtime.engine) == [("vera", "console.login_failed"),
                                        ("nobody", "console.login_failed")]


def test_lockout_through_the_form(client: TestClient, runtime: Runtime, clock: Clock) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    for _ in range(5):
        csrf = _csrf(client.get("/console/login").text)
        r = client.post("/console/login", data={"username": "vera", "password": "nope nope",
                                                "csrf": csrf})
        assert r.status_code == 401
    csrf = _csrf(client.get("/console/login").text)
    r = client.post("/console/login", data={"username": "vera", "password": PASSWORD,
                                            "csrf": csrf})
    assert r.status_code == 401 and "locked for 15 minutes" in r.text
    clock.now = NOW + timedelta(minutes=15)
    login(client)


def test_login_without_csrf_is_refused(client: TestClient, runtime: Runtime) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    client.get("/console/login")
    r = client.post("/console/login", data={"username": "vera", "password": PASSWORD})
    assert r.status_code == 403
    r = client.post("/console/login", data={"username": "vera", "password": PASSWORD,
                                            "csrf": "forged" * 8})
    assert r.status_code == 403
    assert COOKIE not in r.cookies and _sessions(runtime.engine) == 0


def test_posts_need_the_session_csrf(client: TestClient, runtime: Runtime) -> None:
    create_user(runtime.engine, "olga", "operator", PASSWORD)
    csrf = login(client, "olga")
    assert client.post("/console/test-operator").status_code == 403
    assert client.post("/console/test-operator", data={"csrf": "x" * 43}).status_code == 403
    assert client.post("/console/logout").status_code == 403
    assert _sessions(runtime.engine) == 1
    r = client.post("/console/test-operator", data={"csrf": csrf})
    assert (r.status_code, r.text) == (200, "replayed")
    r = client.post("/console/test-operator", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200


def test_viewer_cannot_use_an_operator_route(client: TestClient, runtime: Runtime) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    csrf = login(client)
    r = client.post("/console/test-operator", data={"csrf": csrf})
    assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
    assert "needs the operator role" in r.text


def test_refusals_and_unknown_pages_are_html(client: TestClient, runtime: Runtime) -> None:
    create_user(runtime.engine, "olga", "operator", PASSWORD)
    login(client, "olga")
    r = client.post("/console/test-operator", data={"csrf": "forged" * 8})
    assert r.status_code == 403 and "security token is missing or wrong" in r.text
    assert r.headers["content-type"].startswith("text/html")
    r = client.get("/console/no-such-page")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in r.headers


def test_idle_timeout_renewed_by_activity(client: TestClient, runtime: Runtime,
                                          clock: Clock) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    login(client)
    clock.now = NOW + IDLE_TIMEOUT - timedelta(minutes=1)
    assert client.get("/console").status_code == 200  # renews
    clock.now += IDLE_TIMEOUT - timedelta(minutes=1)
    assert client.get("/console").status_code == 200
    clock.now += IDLE_TIMEOUT
    r = client.get("/console")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert _sessions(runtime.engine) == 0


def test_absolute_limit(client: TestClient, runtime: Runtime, clock: Clock) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    login(client)
    answers = []
    for _ in range(30):
        clock.now += timedelta(minutes=29)
        answers.append(client.get("/console").status_code)
    # Active every 29 minutes: alive for 12 hours (24 renewals), then signed out.
    assert answers[:24] == [200] * 24 and answers[24] == 303


def test_logout(client: TestClient, runtime: Runtime) -> None:
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    csrf = login(client)
    r = client.post("/console/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert _sessions(runtime.engine) == 0
    assert client.get("/console").status_code == 303
    assert _actions(runtime.engine)[-1] == ("vera", "console.logout")


def test_disabled_user_loses_the_session(client: TestClient, runtime: Runtime) -> None:
    from integration.console.users import disable_user

    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    login(client)
    disable_user(runtime.engine, "vera")
    assert client.get("/console").status_code == 303


def test_secure_cookie_on_https(db_url: str, clock: Clock) -> None:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False,
                              base_url="https://careloop.example.org"), with_mllp=False)
    try:
        create_user(rt.engine, "vera", "viewer", PASSWORD)
        with TestClient(console_app(rt, clock), base_url="https://testserver",
                        follow_redirects=False) as c:
            form = c.get("/console/login")
            r = c.post("/console/login", data={"username": "vera", "password": PASSWORD,
                                               "csrf": _csrf(form.text)})
        cookie = next(x for x in r.headers.get_list("set-cookie") if x.startswith(COOKIE))
        assert "secure" in cookie.lower()
    finally:
        rt.engine.dispose()


def _seed(engine: Engine) -> None:
    def msg(n: int, status: str, mtype: str, ack: str, ago: timedelta) -> dict[str, object]:
        return {"source": "mllp", "peer": "10.0.0.1", "sender": "LAB|HOSP",
                "dedup_key": f"k{n}", "message_type": mtype, "control_id": f"c{n}",
                "version": "2.5", "raw": f"MSH|^~\\&|LAB|HOSP|||||{mtype}|c{n}|{SECRET_PATIENT}"
                .encode(), "status": status, "ack_code": ack, "attempts": 0,
                "received_at": NOW - ago}

    def touch(n: int, status: str, ago: timedelta) -> dict[str, object]:
        return {"key": f"t{n}", "pathway": "reminder", "step": 1, "entry_id": f"e{n}",
                "patient_id": SECRET_PATIENT, "status": status, "address": "+4915112345678",
                "created_at": NOW - ago, "updated_at": NOW - ago}

    def outbox(n: int, status: str) -> dict[str, object]:
        return {"key": f"o{n}", "connection": "ehr", "resource_type": "Communication",
                "operation": "create", "resource": {"subject": SECRET_PATIENT},
                "status": status, "attempts": 0, "next_attempt_at": NOW,
                "created_at": NOW, "updated_at": NOW}

    h = timedelta(hours=1)
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(inbox), [
            msg(1, "processed", "ADT^A01", "AA", h), msg(2, "processed", "ADT^A01", "AA", 2 * h),
            msg(3, "processed", "ADT^A08", "AA", 3 * h), msg(4, "failed", "ORU^R01", "AE", h),
            msg(5, "received", "SIU^S12", "AA", timedelta(minutes=5)),
            msg(6, "received", "SIU^S12", "AA", timedelta(minutes=2)),
            msg(7, "rejected", "", "AR", h),
            msg(8, "failed", "ORU^R01", "AE", 30 * h),  # before the window
        ])
        conn.execute(insert(touches), [touch(1, "sent", h), touch(2, "sent", h),
                                       touch(3, "skipped", h), touch(4, "sent", 48 * h)])
        conn.execute(insert(ehr_outbox), [outbox(1, "written"), outbox(2, "failed"),
                                          outbox(3, "written")])


def _table(html: str, table_id: str) -> dict[str, list[str]]:
    body = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    rows: dict[str, list[str]] = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        head = re.search(r'<th scope="row">(.*?)</th>', tr)
        if head:
            rows[head.group(1)] = re.findall(r"<td>(.*?)</td>", tr)
    return rows


def test_viewer_sees_the_overview_figures(client: TestClient, runtime: Runtime) -> None:
    _seed(runtime.engine)
    create_user(runtime.engine, "vera", "viewer", PASSWORD)
    login(client)
    r = client.get("/console")
    html = r.text
    assert r.headers["cache-control"] == "no-store"
    assert _table(html, "inbox-status") == {"processed": ["3"], "received": ["2"],
                                            "failed": ["1"], "rejected": ["1"]}
    assert _table(html, "inbox-type") == {"ADT^A01": ["2"], "SIU^S12": ["2"], "(none)": ["1"],
                                          "ADT^A08": ["1"], "ORU^R01": ["1"]}
    assert _table(html, "ack-codes") == {"AA": ["5"], "AE": ["1"], "AR": ["1"]}
    assert _table(html, "queues") == {
        "intake": ["2", "5 min 0 s"], "fhir": ["0", "-"], "outreach": ["0", "-"],
        "writeback": ["0", "-"], "replies": ["0", "-"]}
    assert _table(html, "touches-status") == {"sent": ["2"], "skipped": ["1"]}
    assert _table(html, "outbox-status") == {"written": ["2"], "failed": ["1"]}
    assert re.search(r'id="fig-errors"><strong>1</strong>', html)
    assert re.search(r'id="fig-received"><strong>7</strong>', html)
    assert '<meta http-equiv="refresh" content="30">' in html  # people watch it arrive
    assert SECRET_PATIENT not in html and "+4915112345678" not in html
    assert "<script" not in html and "<caption>" in html
