"""Offer rounds, acceptances and what patients are told: real SIU bookings and cancellations
through the pipeline, file channels, the outbox owed to the EHR."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from integration.db import write_lock
from integration.delivery import link_signer
from integration.models import ehr_outbox
from integration.replies.effects import set_preferences
from integration.settings import Settings
from integration.waitlist import (
    accept,
    consume_cancellations,
    decline,
    offer_round,
    offer_view,
    slot_freed,
)
from tests.outreach.support import ny, utc
from tests.waitlist.support import (
    T0,
    FakeScheduling,
    apply_fhir,
    book,
    cancel,
    channels,
    fhir_appointment,
    fhir_patient,
    join_waitlist,
    make_settings,
    offers,
    patient_of,
    requests,
    sent,
    slots,
    waitlist,
)

EARLY = ny(2026, 3, 5, 10, 0)
"""Patient D's appointment, cancelled: the freed slot."""
CANCELLED_AT = T0 + timedelta(minutes=5)
ROUND_AT = T0 + timedelta(minutes=10)


def _accept(engine: Engine, settings: Settings, tmp_path: Path, offer_id: int,  # noqa: PLR0917
            scheduling: Any = None, now: datetime = ROUND_AT) -> Any:
    return asyncio.run(accept(engine, settings, channels(tmp_path), scheduling,
                              offer_id=offer_id, now=now))


def _waitlisted(engine: Engine, settings: Settings) -> dict[str, str]:
    """A (Spanish), B and C hold later check-ups and wait for an earlier one, in that order;
    D holds the early one. Returns the entry id of each."""
    out = {
        "A": book(engine, filler="FA", mrn="MRNA", start=ny(2026, 3, 20, 10, 0),
                  lang="es^Spanish^HL70296", phone="5550101"),
        "B": book(engine, filler="FB", mrn="MRNB", start=ny(2026, 3, 18, 9, 0),
                  phone="5550102"),
        "C": book(engine, filler="FC", mrn="MRNC", start=ny(2026, 3, 25, 11, 0),
                  phone="5550103"),
        "D": book(engine, filler="FD", mrn="MRND", start=EARLY, phone="5550104"),
    }
    for n, name in enumerate("ABC"):
        join_waitlist(engine, settings, out[name], T0 + timedelta(minutes=n))
    return out


def _cancel_d(engine: Engine, settings: Settings) -> None:
    cancel(engine, filler="FD", mrn="MRND", start=EARLY, at=CANCELLED_AT, phone="5550104")
    assert consume_cancellations(engine, settings, now=CANCELLED_AT) == 1


def _offer_of(engine: Engine, entries: dict[str, str], name: str) -> Any:
    pid = patient_of(engine, entries[name])
    (row,) = [o for o in offers(engine) if o.patient_id == pid]
    return row


