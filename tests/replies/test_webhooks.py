"""POST /channels/{channel}/status and /inbound: Twilio signatures, storage before the answer,
idempotency, limits, and the voice answer in TwiML (real PostgreSQL and SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, select

from adapters.twilio import twilio_signature
from integration.models import channel_events
from integration.replies.webhooks import router
from integration.settings import Settings
from tests.outreach.support import NY, receive, siu, stage, touch
from tests.replies.support import (
    BASE,
    OUR_NUMBER,
    PATIENT_NUMBER,
    TOKEN,
    answer_channels,
    make_settings,
    requests,
    sms_params,
)


def app_for(settings: Settings, engine: Engine, **extra: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    app.state.runtime = SimpleNamespace(settings=settings, engine=engine, **extra)
    return app


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


@pytest.fixture
def pokes() -> list[int]:
    return []


@pytest.fixture
def client(settings: Settings, engine: Engine, tmp_path: Path,
           pokes: list[int]) -> Iterator[TestClient]:
    app = app_for(settings, engine, channels=answer_channels(tmp_path),
                  on_channel_event=pokes.append)
    with TestClient(app) as c:
        yield c


def signed(path: str, params: dict[str, str], token: str = TOKEN) -> dict[str, str]:
    return {"X-Twilio-Signature": twilio_signature(token, BASE + path, params)}


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(channel_events).order_by(channel_events.c.id)))


INBOUND = "/channels/sms/inbound"


class TestSignature:
    def test_valid_signature_stores_one_row_then_answers(
            self, client: TestClient, engine: Engine, pokes: list[int]) -> None:
        params = sms_params("C", "SM1")
        r = client.post(INBOUND, data=params, headers=signed(INBOUND, params))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/xml")
        assert r.text == "<Response/>"
        (row,) = rows(engine)
        assert (row.channel, row.kind, row.provider_id, row.status) == (
            "sms", "inbound", "SM1", "pending")
        assert row.address == PATIENT_NUMBER and row.payload["Body"] == "C"
        assert pokes == [row.id]

    @pytest.mark.parametrize("headers", [
        {}, {"X-Twilio-Signature": ""}, {"X-Twilio-Signature": "bm9wZQ=="},
    ])
    def test_missing_or_forged_is_403_and_nothing_stored(
            self, client: TestClient, engine: Engine, headers: dict[str, str]) -> None:
        r = client.post(INBOUND, data=sms_params("STOP", "SM1"), headers=headers)
        assert r.status_code == 403
        assert r.json()["code"] == "forbidden"
        assert rows(engine) == []

    def test_signed_with_another_token_is_403(self, client: TestClient,
                                              engine: Engine) -> None:
        params = sms_params("STOP", "SM1")
        r = client.post(INBOUND, data=params, headers=signed(INBOUND, params, "other-token"))
        assert r.status_code == 403
        assert rows(engine) == []

    def test_tampered_body_is_403(self, client: TestClient, engine: Engine) -> None:
        """The signature covers every form field: a changed Body does not pass."""
        params = sms_params("C", "SM1")
        headers = signed(INBOUND, params)
        r = client.post(INBOUND, data={**params, "Body": "X"}, headers=headers)
        assert r.status_code == 403
        assert rows(engine) == []

    def test_signature_covers_the_query(self, client: TestClient, engine: Engine) -> None:
        """The query is part of the signed URL: moving the key to another touch fails."""
        path = "/channels/sms/status?key=a%7Cb"
        params = {"MessageSid": "SM1", "MessageStatus": "delivered", "To": PATIENT_NUMBER}
        headers = signed(path, params)
        assert client.post("/channels/sms/status?key=other", data=params,
                           headers=headers).status_code == 403
        assert client.post(path, data=params, headers=headers).status_code == 200
        (row,) = rows(engine)
        assert row.touch_key == "a|b"


class TestIdempotent:
    def test_redelivery_is_200_and_stores_nothing_new(
            self, client: TestClient, engine: Engine, pokes: list[int]) -> None:
        params = sms_params("C", "SM1")
        for _ in range(3):
            assert client.post(INBOUND, data=params,
                               headers=signed(INBOUND, params)).status_code == 200
        assert len(rows(engine)) == 1
        assert len(pokes) == 1

    def test_idempotency_token_is_the_provider_id(self, client: TestClient,
                                                  engine: Engine) -> None:
        params = sms_params("C", "SM1")
        headers = {**signed(INBOUND, params), "I-Twilio-Idempotency-Token": "tok-1"}
        client.post(INBOUND, data=params, headers=headers)
        client.post(INBOUND, data=params, headers=headers)
        (row,) = rows(engine)
        assert row.provider_id == "tok-1"

    def test_each_receipt_status_is_its_own_event(self, client: TestClient,
                                                  engine: Engine) -> None:
        path = "/channels/sms/status?key=k1"
        for status in ("queued", "sent", "delivered", "delivered"):
            params = {"MessageSid": "SM1", "MessageStatus": status, "To": "+1 (555) 555-0101",
                      "From": OUR_NUMBER}
            assert client.post(path, data=params, headers=signed(path, params)).status_code == 200
        found = rows(engine)
        assert [r.provider_id for r in found] == ["SM1:queued", "SM1:sent", "SM1:delivered"]
        assert {r.address for r in found} == {PATIENT_NUMBER}
        assert {r.kind for r in found} == {"status"}


class TestRefused:
    def test_oversized_body_is_413(self, client: TestClient, engine: Engine) -> None:
        params = sms_params("x" * 100_000, "SM1")
        r = client.post(INBOUND, data=params, headers=signed(INBOUND, params))
        assert r.status_code == 413
        assert rows(engine) == []

    @pytest.mark.parametrize("path", ["/channels/email/inbound", "/channels/portal/status",
                                      "/channels/fax/inbound"])
    def test_other_channels_are_404(self, client: TestClient, path: str) -> None:
        params = sms_params("C", "SM1")
        r = client.post(path, data=params, headers=signed(path, params))
        assert r.status_code == 404 and r.json()["code"] == "not_found"

    def test_channel_without_twilio_is_404(self, sqlite_url: str, tmp_path: Path) -> None:
        settings = make_settings(sqlite_url, tmp_path, channels={"sms": {"provider": "file"}})
        engine = create_engine(sqlite_url)
        with TestClient(app_for(settings, engine)) as c:
            params = sms_params("C", "SM1")
            assert c.post(INBOUND, data=params,
                          headers=signed(INBOUND, params)).status_code == 404
        engine.dispose()

    def test_not_a_twilio_request_is_400(self, client: TestClient, engine: Engine) -> None:
        params = {"Body": "C", "From": PATIENT_NUMBER}
        r = client.post(INBOUND, data=params, headers=signed(INBOUND, params))
        assert r.status_code == 400
        assert rows(engine) == []

    def test_database_down_is_503(self, sqlite_url: str, tmp_path: Path) -> None:
        settings = make_settings(sqlite_url, tmp_path)
        down = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing",
                             connect_args={"connect_timeout": 2})
        with TestClient(app_for(settings, down)) as c:
            params = sms_params("C", "SM1")
            r = c.post(INBOUND, data=params, headers=signed(INBOUND, params))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        down.dispose()


def book_ahead(engine: Engine, tmp_path: Path) -> Any:
    """A booking ten days from the real clock (the voice webhook reads it), its first
    reminder sent; returns that touch."""
    start = (datetime.now(NY) + timedelta(days=10)).replace(hour=14, minute=0, second=0,
                                                             microsecond=0)
    s = stage(engine, tmp_path / "outbox")
    booked = start - timedelta(days=9)
    receive(engine, siu("S12", "C1", filler="F1", start=start, sent=booked), booked)
    s.reconcile(booked)
    assert s.send_due(start - timedelta(days=3)).sent == 1
    return touch(engine, "appointment-reminder|0|")


def voice_path(key: str) -> str:
    return f"/channels/voice/inbound?key={quote(key, safe='')}"


def press(client: TestClient, key: str, digits: str, sid: str = "CA1") -> Any:
    path = voice_path(key)
    params = {"CallSid": sid, "AccountSid": "AC0123", "From": OUR_NUMBER,
              "To": PATIENT_NUMBER, "Direction": "outbound-api", "Digits": digits}
    return client.post(path, data=params, headers=signed(path, params))


class TestVoice:
    def test_one_confirms_and_says_so_in_the_patients_language(
            self, client: TestClient, engine: Engine, tmp_path: Path) -> None:
        sent = book_ahead(engine, tmp_path)
        r = press(client, sent.key, "1")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
        assert '<Say language="es-US">Gracias. Su cita está confirmada. Adiós.</Say>' in r.text
        assert "<Hangup" in r.text
        (req,) = requests(engine)
        assert (req.action, req.source, req.touch_key) == ("confirm", "voice", sent.key)
        (row,) = rows(engine)
        assert row.status == "processed" and row.touch_key == sent.key

    def test_redelivered_key_press_answers_the_same_and_records_once(
            self, client: TestClient, engine: Engine, tmp_path: Path) -> None:
        sent = book_ahead(engine, tmp_path)
        first = press(client, sent.key, "1")
        again = press(client, sent.key, "1")
        assert again.status_code == 200 and again.text == first.text
        assert len(requests(engine)) == 1 and len(rows(engine)) == 1

    def test_two_asks_to_cancel(self, client: TestClient, engine: Engine,
                                tmp_path: Path) -> None:
        sent = book_ahead(engine, tmp_path)
        r = press(client, sent.key, "2")
        assert "Recibimos su solicitud de cancelar" in r.text
        assert touch(engine, "appointment-reminder|1|").reason == "the patient asked to cancel"

    def test_three_repeats_the_message_and_gathers_again(
            self, client: TestClient, engine: Engine, tmp_path: Path) -> None:
        """3: the touch's own message again, in a Gather posting to the same URL; then 1 in
        the same call still counts (a new key press, not a redelivery)."""
        sent = book_ahead(engine, tmp_path)
        assert sent.body
        r = press(client, sent.key, "3")
        assert "<Gather" in r.text and sent.body.split(":")[0] in r.text
        assert f'action="{BASE}{voice_path(sent.key)}"' in r.text
        assert requests(engine) == []
        press(client, sent.key, "1")
        assert [q.action for q in requests(engine)] == ["confirm"]

    def test_another_key_says_the_options_again(self, client: TestClient, engine: Engine,
                                                tmp_path: Path) -> None:
        sent = book_ahead(engine, tmp_path)
        r = press(client, sent.key, "9")
        assert "<Gather" in r.text and "Pulse 1 para confirmar" in r.text
        assert requests(engine) == []

    def test_without_a_touch_nothing_is_guessed(self, client: TestClient,
                                                engine: Engine) -> None:
        r = press(client, "no-such-touch", "1")
        assert r.status_code == 200 and "There is no upcoming appointment" in r.text
        assert requests(engine) == []
