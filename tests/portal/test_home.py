"""The patient's own page (a ``p`` link) over HTTP, on SQLite and PostgreSQL: the date-of-birth
gate and its lock, the session cookie and the CSRF token, what the page lists from the
timeline (appointments, refills, care-plan steps, surveys, preferences), its actions, and
choosing a new time from free slots (a stand-in scheduling service on the runtime).

The patients are real: HL7 v2 messages through the processing stage and the outreach
reconciler (tests/portal/support.py); every one of them was born on 1 January 1980."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from integration.models import (
    audit_events,
    channel_events,
    ehr_outbox,
    patient_preferences,
    patient_requests,
    portal_access,
    touches,
    waitlist_entries,
)
from integration.portal.session import COOKIE, token_hash
from tests.outreach.support import ny
from tests.portal.support import (
    BIRTH_DATE,
    SECRET,
    FakeScheduling,
    Portal,
    add_care_plan,
    free_slot,
    self_service_app,
)
from tests.portal.test_page import assert_secure, count, main, rows, status_region


@pytest.fixture
def client(portal: Portal) -> Iterator[TestClient]:
    app = self_service_app(portal.runtime)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        yield c


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, name
    return match.group(1)


def login(client: TestClient, url: str, **dob: str) -> Any:
    answer = client.post(f"{url}/dob", data={**BIRTH_DATE, **dob})
    assert answer.status_code == 303, answer.text
    return answer


def form(page: str, **extra: str) -> dict[str, str]:
    return {"csrf": hidden(page, "csrf"), "v": hidden(page, "v"), **extra}


class TestDateOfBirth:
    def test_right_date_opens_the_page_with_a_session(self, portal: Portal,
                                                      client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")

        gate = client.get(url)
        assert gate.status_code == 200
        assert_secure(gate)
        assert "<h1>Confirm it is you</h1>" in gate.text
        assert "Check-up" not in gate.text and "Jane" not in gate.text
        assert '<label for="dob-month">Month</label>' in gate.text
        assert count(portal, audit_events) == 0

        answer = login(client, url)
        assert answer.headers["location"] == url
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for part in ("HttpOnly", "Path=/p/", "SameSite=strict", "Secure", "Max-Age=1800"):
            assert part.lower() in cookie.lower(), part
        value = client.cookies.get(COOKIE)
        assert value is not None and value.startswith(token_hash(url.rsplit("/", 1)[1]) + "|")

        page = client.get(url)
        assert page.status_code == 200, page.text
        assert "<h1>Your page</h1>" in page.text
        assert "Hello, Jane." in page.text
        assert "Check-up" in page.text
        assert page.headers["set-cookie"].startswith(f"{COOKIE}=")  # renewed (idle timeout)
        (access,) = rows(portal, portal_access)
        assert (access.patient_id, access.failures, access.locked_at) == (
            touch.patient_id, 0, None)
        assert access.verified_at is not None
        (read,) = rows(portal, audit_events)
        assert (read.actor, read.action, read.target_id) == (
            "portal", "portal.read", touch.patient_id)

    def test_three_wrong_dates_lock_the_link(self, portal: Portal,
                                             client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        first = client.post(f"{url}/dob", data={**BIRTH_DATE, "year": "1981"})
        assert first.status_code == 400
        assert status_region(first.text) == (
            "That date of birth does not match our records. Please check it and try again. "
            "Tries left: 2.")
        assert 'value="1981" selected' in first.text  # the answer is kept to correct it
        second = client.post(f"{url}/dob", data={**BIRTH_DATE, "day": "2"})
        assert "Tries left: 1." in second.text
        third = client.post(f"{url}/dob", data={**BIRTH_DATE, "month": "2"})
        assert third.status_code == 403
        assert "<h1>This link is locked</h1>" in third.text
        assert "+1 555 0100" in third.text
        assert COOKIE not in client.cookies

        right = client.post(f"{url}/dob", data=BIRTH_DATE)  # locked stays locked
        assert right.status_code == 403 and "This link is locked" in right.text
        assert client.get(url).status_code == 403
        (access,) = rows(portal, portal_access)
        assert access.failures == 3 and access.locked_at is not None
        assert access.verified_at is None
        assert count(portal, audit_events) == 0

        # Another link for the same patient is counted on its own.
        other = portal.url(touch.patient_id, kind="p",
                           now=datetime.now(UTC) + timedelta(seconds=5))
        login(client, other)
        assert client.get(other).status_code == 200

    def test_incomplete_or_impossible_dates_are_not_counted(self, portal: Portal,
                                                            client: TestClient) -> None:
        touch = portal.appointment(lang="es^Spanish^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        missing = client.post(f"{url}/dob", data={"day": "1", "month": "", "year": "1980"})
        assert missing.status_code == 400
        assert status_region(missing.text) == "Elija el día, el mes y el año."
        impossible = client.post(f"{url}/dob", data={"day": "30", "month": "2",
                                                     "year": "1980"})
        assert "Esa fecha no existe" in impossible.text
        assert count(portal, portal_access) == 0

    def test_session_is_for_its_link_and_expires_when_idle(self, portal: Portal,
                                                           client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        login(client, url)
        assert "<h1>Your page</h1>" in client.get(url).text
        # another link of the same patient: its own date-of-birth check
        other = portal.url(touch.patient_id, kind="p",
                           now=datetime.now(UTC) + timedelta(seconds=5))
        assert "<h1>Confirm it is you</h1>" in client.get(other).text
        # 31 idle minutes later the page asks again
        state = client.app.state.portal  # type: ignore[attr-defined]
        later = datetime.now(UTC) + timedelta(minutes=31)
        state.clock = lambda: later
        assert "<h1>Confirm it is you</h1>" in client.get(url).text

    def test_forged_and_touch_links_are_not_patient_pages(self, portal: Portal,
                                                          client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        forged = portal.url(touch.patient_id, kind="p")[:-3] + "AAA"
        assert client.get(forged).status_code == 404
        assert client.post(f"{forged}/dob", data=BIRTH_DATE).status_code == 404
        unknown = portal.url("0" * 32, kind="p")
        assert client.get(unknown).status_code == 404
        # a touch link still opens the touch page, with a way to the patient's own page
        touch_url = portal.url(touch.id)  # one link, opened twice (a second link may expire
        page = client.get(touch_url)      # a second later, and so would its patient link)
        assert page.status_code == 200 and "<h1>Your appointment</h1>" in page.text
        link = re.search(r'<a href="(/p/p[^"]+)">See everything for you</a>', page.text)
        assert link, page.text
        again = client.get(touch_url)
        assert link.group(1) in again.text  # one p link per touch link: one count of tries
        assert "<h1>Confirm it is you</h1>" in client.get(link.group(1)).text


class TestCsrf:
    def test_post_without_session_or_token_is_refused(self, portal: Portal,
                                                      client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        action = f"{url}/appointments/{touch.entry_id}/confirm"
        no_session = client.post(action, data={"v": "x"})
        assert no_session.status_code == 403
        assert "<h1>Please open the page again</h1>" in no_session.text
        login(client, url)
        page = client.get(url).text
        forged = client.post(action, data={"v": hidden(page, "v")})
        assert forged.status_code == 403
        wrong = client.post(action, data={"v": hidden(page, "v"), "csrf": "x" * 43})
        assert wrong.status_code == 403
        prefs = client.post(f"{url}/preferences", data={"channel": "email"})
        assert prefs.status_code == 403
        assert count(portal, patient_requests) == 0
        assert count(portal, channel_events) == 0
        assert count(portal, patient_preferences) == 0
        assert client.post(action, data=form(page)).status_code == 303


class TestWhatThePageShows:
    def test_appointment_refill_care_plan_and_survey(self, portal: Portal,
                                                     client: TestClient) -> None:
        touch = portal.appointment(mrn="MRN8", lang="en^English^HL70296")
        portal.refill(mrn="MRN8")
        add_care_plan(portal.engine, touch.patient_id)
        survey = portal.discharge(mrn="MRN8")
        with portal.engine.begin() as conn:
            conn.execute(update(touches).where(touches.c.id == survey.id).values(status="sent"))
        url = portal.url(touch.patient_id, kind="p")
        login(client, url)
        page = client.get(url)
        assert page.status_code == 200
        text = main(page.text)
        assert "Your appointments Check-up Date Tuesday, March 12, 2030 Time 2:00 PM" in text
        assert "Where Main Street Clinic Status Booked" in text
        assert "Medication refills Doxycycline 100 mg Your supply runs out around " \
               "March 31, 2030." in text
        assert "Next steps in your care plan Blood pressure check Sunday, March 10, 2030, " \
               "10:00 AM" in text
        survey_link = re.search(r'<a href="(/p/t[^"]+)">Answer a short survey about your '
                                r"visit on March 1, 2030</a>", page.text)
        assert survey_link, text
        assert "<h1>How was your visit?</h1>" in client.get(survey_link.group(1)).text
        # Quiet hours are shown, not set here; no clinical values, no birth date.
        assert "Quiet hours: we do not send messages between 9:00 PM and 8:00 AM." in text
        assert "1980" not in text and "MRN8" not in text
        assert "Your results" not in text  # no results_link configured
        # no "choose a new time" without a scheduling service: ask the clinic instead
        assert "Choose a new time" not in text and "Ask to reschedule" in text

    def test_spanish_and_results_link(self, db_url: str, tmp_path: Any) -> None:
        from integration.runtime import Runtime
        from tests.portal.support import portal_settings

        settings = portal_settings(db_url, tmp_path, organization={
            "name": "Example Clinic", "phone": "+1 555 0100",
            "results_link": "https://mychart.example/results"})
        runtime = Runtime(settings, with_mllp=False)
        try:
            portal = Portal(runtime.settings, runtime, tmp_path)
            touch = portal.appointment()  # Spanish
            url = portal.url(touch.patient_id, kind="p")
            with TestClient(self_service_app(runtime), base_url="https://testserver",
                            follow_redirects=False) as c:
                gate = c.get(url)
                assert '<html lang="es">' in gate.text and "Confirme que es usted" in gate.text
                assert '<label for="dob-day">Día</label>' in gate.text
                assert gate.text.index("dob-day") < gate.text.index("dob-month")
                login(c, url)
                html = c.get(url).text
        finally:
            runtime.engine.dispose()
        text = main(html)
        assert "Sus citas" in text and "martes, 12 de marzo de 2030" in text
        assert "Sus resultados están en el portal de Example Clinic." in text
        assert 'href="https://mychart.example/results"' in html

    def test_the_page_of_a_patient_with_nothing_ahead(self, portal: Portal,
                                                      client: TestClient) -> None:
        survey = portal.discharge()
        url = portal.url(survey.patient_id, kind="p")
        login(client, url)
        text = main(client.get(url).text)
        assert "You have no upcoming appointments with us." in text
        assert "Medication refills" not in text


class TestActions:
    def test_confirm_cancel_reschedule_and_waitlist(self, portal: Portal,
                                                    client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        entry = touch.entry_id
        url = portal.url(touch.patient_id, kind="p")
        login(client, url)
        act = f"{url}/appointments/{entry}"

        page = client.get(url).text
        done = client.post(f"{act}/confirm", data=form(page))
        assert done.status_code == 303 and done.headers["location"] == f"{url}?done=confirm"
        page = client.get(done.headers["location"]).text
        assert status_region(page) == "Done: Thank you. Your appointment is confirmed."
        assert "Status Confirmed" in main(page)
        # the same form twice is stored once
        assert client.post(f"{act}/confirm", data=form(page)).status_code == 303
        assert client.post(f"{act}/confirm", data=form(page)).status_code == 303

        page = client.get(url).text
        joined = client.post(f"{act}/waitlist", data=form(page))
        assert joined.headers["location"] == f"{url}?done=waitlist"
        page = client.get(joined.headers["location"]).text
        assert "You are on the waitlist." in status_region(page)
        assert "Leave the waitlist" in page and "Join the waitlist" not in page
        (wait,) = rows(portal, waitlist_entries)
        assert (wait.patient_id, wait.entry_id, wait.status) == (
            touch.patient_id, entry, "active")

        left = client.post(f"{act}/leave-waitlist", data=form(page))
        assert left.headers["location"] == f"{url}?done=leave-waitlist"
        (wait,) = rows(portal, waitlist_entries)
        assert wait.status == "withdrawn"

        page = client.get(url).text
        asked = client.post(f"{act}/reschedule", data=form(page, preferred="Friday morning"))
        assert asked.headers["location"] == f"{url}?done=reschedule"
        page = client.get(url).text
        cancel = client.post(f"{act}/cancel", data=form(page))
        assert cancel.headers["location"] == f"{url}?done=cancel"
        assert "Status You asked to cancel" in main(client.get(url).text)

        requests = rows(portal, patient_requests)
        assert [(r.entry_id, r.action, r.source) for r in requests] == [
            (entry, "confirm", "portal"), (entry, "confirm", "portal"),
            (entry, "reschedule", "portal"), (entry, "cancel", "portal")]
        assert requests[2].detail["preferred"] == "Friday morning"
        owed = {r.resource_type for r in rows(portal, ehr_outbox)
                if r.key.startswith(f"request-{requests[2].id}-")}
        assert owed == {"Task"}  # the preferred times go to staff
        events = rows(portal, channel_events)
        assert [e.payload["action"] for e in events] == [
            "confirm", "confirm", "waitlist", "leave-waitlist", "reschedule", "cancel"]
        assert all(e.provider_id.startswith(f"p{touch.patient_id}:{entry}:") for e in events)
        with portal.engine.connect() as conn:
            left_touches = set(conn.execute(select(touches.c.status).where(
                touches.c.entry_id == entry)).scalars())
        assert left_touches == {"cancelled"}

    def test_preferences(self, portal: Portal, client: TestClient) -> None:
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        login(client, url)
        page = client.get(url).text
        saved = client.post(f"{url}/preferences", data={
            **form(page), "channel": "email", "language": "es", "opted_out": "sms"})
        assert saved.status_code == 303
        (prefs,) = rows(portal, patient_preferences)
        assert (prefs.preferred_channel, prefs.language, prefs.opted_out) == (
            "email", "es", ["sms"])
        page = client.get(saved.headers["location"]).text
        assert status_region(page) == "Listo: Sus preferencias se guardaron."
        bad = client.post(f"{url}/preferences", data={**form(page), "channel": "fax"})
        assert bad.status_code == 400

    def test_another_patients_appointment_is_not_found(self, portal: Portal,
                                                       client: TestClient) -> None:
        mine = portal.appointment(mrn="MRN1", lang="en^English^HL70296")
        theirs = portal.appointment(mrn="MRN2", filler="F2")
        url = portal.url(mine.patient_id, kind="p")
        login(client, url)
        page = client.get(url).text
        assert theirs.entry_id not in page
        refused = client.post(f"{url}/appointments/{theirs.entry_id}/cancel", data=form(page))
        assert refused.status_code == 404
        assert client.get(f"{url}/appointments/{theirs.entry_id}/slots").status_code == 404
        assert count(portal, patient_requests) == 0
        # an unknown action, and the reload of an action's address
        assert client.post(f"{url}/appointments/{mine.entry_id}/delete",
                           data=form(page)).status_code == 404
        back = client.get(f"{url}/appointments/{mine.entry_id}/confirm")
        assert back.status_code == 303 and back.headers["location"] == url


class TestRebooking:
    SLOTS = (ny(2030, 3, 5, 9, 0), ny(2030, 3, 5, 9, 30), ny(2030, 3, 6, 15, 0),
             ny(2030, 3, 20, 11, 0))

    def scheduling(self, portal: Portal, **kw: Any) -> FakeScheduling:
        slots = [free_slot(s, ref=f"Slot/s{n}") for n, s in enumerate(self.SLOTS)]
        fake = FakeScheduling(portal.engine, slots, **kw)
        portal.runtime.scheduling = fake  # type: ignore[attr-defined]
        return fake

    def test_choose_a_new_time(self, portal: Portal, client: TestClient) -> None:
        fake = self.scheduling(portal)
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        slots_url = f"{url}/appointments/{touch.entry_id}/slots"
        # straight to the slots (the touch page's button): the date of birth first, then there
        gate = client.get(slots_url)
        assert "<h1>Confirm it is you</h1>" in gate.text
        assert hidden(gate.text, "next") == touch.entry_id
        answer = client.post(f"{url}/dob", data={**BIRTH_DATE, "next": touch.entry_id})
        assert answer.headers["location"] == slots_url

        home = client.get(url).text
        assert f'href="{slots_url}"' in home and "Choose a new time" in home
        assert "Ask to reschedule" not in home

        page = client.get(f"{slots_url}?from=2030-03-05")
        assert page.status_code == 200, page.text
        assert_secure(page)
        text = main(page.text)
        assert "Your appointment now What Check-up Date Tuesday, March 12, 2030" in text
        assert "Tuesday, March 5, 2030 9:00 AM to 9:30 AM 9:30 AM to 10:00 AM" in text
        assert "Wednesday, March 6, 2030 3:00 PM to 3:30 PM" in text
        assert "March 20" not in text  # beyond slot_days
        assert "Earlier days" in text and "Later days" in text
        assert '<legend>Tuesday, March 5, 2030</legend>' in page.text
        (_entry, start, days) = fake.searches[-1]  # type: ignore[index]
        assert start == ny(2030, 3, 5, 0, 0) and days == 7
        later = re.search(r'href="([^"]+from=2030-03-12)"', page.text)
        assert later, page.text

        values = re.findall(r'name="slot" value="([^"]+)"', page.text)
        chosen = values[1]
        booked = client.post(slots_url, data={"csrf": hidden(page.text, "csrf"),
                                              "from": "2030-03-05", "slot": chosen})
        assert booked.status_code == 303, booked.text
        assert re.fullmatch(rf"{re.escape(url)}/bookings/\d+", booked.headers["location"])
        assert fake.rebooked == [{"patient_id": touch.patient_id, "entry_id": touch.entry_id,
                                  "slot": "Slot/s1", "source": "portal"}]
        confirmation = client.get(booked.headers["location"])
        assert confirmation.status_code == 200
        assert status_region(confirmation.text).startswith(
            "Done: Your appointment is booked for the new time.")
        text = main(confirmation.text)
        assert "Date Tuesday, March 5, 2030 Time 9:30 AM Where Main Street Clinic" in text

    def test_a_slot_taken_meanwhile_shows_the_next_choices(self, portal: Portal,
                                                           client: TestClient) -> None:
        fake = self.scheduling(portal, outcome="conflict")
        fake.alternatives = [fake.slots[2]]
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        slots_url = f"{url}/appointments/{touch.entry_id}/slots"
        login(client, url)
        page = client.get(f"{slots_url}?from=2030-03-05").text
        first = re.findall(r'name="slot" value="([^"]+)"', page)[0]
        again = client.post(slots_url, data={"csrf": hidden(page, "csrf"), "slot": first,
                                             "from": "2030-03-05"})
        assert again.status_code == 200
        assert status_region(again.text) == (
            "That time was just taken by someone else. Please choose another one.")
        text = main(again.text)
        assert "Wednesday, March 6, 2030 3:00 PM to 3:30 PM" in text
        assert "March 5, 2030 9:00" not in text
        assert "Book this time" in text

    def test_a_failed_booking_and_forged_choices(self, portal: Portal,
                                                 client: TestClient) -> None:
        fake = self.scheduling(portal, outcome="failed")
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        slots_url = f"{url}/appointments/{touch.entry_id}/slots"
        login(client, url)
        page = client.get(f"{slots_url}?from=2030-03-05").text
        csrf = hidden(page, "csrf")
        forged = client.post(slots_url, data={"csrf": csrf, "slot": "Slot/s9|AAAA"})
        assert forged.status_code == 400
        assert status_region(forged.text) == "Please choose one of the times shown."
        assert fake.rebooked == []
        chosen = re.findall(r'name="slot" value="([^"]+)"', page)[0]
        assert client.post(slots_url, data={"slot": chosen}).status_code == 403
        failed = client.post(slots_url, data={"csrf": csrf, "slot": chosen})
        assert failed.status_code == 200
        assert "<h1>We could not book this time</h1>" in failed.text
        assert "+1 555 0100" in failed.text

    def test_booked_without_a_booking_row(self, portal: Portal, client: TestClient) -> None:
        self.scheduling(portal, record_booking=False)
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        slots_url = f"{url}/appointments/{touch.entry_id}/slots"
        login(client, url)
        page = client.get(f"{slots_url}?from=2030-03-05").text
        chosen = re.findall(r'name="slot" value="([^"]+)"', page)[2]
        booked = client.post(slots_url, data={"csrf": hidden(page, "csrf"), "slot": chosen})
        assert booked.status_code == 200
        assert "<h1>Your new time</h1>" in booked.text
        assert "Date Wednesday, March 6, 2030 Time 3:00 PM" in main(booked.text)

    def test_request_mode_has_no_slot_pages(self, portal: Portal, client: TestClient) -> None:
        self.scheduling(portal, mode_value="request")
        touch = portal.appointment(lang="en^English^HL70296")
        url = portal.url(touch.patient_id, kind="p")
        login(client, url)
        assert "Choose a new time" not in client.get(url).text
        refused = client.get(f"{url}/appointments/{touch.entry_id}/slots")
        assert refused.status_code == 409
        assert "New times cannot be chosen online" in refused.text

    def test_touch_page_offers_a_new_time(self, portal: Portal, client: TestClient) -> None:
        self.scheduling(portal)
        touch = portal.appointment(lang="en^English^HL70296")
        page = client.get(portal.url(touch.id)).text
        button = re.search(r'<a class="button secondary" href="(/p/p[^"]+/appointments/'
                           rf'{touch.entry_id}/slots)">Choose a new time</a>', page)
        assert button, page


def test_cli_prints_a_patient_link(portal: Portal, monkeypatch: pytest.MonkeyPatch) -> None:
    from integration.cli import main as cli
    from integration.portal.links import LinkSigner

    touch = portal.appointment()
    settings = portal.settings
    config = portal.tmp / "careloop.toml"
    config.write_text(
        f'database_url = "{settings.database_url}"\n'
        f'base_url = "{settings.base_url}"\n'
        f'keys_dir = "{settings.keys_dir}"\n'
        f'[channels.portal]\nsecret = "{SECRET}"\n')
    monkeypatch.setenv("CARELOOP_CONFIG", str(config))
    monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
    result = CliRunner().invoke(cli, ["portal", "link", touch.patient_id, "--ttl", "P7D"])
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith("https://care.example/p/p")
    link = LinkSigner(SECRET.encode(), settings.base_url, timedelta(days=1)).read(
        url.rsplit("/", 1)[1], now=datetime.now(UTC))
    assert (link.kind, link.ident) == ("p", touch.patient_id)
    assert timedelta(days=6, hours=23) < link.expires_at - datetime.now(UTC) <= timedelta(days=7)
    unknown = CliRunner().invoke(cli, ["portal", "link", "nobody"])
    assert unknown.exit_code == 1 and "no patient nobody" in unknown.output
