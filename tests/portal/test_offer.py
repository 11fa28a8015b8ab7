"""A waitlist offer's page (an ``o`` link) over HTTP, on SQLite and PostgreSQL, with the real
waitlist: what it shows, Accept (the first one wins; the next is told it was taken; booked in
the EHR through a stand-in scheduling service, or asked of the care team), No thanks, and an
offer that expired."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from integration import waitlist
from integration.db import write_lock
from integration.models import (
    audit_events,
    freed_slots,
    patient_requests,
    waitlist_entries,
    waitlist_offers,
)
from tests.outreach.support import ny
from tests.portal.support import FakeScheduling, Portal, free_slot, self_service_app
from tests.portal.test_page import assert_secure, main, rows, status_region

SLOT = ny(2030, 3, 5, 9, 0)


@pytest.fixture
def client(portal: Portal) -> Iterator[TestClient]:
    with TestClient(self_service_app(portal.runtime), base_url="https://testserver",
                    follow_redirects=False) as c:
        yield c


def offers(portal: Portal, touches: list[Any], *, slot_ref: str | None = None,
           expires_in: timedelta = timedelta(hours=2)) -> list[int]:
    """Each touch's patient joins the waitlist for its appointment; a slot is freed on 5 March
    and offered to all of them."""
    now = datetime.now(UTC)
    ids: list[int] = []
    with write_lock(portal.engine), portal.engine.begin() as conn:
        slot_id = conn.execute(insert(freed_slots).values(
            key="test-slot", source="hl7v2", connection=None, slot_ref=slot_ref,
            service="CHECKUP", location="", start=SLOT.astimezone(UTC),
            end=(SLOT + timedelta(minutes=30)).astimezone(UTC), status="offering",
            freed_at=now, updated_at=now).returning(freed_slots.c.id)).scalar_one()
        for touch in touches:
            waitlist_id = waitlist.join(conn, portal.settings, patient_id=touch.patient_id,
                                        entry_id=touch.entry_id, now=now)
            ids.append(int(conn.execute(insert(waitlist_offers).values(
                slot_id=slot_id, waitlist_id=waitlist_id, patient_id=touch.patient_id,
                channel="sms", status="offered", offered_at=now,
                expires_at=now + expires_in).returning(waitlist_offers.c.id)).scalar_one()))
    return ids


def offer_status(portal: Portal, offer_id: int) -> str:
    with portal.engine.connect() as conn:
        return str(conn.execute(select(waitlist_offers.c.status).where(
            waitlist_offers.c.id == offer_id)).scalar_one())


def test_the_offer_and_the_first_acceptance_wins(portal: Portal, client: TestClient) -> None:
    first = portal.appointment(mrn="MRN1", lang="en^English^HL70296")
    second = portal.appointment(mrn="MRN2", filler="F2")  # Spanish
    mine, theirs = offers(portal, [first, second])
    url = portal.url(mine, kind="o")

    page = client.get(url)
    assert page.status_code == 200
    assert_secure(page)
    text = main(page.text)
    assert "<h1>An earlier time is free</h1>" in page.text
    assert "What Check-up Date Tuesday, March 5, 2030 Time 9:00 AM to 9:30 AM" in text
    assert "Where Main Street Clinic" in text
    assert "Yes, I want this time" in text and "No thanks" in text
    assert "1980" not in text
    (read,) = rows(portal, audit_events)
    assert (read.action, read.target_id, read.detail["link"]) == (
        "portal.read", first.patient_id, "o")

    accepted = client.post(f"{url}/accept")
    assert accepted.status_code == 303 and accepted.headers["location"] == f"{url}?done=requested"
    after = client.get(accepted.headers["location"]).text
    assert status_region(after) == (
        "Thank you. We asked the care team to move your appointment to this time. They will "
        "confirm it with you.")
    assert "Yes, I want this time" not in after
    assert offer_status(portal, mine) == "accepted"
    (request,) = rows(portal, patient_requests)
    assert (request.entry_id, request.action, request.source) == (
        first.entry_id, "reschedule", "waitlist")

    # the other patient comes second: taken, in Spanish
    other = portal.url(theirs, kind="o")
    assert "Lo sentimos, otra persona tomó este horario antes." in client.get(other).text
    late = client.post(f"{other}/accept")
    assert late.headers["location"] == f"{other}?done=taken"
    told = client.get(late.headers["location"]).text
    assert '<html lang="es">' in told
    assert "Conserva su cita y sigue en la lista de espera." in status_region(told)
    assert offer_status(portal, theirs) == "taken"


def test_accepting_books_the_slot(portal: Portal, client: TestClient) -> None:
    touch = portal.appointment(lang="en^English^HL70296")
    fake = FakeScheduling(portal.engine, [free_slot(SLOT, ref="Slot/s1")])
    portal.runtime.scheduling = fake  # type: ignore[attr-defined]
    (offer_id,) = offers(portal, [touch], slot_ref="Slot/s1")
    url = portal.url(offer_id, kind="o")
    answer = client.post(f"{url}/accept")
    assert answer.headers["location"] == f"{url}?done=booked"
    assert fake.rebooked == [{"patient_id": touch.patient_id, "entry_id": touch.entry_id,
                              "slot": "Slot/s1", "source": "waitlist"}]
    page = client.get(answer.headers["location"]).text
    assert status_region(page).startswith("It's yours.")
    (entry,) = rows(portal, waitlist_entries)
    assert entry.status == "booked"


def test_no_thanks(portal: Portal, client: TestClient) -> None:
    touch = portal.appointment(lang="en^English^HL70296")
    (offer_id,) = offers(portal, [touch])
    url = portal.url(offer_id, kind="o")
    answer = client.post(f"{url}/decline")
    assert answer.headers["location"] == f"{url}?done=declined"
    page = client.get(answer.headers["location"]).text
    assert status_region(page) == (
        "You said no thanks to this time. You keep your appointment and stay on the waitlist.")
    assert "Yes, I want this time" not in page
    assert offer_status(portal, offer_id) == "declined"
    assert client.get(f"{url}/accept").headers["location"] == url  # a reload: back to the page


def test_an_expired_offer(portal: Portal, client: TestClient) -> None:
    touch = portal.appointment(lang="en^English^HL70296")
    (offer_id,) = offers(portal, [touch], expires_in=timedelta(minutes=-1))
    url = portal.url(offer_id, kind="o")
    page = client.get(url).text
    assert "This offer has expired." in main(page)
    assert "Yes, I want this time" not in page
    answer = client.post(f"{url}/accept")
    assert answer.headers["location"] == f"{url}?done=expired"
    assert offer_status(portal, offer_id) == "expired"


def test_unknown_and_forged_offers(portal: Portal, client: TestClient) -> None:
    touch = portal.appointment(lang="en^English^HL70296")
    (offer_id,) = offers(portal, [touch])
    assert client.get(portal.url(999999, kind="o")).status_code == 404
    forged = portal.url(offer_id, kind="o")[:-3] + "AAA"
    assert client.get(forged).status_code == 404
    assert client.post(f"{forged}/accept").status_code == 404
    assert client.post(f"{portal.url(offer_id, kind='o')}/delete").status_code == 404
    assert offer_status(portal, offer_id) == "offered"