class TestCancellationToFill:
    def test_s15_offer_accept_requested(self, engine: Engine, db_url: str,
                                        tmp_path: Path) -> None:
        """S15 frees D's slot; A, B and C are offered it (each in their language, with an
        "o" link); A accepts first: for an HL7 v2 slot that is a reschedule request for staff;
        B and C are told it was taken."""
        settings = make_settings(db_url, tmp_path)
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)

        result = offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        assert (result.offered, result.expired, result.skipped) == (3, 0, 0)
        (slot,) = slots(engine)
        assert slot.status == "offering"
        made = offers(engine)
        assert [o.patient_id for o in made] == [patient_of(engine, entries[n]) for n in "ABC"]
        assert {o.status for o in made} == {"offered"}
        assert {utc(o.expires_at) for o in made} == {ROUND_AT + timedelta(hours=2)}

        messages = sent(tmp_path, "offer:")
        assert [m["key"] for m in messages] == [f"offer:{o.id}" for o in made]
        to_a = messages[0]
        assert to_a["channel"] == "sms" and to_a["address"] == "+1 (555) 5550101"
        assert to_a["language"] == "es"
        assert "Hay una cita de Check-up antes, el jueves, 5 de marzo de 2026" in to_a["body"]
        assert "Main Street Clinic" in to_a["body"]
        link = to_a["body"].split("Acéptela aquí: ")[1].split()[0]
        assert link.startswith("https://careloop.example/p/o")
        token = link.rsplit("/", 1)[1]
        read = link_signer(settings).read(token, now=ROUND_AT)
        assert (read.kind, read.ident) == ("o", str(made[0].id))
        assert "The first to accept gets it." in messages[1]["body"]
        assert "Thursday, March 5, 2026" in messages[1]["body"]

        outcome = _accept(engine, settings, tmp_path, made[0].id)
        assert outcome.status == "requested"
        assert outcome.slot_start == EARLY
        assert "Pedimos al equipo" in outcome.message

        (slot,) = slots(engine)
        assert slot.status == "filled" and slot.filled_by == made[0].id
        assert utc(slot.filled_at) == ROUND_AT
        assert [o.status for o in offers(engine)] == ["accepted", "taken", "taken"]
        assert [w.status for w in waitlist(engine)] == ["booked", "active", "active"]
        (request,) = requests(engine)
        assert (request.entry_id, request.action, request.source) == (
            entries["A"], "reschedule", "waitlist")
        assert request.detail["preferred"].startswith("2026-03-05T10:00:00-05:00")

        taken = sent(tmp_path, "offer-taken:")
        assert [m["key"] for m in taken] == [f"offer-taken:{o.id}" for o in made[1:]]
        assert all("has been taken" in m["body"] for m in taken)

        late = _accept(engine, settings, tmp_path, made[1].id)
        assert late.status == "taken"
        assert "someone else" in late.message
        again = _accept(engine, settings, tmp_path, made[0].id)
        assert again.status == "requested"
        assert len(requests(engine)) == 1

        with engine.connect() as conn:
            keys = [r.key for r in conn.execute(select(ehr_outbox).order_by(ehr_outbox.c.id))]
        assert [k for k in keys if k.startswith("offer")] == [
            *(f"offer-{o.id}" for o in made), *(f"offer-taken-{o.id}" for o in made[1:])]
        assert f"request-{request.id}-reschedule" in keys

    def test_writeback_of_an_offer(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        with engine.connect() as conn:
            row = conn.execute(select(ehr_outbox).where(ehr_outbox.c.key == "offer-1")).one()
        res = row.resource
        assert (row.connection, row.resource_type, res["status"]) == (
            "ehr1", "Communication", "completed")
        assert res["subject"]["identifier"]["value"] == "MRNA"
        assert res["medium"][0]["coding"][0]["code"] == "SMSWRIT"
        assert "/p/o1." in res["payload"][0]["contentString"]

    def test_no_writeback_target(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path, connections=[])
        _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        assert offer_round(engine, settings, channels(tmp_path), now=ROUND_AT).offered == 3
        with engine.connect() as conn:
            assert conn.execute(select(ehr_outbox)).all() == []


class TestBooking:
    def _fhir(self, engine: Engine, db_url: str, tmp_path: Path, **connection: Any) -> Settings:
        """FHIR patients p1 (waiting, appointment on the 20th) and p2 (slot s1 on the 5th,
        cancelled)."""
        settings = make_settings(db_url, tmp_path, connections=[{
            "name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
            "mode": "classic", "scheduling": "slots", **connection}])
        apply_fhir(engine, [fhir_patient("p1", "M1", language="es"),
                            fhir_patient("p2", "M2", phone="+15555550198"),
                            fhir_appointment("a1", "p1", start=ny(2026, 3, 20, 10, 0),
                                             slot="Slot/s20"),
                            fhir_appointment("a2", "p2", start=EARLY, slot="Slot/s1")])
        entry = self._entry(engine, "a1")
        join_waitlist(engine, settings, entry)
        apply_fhir(engine, [fhir_appointment("a2", "p2", start=EARLY, status="cancelled",
                                             version="2", updated=CANCELLED_AT)], CANCELLED_AT)
        assert consume_cancellations(engine, settings, now=CANCELLED_AT) == 1
        assert offer_round(engine, settings, channels(tmp_path), now=ROUND_AT).offered == 1
        return settings

    @staticmethod
    def _entry(engine: Engine, aid: str) -> str:
        from tests.waitlist.support import appointment
        return appointment(engine, aid)

    def test_slot_is_booked(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        """A FHIR Slot and a connection that lets careloop book: the scheduling service books
        it for the waiting patient's appointment."""
        settings = self._fhir(engine, db_url, tmp_path)
        scheduling = FakeScheduling()
        (offer,) = offers(engine)
        outcome = _accept(engine, settings, tmp_path, offer.id, scheduling)
        assert outcome.status == "booked"
        assert outcome.message.startswith("Su cita está reservada para el jueves")
        (call,) = scheduling.calls
        assert call == {"patient_id": offer.patient_id, "entry_id": self._entry(engine, "a1"),
                        "slot": "Slot/s1", "source": "waitlist", "now": ROUND_AT}
        (slot,) = slots(engine)
        assert (slot.status, slot.filled_by) == ("filled", offer.id)
        assert [w.status for w in waitlist(engine)] == ["booked"]
        assert requests(engine) == []
        assert _accept(engine, settings, tmp_path, offer.id, scheduling).status == "booked"
        assert len(scheduling.calls) == 1

    def test_ehr_refuses(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        """The EHR says the slot is gone: the patient is told "taken" and waits on; the slot
        is withdrawn and counts as filled by no one."""
        settings = self._fhir(engine, db_url, tmp_path)
        scheduling = FakeScheduling(status="conflict")
        (offer,) = offers(engine)
        outcome = _accept(engine, settings, tmp_path, offer.id, scheduling)
        assert outcome.status == "taken"
        (slot,) = slots(engine)
        assert (slot.status, slot.filled_by, slot.filled_at) == ("withdrawn", None, None)
        assert [o.status for o in offers(engine)] == ["taken"]
        assert [w.status for w in waitlist(engine)] == ["active"]
        assert offer_round(engine, settings, channels(tmp_path),
                           now=ROUND_AT + timedelta(minutes=1)).offered == 0

    def test_scheduling_error_is_a_refusal(self, engine: Engine, db_url: str,
                                           tmp_path: Path) -> None:
        settings = self._fhir(engine, db_url, tmp_path)

        class Broken:
            async def rebook(self, **_: Any) -> Any:
                raise RuntimeError("EHR down")

        (offer,) = offers(engine)
        assert _accept(engine, settings, tmp_path, offer.id, Broken()).status == "taken"
        assert [w.status for w in waitlist(engine)] == ["active"]

    def test_request_connection_asks_staff(self, engine: Engine, db_url: str,
                                           tmp_path: Path) -> None:
        """``scheduling = "request"``: careloop does not book; staff get the request."""
        settings = self._fhir(engine, db_url, tmp_path, scheduling="request")
        scheduling = FakeScheduling()
        (offer,) = offers(engine)
        assert _accept(engine, settings, tmp_path, offer.id, scheduling).status == "requested"
        assert scheduling.calls == []
        assert [r.action for r in requests(engine)] == ["reschedule"]


class TestExpiry:
    def test_offers_expire_and_the_next_wave_is_asked(self, engine: Engine, db_url: str,
                                                      tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path, waitlist={"wave": 1, "offer_ttl": "PT1H"})
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        first = offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        assert first.offered == 1
        a = _offer_of(engine, entries, "A")
        quiet = offer_round(engine, settings, channels(tmp_path),
                            now=ROUND_AT + timedelta(minutes=30))
        assert (quiet.offered, quiet.expired) == (0, 0)
        later = ROUND_AT + timedelta(hours=1, minutes=1)
        second = offer_round(engine, settings, channels(tmp_path), now=later)
        assert (second.offered, second.expired) == (1, 1)
        assert _offer_of(engine, entries, "A").status == "expired"
        assert _offer_of(engine, entries, "B").status == "offered"
        outcome = _accept(engine, settings, tmp_path, a.id, now=later)
        assert outcome.status == "expired"
        assert "caducado" in outcome.message
        assert _offer_of(engine, entries, "A").status == "expired"

    def test_accept_after_expiry_before_the_round(self, engine: Engine, db_url: str,
                                                  tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path, waitlist={"wave": 1})
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        a = _offer_of(engine, entries, "A")
        outcome = _accept(engine, settings, tmp_path, a.id, now=ROUND_AT + timedelta(hours=3))
        assert outcome.status == "expired"
        assert slots(engine)[0].status == "offering"

    def test_slot_too_close_expires(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        result = offer_round(engine, settings, channels(tmp_path),
                             now=EARLY - timedelta(hours=1))
        assert result.expired == 3
        assert slots(engine)[0].status == "expired"
        assert {o.status for o in offers(engine)} == {"expired"}

    def test_decline_lets_the_next_patient_in(self, engine: Engine, db_url: str,
                                              tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path, waitlist={"wave": 1})
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        a = _offer_of(engine, entries, "A")
        assert decline(engine, offer_id=a.id, now=ROUND_AT) is True
        assert decline(engine, offer_id=a.id, now=ROUND_AT) is False
        assert offer_round(engine, settings, channels(tmp_path), now=ROUND_AT).offered == 1
        assert _offer_of(engine, entries, "B").status == "offered"
        assert [w.status for w in waitlist(engine)] == ["active", "active", "active"]

    def test_unknown_offer(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        outcome = _accept(engine, settings, tmp_path, 999)
        assert (outcome.status, outcome.slot_start) == ("invalid", None)
        assert decline(engine, offer_id=999, now=T0) is False


class TestWhoIsAsked:
    def test_opted_out_patients_are_skipped(self, engine: Engine, db_url: str,
                                            tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        entries = _waitlisted(engine, settings)
        with write_lock(engine), engine.begin() as conn:
            set_preferences(conn, patient_of(engine, entries["A"]),
                            opted_out=["sms", "email", "voice"], now=T0)
        _cancel_d(engine, settings)
        result = offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        assert (result.offered, result.skipped) == (2, 1)
        assert [o.patient_id for o in offers(engine)] == [
            patient_of(engine, entries[n]) for n in "BC"]

    def test_opted_out_of_sms_gets_email(self, engine: Engine, db_url: str,
                                         tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        entries = {"A": book(engine, filler="FA", mrn="MRNA", start=ny(2026, 3, 20, 10, 0),
                             email="a@example.org"),
                   "D": book(engine, filler="FD", mrn="MRND", start=EARLY, phone="5550104")}
        join_waitlist(engine, settings, entries["A"])
        with write_lock(engine), engine.begin() as conn:
            set_preferences(conn, patient_of(engine, entries["A"]), opted_out=["sms"], now=T0)
        _cancel_d(engine, settings)
        assert offer_round(engine, settings, channels(tmp_path), now=ROUND_AT).offered == 1
        assert offers(engine)[0].channel == "email"
        (message,) = sent(tmp_path, "offer:")
        assert (message["channel"], message["address"]) == ("email", "a@example.org")
        assert message["subject"] == "An earlier appointment is available"

    def test_quiet_hours_wait_for_the_morning(self, engine: Engine, db_url: str,
                                              tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        night = ny(2026, 3, 1, 22, 30)
        result = offer_round(engine, settings, channels(tmp_path), now=night)
        assert (result.offered, result.skipped) == (0, 3)
        assert slots(engine)[0].status == "open" and offers(engine) == []
        morning = ny(2026, 3, 2, 8, 5)
        assert offer_round(engine, settings, channels(tmp_path), now=morning).offered == 3

    def test_a_patient_is_offered_a_slot_once(self, engine: Engine, db_url: str,
                                              tmp_path: Path) -> None:
        """After everyone fitting was asked and the offers expired, nobody is asked again."""
        settings = make_settings(db_url, tmp_path)
        _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        again = offer_round(engine, settings, channels(tmp_path),
                            now=ROUND_AT + timedelta(hours=3))
        assert (again.offered, again.expired) == (0, 3)
        assert slots(engine)[0].status == "open"
        assert len(offers(engine)) == 3

    def test_withdrawn_entry_releases_its_offer(self, engine: Engine, db_url: str,
                                                tmp_path: Path) -> None:
        from integration.waitlist import withdraw

        settings = make_settings(db_url, tmp_path, waitlist={"wave": 1})
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        a = _offer_of(engine, entries, "A")
        with write_lock(engine), engine.begin() as conn:
            assert withdraw(conn, waitlist_id=a.waitlist_id, now=ROUND_AT)
        assert _offer_of(engine, entries, "A").status == "declined"
        assert _accept(engine, settings, tmp_path, a.id).status == "invalid"
        assert offer_round(engine, settings, channels(tmp_path), now=ROUND_AT).offered == 1


    def test_no_taken_message_at_night(self, engine: Engine, db_url: str,
                                       tmp_path: Path) -> None:
        """A acceptance late in the evening: the others' offers are taken, but nobody is
        texted in their quiet hours."""
        settings = make_settings(db_url, tmp_path, waitlist={"offer_ttl": "PT12H"})
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        a = _offer_of(engine, entries, "A")
        night = ny(2026, 3, 1, 21, 5)
        assert _accept(engine, settings, tmp_path, a.id, now=night).status == "requested"
        assert [o.status for o in offers(engine)] == ["accepted", "taken", "taken"]
        assert sent(tmp_path, "offer-taken:") == []

    def test_changed_mind_after_declining(self, engine: Engine, db_url: str,
                                          tmp_path: Path) -> None:
        """A declined offer still open may be accepted while nobody else took the slot."""
        settings = make_settings(db_url, tmp_path, waitlist={"wave": 1})
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        a = _offer_of(engine, entries, "A")
        decline(engine, offer_id=a.id, now=ROUND_AT)
        assert _accept(engine, settings, tmp_path, a.id).status == "requested"


class TestOfferView:
    def test_view(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        entries = _waitlisted(engine, settings)
        _cancel_d(engine, settings)
        offer_round(engine, settings, channels(tmp_path), now=ROUND_AT)
        a = _offer_of(engine, entries, "A")
        with engine.connect() as conn:
            view = offer_view(conn, a.id)
            assert offer_view(conn, 999) is None
        assert view is not None
        assert view["status"] == "offered" and view["slot_status"] == "offering"
        assert (view["start"], view["end"]) == (EARLY, EARLY + timedelta(minutes=30))
        assert view["expires_at"] == ROUND_AT + timedelta(hours=2)
        assert (view["service"], view["location"]) == ("Check-up", "Main Street Clinic")
        assert view["service_code"] == "CHECKUP"
        assert view["patient_id"] == patient_of(engine, entries["A"])
        assert view["entry_id"] == entries["A"]
        assert view["language"] == "es" and view["timezone"] is None


def test_slot_freed_by_rebooking_is_offered(engine: Engine, db_url: str,
                                            tmp_path: Path) -> None:
    """A rebooking records the slot it freed itself; the round offers it like any other."""
    settings = make_settings(db_url, tmp_path)
    entries = _waitlisted(engine, settings)
    location = waitlist(engine)[0].location
    with write_lock(engine), engine.begin() as conn:
        assert slot_freed(conn, key="entry:x:1", source="rebooking", connection=None,
                          slot_ref=None, service="CHECKUP", location=location, start=EARLY,
                          end=None, now=ROUND_AT) is not None
    assert offer_round(engine, settings, channels(tmp_path), now=ROUND_AT).offered == 3
    assert len(entries) == 4
