"""The patient page over HTTP (SQLite and PostgreSQL): what it shows, in which language, the
refusals (forged, expired, invalid), and the actions with their rows and effects.

Touches are real: HL7 v2 messages through the processing stage and the outreach reconciler."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from integration.models import (
    audit_events,
    channel_events,
    ehr_outbox,
    patient_preferences,
    patient_requests,
    touches,
)
from tests.portal.support import Portal

HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def rows(portal: Portal, table: Any) -> list[Any]:
    with portal.engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c[next(iter(table.c.keys()))])))


def count(portal: Portal, table: Any) -> int:
    with portal.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def main(html: str) -> str:
    """The text of <main>, tags stripped, whitespace collapsed."""
    inner = html.split("<main", 1)[1].split("</main>", 1)[0]
    return " ".join(re.sub(r"<[^>]+>", " ", inner).split())


def status_region(html: str) -> str:
    match = re.search(r'<div role="status"[^>]*>(.*?)</div>', html, re.S)
    assert match, html
    return " ".join(re.sub(r"<[^>]+>", " ", match.group(1)).split())


def assert_secure(response: Any) -> None:
    for name, value in HEADERS.items():
        assert response.headers[name] == value, name
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'none'", "style-src 'self'", "form-action 'self'",
                      "frame-ancestors 'none'", "base-uri 'none'", "img-src 'self'"):
        assert directive in csp


def version(html: str) -> str:
    match = re.search(r'name="v" value="([0-9a-f]+)"', html)
    assert match
    return match.group(1)


class TestShow:
    def test_appointment_in_the_touch_language(self, portal: Portal,
                                               client: TestClient) -> None:
        """The reminder went out in Spanish: the page is in Spanish, time in New York."""
        touch = portal.appointment()
        assert touch.language == "es"
        r = client.get(portal.url(touch.id))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert '<html lang="es">' in r.text
        text = main(r.text)
        assert r.text.count("<h1>") == 1 and "<h1>Su cita</h1>" in r.text
        assert "martes, 12 de marzo de 2030" in text
        assert "14:00" in text
        assert "Check-up" in text and "Main Street Clinic" in text
        assert "Programada" in text  # booked
        assert "Hola, Jane." in text
        for button in ("Confirmar", "Pedir la cancelación", "Pedir otra fecha"):
            assert f">{button}</button>" in r.text
        assert "Doe" not in r.text and "MRN1" not in r.text and "1980" not in r.text
        assert_secure(r)
        (audit,) = rows(portal, audit_events)  # a read of patient data, on record
        assert (audit.actor, audit.action, audit.target_type, audit.target_id) == (
            "portal", "portal.read", "Patient", touch.patient_id)
        assert audit.detail == {"link": "t", "touch_id": touch.id, "entry_id": touch.entry_id}

    def test_appointment_in_english(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment(mrn="MRN2", lang="en^English^HL70296", filler="F2")
        r = client.get(portal.url(touch.id))
        assert '<html lang="en">' in r.text
        text = main(r.text)
        assert "<h1>Your appointment</h1>" in r.text
        assert "Tuesday, March 12, 2030" in text
        assert re.search(r"2:00\s?PM", text.replace("\u202f", " ")), text
        assert "Check-up" in text and "Main Street Clinic" in text and "Booked" in text
        assert ">Confirm</button>" in r.text and ">Ask to cancel</button>" in r.text
        assert ">Ask to reschedule</button>" in r.text
        assert 'for="preferred"' in r.text

    def test_lang_overrides_for_the_view(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        english = client.get(url, params={"lang": "en"})
        assert '<html lang="en">' in english.text and "Tuesday, March 12, 2030" in english.text
        assert f"{url}/confirm?lang=en" in english.text  # the forms keep the choice
        unknown = client.get(url, params={"lang": "xx"})
        assert '<html lang="es">' in unknown.text

    def test_instruction_for_a_refill(self, portal: Portal, client: TestClient) -> None:
        touch = portal.refill()
        r = client.get(portal.url(touch.id))
        assert r.status_code == 200
        assert "<h1>Your medication</h1>" in r.text
        assert "Doxycycline 100 mg" in main(r.text)
        assert ">Confirm</button>" not in r.text  # nothing to confirm about a refill

    def test_survey_form(self, portal: Portal, client: TestClient) -> None:
        touch = portal.discharge()
        r = client.get(portal.url(touch.id))
        assert r.status_code == 200
        assert "<h1>How was your visit?</h1>" in r.text
        assert ("<legend>How likely are you to recommend us to a friend or family member?"
                "</legend>") in r.text
        for n in range(11):
            assert f'<label class="scale-item" for="score-{n}">' in r.text
            assert f'id="score-{n}" name="score" value="{n}"' in r.text
        assert '<label for="comment">' in r.text
        spanish = client.get(portal.url(touch.id), params={"lang": "es"})
        assert "¿Qué tan probable es que nos recomiende" in spanish.text

    def test_stylesheet(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        page = client.get(portal.url(touch.id))
        href = re.search(r'<link rel="stylesheet" href="([^"]+)"', page.text)
        assert href and href.group(1).startswith("/p/static/portal.css?v=")
        css = client.get(href.group(1))
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert ":focus-visible" in css.text
        assert css.headers["x-content-type-options"] == "nosniff"


class TestRefused:
    def test_forged_and_unknown_look_the_same(self, portal: Portal,
                                              client: TestClient) -> None:
        """A bad signature and a good one for a touch that does not exist get the same 404
        page: nothing tells a guesser which ids exist."""
        touch = portal.appointment()
        token = portal.token(touch.id)
        forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        unknown = portal.token(touch.id + 1000)
        bad = client.get(f"/p/{forged}")
        missing = client.get(f"/p/{unknown}")
        assert bad.status_code == missing.status_code == 404
        assert bad.text == missing.text
        assert "We could not find this page" in bad.text
        assert "Traceback" not in bad.text and "Jane" not in bad.text
        assert_secure(bad)
        for junk in ("x", "t1", "t1.zz", "p.abc.def", "t" + "9" * 40 + ".zz.abc", "t1.%00.x"):
            r = client.get(f"/p/{junk}")
            assert r.status_code == 404, junk
            assert "We could not find this page" in r.text

    def test_not_found_follows_accept_language(self, client: TestClient) -> None:
        r = client.get("/p/nothing", headers={"Accept-Language": "es-MX,es;q=0.9,en;q=0.5"})
        assert r.status_code == 404 and '<html lang="es">' in r.text
        assert "No encontramos esta página" in r.text

    def test_expired_in_the_patient_language(self, portal: Portal,
                                             client: TestClient) -> None:
        touch = portal.appointment()
        old = datetime.now(UTC) - timedelta(days=15)
        r = client.get(portal.url(touch.id, now=old))
        assert r.status_code == 410
        assert '<html lang="es">' in r.text
        assert "Este enlace ha vencido" in r.text
        assert '<a href="tel:+15550100">+1 555 0100</a>' in r.text
        assert "martes" not in r.text and "Jane" not in r.text  # nothing about the visit
        assert_secure(r)
        assert count(portal, audit_events) == 0

    def test_actions_on_bad_links_store_nothing(self, portal: Portal,
                                                client: TestClient) -> None:
        touch = portal.appointment()
        old = datetime.now(UTC) - timedelta(days=15)
        token = portal.token(touch.id)
        assert client.post(f"/p/{token[:-1]}x/confirm", data={}).status_code == 404
        assert client.post(f"{portal.url(touch.id, now=old)}/confirm", data={}).status_code == 410
        assert client.post(f"/p/{token}/delete", data={}).status_code == 404
        assert count(portal, channel_events) == 0
        assert count(portal, patient_requests) == 0


    def test_database_trouble_is_a_friendly_503(self, portal: Portal,
                                                client: TestClient) -> None:
        """A read that cannot be put on record is not shown; a write that cannot be stored is
        not acknowledged: 503 pages, no stack trace."""
        touch = portal.appointment()
        url = portal.url(touch.id)
        with portal.engine.begin() as conn:
            conn.execute(text("DROP TABLE audit_events"))
        r = client.get(url)
        assert r.status_code == 503 and r.headers["retry-after"] == "60"
        assert "Inténtelo de nuevo más tarde" in r.text and "Traceback" not in r.text
        assert "Check-up" not in r.text
        with portal.engine.begin() as conn:
            conn.execute(text("DROP TABLE channel_events"))
        r = client.post(f"{url}/confirm", data={})
        assert r.status_code == 503 and "Traceback" not in r.text
        assert count(portal, patient_requests) == 0


class TestAppointmentActions:
    def test_confirm(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        page = client.get(url)
        r = client.post(f"{url}/confirm", data={"v": version(page.text)})
        assert r.status_code == 303
        assert r.headers["location"] == f"{url}?done=confirm"
        assert_secure(r)
        (event,) = rows(portal, channel_events)
        assert (event.channel, event.kind, event.status) == ("portal", "portal", "processed")
        assert event.provider_id.startswith(f"{touch.id}:confirm:")
        assert len(event.provider_id.rsplit(":", 1)[1]) == 16
        assert event.touch_key == touch.key
        assert event.result == f"confirm entry {touch.entry_id}"
        (request,) = rows(portal, patient_requests)
        assert (request.action, request.source, request.event_id) == ("confirm", "portal",
                                                                      event.id)
        assert (request.entry_id, request.touch_key) == (touch.entry_id, touch.key)
        done = client.get(r.headers["location"])
        assert status_region(done.text) == "Listo: Gracias. Su cita está confirmada."
        assert "Confirmada" in main(done.text)

    def test_double_submit_is_stored_once(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        form = {"v": version(client.get(url).text)}
        first = client.post(f"{url}/confirm", data=form)
        second = client.post(f"{url}/confirm", data=form)
        assert first.status_code == second.status_code == 303
        assert second.headers["location"] == first.headers["location"]
        assert count(portal, channel_events) == 1
        assert count(portal, patient_requests) == 1

    def test_a_changed_mind_is_a_new_request(self, portal: Portal,
                                             client: TestClient) -> None:
        """Confirm, ask to cancel, confirm again from the page as then shown: three requests,
        and the page says confirmed."""
        touch = portal.appointment()
        url = portal.url(touch.id)
        for action in ("confirm", "cancel", "confirm"):
            form = {"v": version(client.get(url).text)}
            assert client.post(f"{url}/{action}", data=form).status_code == 303
        assert [r.action for r in rows(portal, patient_requests)] == [
            "confirm", "cancel", "confirm"]
        assert "Confirmada" in main(client.get(url).text)

    def test_cancel_stops_the_reminders(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        with portal.engine.connect() as conn:
            scheduled = conn.execute(select(func.count()).select_from(touches).where(
                touches.c.entry_id == touch.entry_id, touches.c.status == "scheduled")
            ).scalar_one()
        assert scheduled == 2
        r = client.post(f"{url}/cancel", data={"v": version(client.get(url).text)})
        assert r.headers["location"] == f"{url}?done=cancel"
        (request,) = rows(portal, patient_requests)
        assert request.action == "cancel"
        with portal.engine.connect() as conn:
            left = conn.execute(select(touches.c.status, touches.c.reason).where(
                touches.c.entry_id == touch.entry_id)).all()
        assert {s for s, _ in left} == {"cancelled"}
        assert {reason for _, reason in left} == {"the patient asked to cancel"}
        page = client.get(r.headers["location"])
        assert "Recibimos su solicitud de cancelación" in status_region(page.text)
        assert "Pidió cancelarla" in main(page.text)

    def test_reschedule_keeps_the_preferred_times(self, portal: Portal,
                                                  client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        preferred = "Mañanas entre semana,\r\nno los lunes"
        r = client.post(f"{url}/reschedule?lang=en",
                        data={"v": version(client.get(url).text), "preferred": preferred})
        assert r.status_code == 303
        assert r.headers["location"] == f"{url}?done=reschedule&lang=en"
        (request,) = rows(portal, patient_requests)
        assert request.action == "reschedule"
        assert request.detail["preferred"] == "Mañanas entre semana,\nno los lunes"
        assert "You asked for a new time" in main(client.get(r.headers["location"]).text)

    def test_reschedule_text_too_long(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        r = client.post(f"{url}/reschedule", data={"preferred": "x" * 501})
        assert r.status_code == 400
        assert "menos de 500 caracteres" in r.text  # in the page's language
        assert f'href="{url}"' in r.text  # a way back
        assert_secure(r)
        assert count(portal, channel_events) == 0

    def test_appointment_actions_need_an_appointment(self, portal: Portal,
                                                     client: TestClient) -> None:
        touch = portal.refill()
        r = client.post(f"{portal.url(touch.id)}/confirm", data={})
        assert r.status_code == 409
        assert "This page is not about an appointment." in r.text
        assert count(portal, channel_events) == 0

    def test_a_form_body_is_required(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        r = client.post(f"{portal.url(touch.id)}/confirm", json={"v": "1"})
        assert r.status_code == 400
        big = client.post(f"{portal.url(touch.id)}/reschedule",
                          content=b"preferred=" + b"x" * 40_000,
                          headers={"content-type": "application/x-www-form-urlencoded"})
        assert big.status_code == 413 and "demasiado larga" in big.text
        assert count(portal, channel_events) == 0

    def test_get_on_an_action_goes_back_to_the_page(self, portal: Portal,
                                                    client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        r = client.get(f"{url}/confirm")
        assert r.status_code == 303 and r.headers["location"] == url
        assert count(portal, channel_events) == 0


class TestSurvey:
    def test_out_of_range_is_refused(self, portal: Portal, client: TestClient) -> None:
        touch = portal.discharge()
        url = portal.url(touch.id)
        for score in ("11", "-1", "abc", "", "5.5", "٣", "1e1"):
            r = client.post(f"{url}/survey", data={"score": score})
            assert r.status_code == 400, score
            assert "0" in r.text and "10" in r.text
        r = client.post(f"{url}/survey", data={"score": "5", "comment": "x" * 1001})
        assert r.status_code == 400
        assert count(portal, channel_events) == 0
        assert count(portal, patient_requests) == 0

    def test_answer_is_recorded_and_written_back(self, portal: Portal,
                                                 client: TestClient) -> None:
        touch = portal.discharge()
        url = portal.url(touch.id)
        form = {"v": version(client.get(url).text), "score": "9",
                "comment": "Friendly staff."}
        r = client.post(f"{url}/survey", data=form)
        assert r.status_code == 303 and r.headers["location"] == f"{url}?done=survey"
        assert client.post(f"{url}/survey", data=form).status_code == 303  # double submit
        (event,) = rows(portal, channel_events)
        assert event.provider_id.startswith(f"{touch.id}:survey:")
        assert event.result == f"survey entry {touch.entry_id}"
        (request,) = rows(portal, patient_requests)
        assert request.action == "survey" and request.source == "portal"
        assert request.detail == {"score": 9, "comment": "Friendly staff."}
        (outbox,) = rows(portal, ehr_outbox)
        assert (outbox.connection, outbox.resource_type, outbox.event_id) == (
            "ehr", "Communication", event.id)
        assert outbox.key == f"reply-{event.id}"
        texts = [p.get("contentString") for p in outbox.resource.get("payload", [])]
        assert "Survey: 9/10. Friendly staff." in texts
        page = client.get(r.headers["location"])
        assert status_region(page.text) == "Done: Thank you for your answer."

    def test_no_survey_on_an_appointment_page(self, portal: Portal,
                                              client: TestClient) -> None:
        touch = portal.appointment()
        r = client.post(f"{portal.url(touch.id)}/survey", data={"score": "9"})
        assert r.status_code == 409
        assert count(portal, channel_events) == 0


class TestPreferences:
    def test_saved(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        form = {"v": version(client.get(url).text), "channel": "email", "language": "en",
                "opted_out": ["sms"]}
        r = client.post(f"{url}/preferences", data=form)
        assert r.status_code == 303
        assert r.headers["location"] == f"{url}?done=preferences&lang=en"
        (prefs,) = rows(portal, patient_preferences)
        assert (prefs.patient_id, prefs.preferred_channel, prefs.language) == (
            touch.patient_id, "email", "en")
        assert prefs.opted_out == ["sms"]
        (event,) = rows(portal, channel_events)
        assert event.result == f"preferences patient {touch.patient_id}"
        page = client.get(r.headers["location"])
        assert status_region(page.text) == "Done: Your preferences are saved."
        assert 'id="channel-email" name="channel" value="email" checked' in page.text
        assert 'id="opt-out-sms" name="opted_out" value="sms" checked' in page.text
        assert 'id="language-en" name="language" value="en" checked' in page.text

    def test_invalid_choices(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment()
        url = portal.url(touch.id)
        for form in ({"channel": "fax"}, {"language": "fr"}, {"opted_out": "pigeon"},
                     {"channel": "sms", "opted_out": "sms"}):
            r = client.post(f"{url}/preferences", data=form)
            assert r.status_code == 400, form
            assert "Traceback" not in r.text
        assert count(portal, channel_events) == 0
        assert count(portal, patient_preferences) == 0

    def test_patient_link_asks_for_the_date_of_birth(self, portal: Portal,
                                                      client: TestClient) -> None:
        """A ``p`` link opens the patient's own page, which asks for the date of birth first:
        nothing about the patient, and no change without it (tests/portal/test_home.py)."""
        touch = portal.appointment()
        url = portal.url(touch.patient_id, kind="p")
        page = client.get(url)
        assert page.status_code == 200
        assert "Check-up" not in page.text and ">Confirmar</button>" not in page.text
        assert client.post(f"{url}/preferences", data={"channel": "voice"}).status_code == 403
        assert rows(portal, patient_preferences) == []
