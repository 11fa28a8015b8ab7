"""Processing replies and receipts end to end: a booking through the real HL7 pipeline, its
reminder sent by the outreach stage, then the patient's answer stored as the webhook would and
processed (real PostgreSQL and SQLite)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, select, update

from adapters.channels import ChannelError, OutgoingMessage, Receipt
from integration.db import write_lock
from integration.logs import ALLOWED_KEYS
from integration.models import (
    address_optouts,
    ehr_outbox,
    outreach_cursors,
    timeline_changes,
    touches,
)
from integration.replies import effects as effects_module
from integration.replies import processor as processor_module
from integration.replies.effects import CONFIRMED_TAG
from integration.replies.processor import MAX_ATTEMPTS, pending_count, process_events
from integration.settings import Settings
from tests.outreach.support import (
    all_touches,
    entry_id,
    ny,
    outbox_files,
    receive,
    siu,
    touch,
    utc,
)
from tests.replies.support import (
    FIRST_DUE,
    PATIENT_NUMBER,
    REPLY_AT,
    answer_channels,
    answers,
    book,
    event,
    make_settings,
    requests,
    sms_reply,
    store,
)
from tests.replies.support import (
    entry as entry_row,
)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


def run(engine: Engine, settings: Settings, tmp_path: Path, now: Any = REPLY_AT) -> Any:
    return process_events(engine, settings, answer_channels(tmp_path), now=now)


def outbox(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(ehr_outbox).order_by(ehr_outbox.c.id)))


class TestOptOut:
    def test_stop_opts_the_number_out_and_confirms_once(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        """STOP: the number leaves SMS, the scheduled SMS reminder is cancelled, and the
        confirmation is sent once even when STOP comes twice."""
        book(engine, tmp_path)
        first = sms_reply(engine, "STOP", "SM1")
        assert run(engine, settings, tmp_path).processed == 1
        with engine.connect() as conn:
            (optout,) = conn.execute(select(address_optouts)).all()
        assert (optout.channel, optout.address, optout.event_id) == ("sms", PATIENT_NUMBER,
                                                                     first)
        later = touch(engine, "appointment-reminder|1|")
        assert (later.status, later.reason) == ("cancelled", "opted out by reply")
        (answer,) = answers(tmp_path)
        assert answer["key"] == f"reply:{first}" and answer["address"] == PATIENT_NUMBER
        assert answer["language"] == "es"  # STOP is English, but the reminder was Spanish
        assert "Se ha dado de baja" in answer["body"] and "Example Clinic" in answer["body"]
        assert event(engine, first).result == "opt-out"
        second = sms_reply(engine, "stop.", "SM2")
        run(engine, settings, tmp_path)
        assert event(engine, second).result == "opt-out (again)"
        assert len(answers(tmp_path)) == 1

    def test_the_planner_then_skips_sms_but_may_use_email(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        """After STOP a later appointment's reminders avoid SMS: the "preferred" step falls
        back to email, the SMS-only step is skipped as opted out."""
        s = book(engine, tmp_path)
        receive(engine, siu("S12", "C9", filler="F9", start=ny(2026, 3, 20, 10),
                            sent=FIRST_DUE), FIRST_DUE)
        s.reconcile(FIRST_DUE)
        other = entry_id_for(engine, "F9")
        before = {t.step: t for t in all_touches(engine) if t.entry_id == other}
        assert before[0].channel == "sms" and before[0].status == "scheduled"
        sms_reply(engine, "Stop", "SM1")
        run(engine, settings, tmp_path)
        s.reconcile(REPLY_AT)
        after = {t.step: t for t in all_touches(engine) if t.entry_id == other}
        assert (after[0].status, after[0].channel) == ("scheduled", "email")
        assert after[1].status == "cancelled" and after[1].reason == "opted out of sms"
        assert s.send_due(ny(2026, 3, 17, 10, 0)).sent == 1
        (mail,) = outbox_files(tmp_path / "outbox" / "email")
        assert mail["key"] == after[0].key and mail["address"] == "jane@example.org"
        assert s.send_due(ny(2026, 3, 20, 8, 0)).sent == 0

    def test_start_opts_back_in(self, engine: Engine, settings: Settings,
                                tmp_path: Path) -> None:
        """START after STOP: the opt-out is gone and the cancelled reminder comes back."""
        s = book(engine, tmp_path)
        sms_reply(engine, "STOP", "SM1")
        run(engine, settings, tmp_path)
        start = sms_reply(engine, "Start", "SM2", now=REPLY_AT)
        run(engine, settings, tmp_path)
        with engine.connect() as conn:
            assert conn.execute(select(address_optouts)).all() == []
        assert event(engine, start).result == "opt-in"
        assert "Se ha vuelto a suscribir" in answers(tmp_path)[-1]["body"]
        s.reconcile(REPLY_AT)
        assert touch(engine, "appointment-reminder|1|").status == "scheduled"

    def test_yes_from_an_opted_out_number_opts_in(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        book(engine, tmp_path)
        sms_reply(engine, "STOP", "SM1")
        run(engine, settings, tmp_path)
        yes = sms_reply(engine, "Yes", "SM2")
        run(engine, settings, tmp_path)
        assert event(engine, yes).result == "opt-in"
        assert requests(engine) == []


class TestHelp:
    def test_help_answers_with_the_organisations_contact(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        book(engine, tmp_path, lang="en^English^HL70296")
        sms_reply(engine, "HELP", "SM1")
        run(engine, settings, tmp_path)
        (answer,) = answers(tmp_path)
        assert answer["body"] == ("Example Clinic: appointment and care reminders. Reply STOP "
                                  "to opt out. Help: +1 555 0100. Msg & data rates may apply.")

    def test_ayuda_answers_in_spanish(self, engine: Engine, settings: Settings,
                                      tmp_path: Path) -> None:
        book(engine, tmp_path, lang="en^English^HL70296")
        sms_reply(engine, "ayuda", "SM1")
        run(engine, settings, tmp_path)
        assert answers(tmp_path)[0]["body"].startswith("Example Clinic: recordatorios")


class TestConfirm:
    def test_c_confirms_the_appointment(self, engine: Engine, settings: Settings,
                                        tmp_path: Path) -> None:
        """C: a confirm request for the matched entry, the patient participant accepted (and
        tagged) on the timeline with an ``updated`` change, the EHR write owed, and the reply
        itself owed as a Communication."""
        book(engine, tmp_path)
        eid = entry_id(engine, "Appointment")
        ordinal = entry_row(engine, eid).ordinal
        event_id = sms_reply(engine, "c", "SM1")
        run(engine, settings, tmp_path)
        (req,) = requests(engine)
        assert (req.entry_id, req.action, req.source, req.event_id) == (eid, "confirm", "sms",
                                                                        event_id)
        assert req.touch_key.startswith("appointment-reminder|0|")
        stored = entry_row(engine, eid)
        assert stored.ordinal == ordinal
        patient = [p for p in stored.resource["participant"]
                   if p["actor"].get("reference", "").startswith("Patient/")]
        assert patient and patient[0]["status"] == "accepted"
        assert CONFIRMED_TAG in stored.resource["meta"]["tag"]
        with engine.connect() as conn:
            last = conn.execute(select(timeline_changes).order_by(
                timeline_changes.c.id.desc()).limit(1)).one()
        assert (last.entry_id, last.change) == (eid, "updated")
        keys = {r.key: r for r in outbox(engine)}
        assert keys[f"request-{req.id}-confirm"].resource_type == "AppointmentResponse"
        reply = keys[f"reply-{event_id}"]
        assert reply.resource_type == "Communication" and reply.event_id == event_id
        assert event(engine, event_id).result == f"confirm entry {eid}"
        (answer,) = answers(tmp_path)
        assert answer["body"] == "Example Clinic: Gracias, su cita está confirmada."

    def test_reprocessing_records_nothing_twice(self, engine: Engine, settings: Settings,
                                                tmp_path: Path) -> None:
        """An event processed again (a replay) finds its request recorded: nothing doubles."""
        book(engine, tmp_path)
        event_id = sms_reply(engine, "C", "SM1")
        run(engine, settings, tmp_path)
        with write_lock(engine), engine.begin() as conn:
            from integration.models import channel_events

            conn.execute(update(channel_events).values(status="pending"))
        run(engine, settings, tmp_path)
        assert len(requests(engine)) == 1
        assert event(engine, event_id).result.endswith("(again)")
        assert len(answers(tmp_path)) == 1  # the answer key was used already


class TestCancelAndReschedule:
    def test_x_cancels_the_reminders_for_good(self, engine: Engine, settings: Settings,
                                              tmp_path: Path) -> None:
        """X: the entry's scheduled reminders are cancelled and the reconciler never plans
        them again, even replaying every change."""
        s = book(engine, tmp_path)
        eid = entry_id(engine, "Appointment")
        sms_reply(engine, "X", "SM1")
        run(engine, settings, tmp_path)
        (req,) = requests(engine)
        assert req.action == "cancel"
        later = touch(engine, "appointment-reminder|1|")
        assert (later.status, later.reason) == ("cancelled", "the patient asked to cancel")
        with write_lock(engine), engine.begin() as conn:
            conn.execute(update(outreach_cursors).values(last_id=0))
        s.reconcile(REPLY_AT)
        later = touch(engine, "appointment-reminder|1|")
        assert (later.status, later.reason) == ("cancelled", "the patient asked to cancel")
        assert s.send_due(ny(2026, 3, 10, 12, 0)).sent == 0
        keys = {r.key: r for r in outbox(engine)}
        assert keys[f"request-{req.id}-cancel"].resource_type == "Task"
        assert "cancelar" in answers(tmp_path)[0]["body"]
        assert eid in event(engine, req.event_id).result

    def test_confirm_after_cancel_lifts_the_hold(self, engine: Engine, settings: Settings,
                                                 tmp_path: Path) -> None:
        """X then C: the patient changed their mind; the latest request decides."""
        s = book(engine, tmp_path)
        sms_reply(engine, "X", "SM1")
        run(engine, settings, tmp_path)
        sms_reply(engine, "C", "SM2")
        run(engine, settings, tmp_path)
        s.reconcile(REPLY_AT)
        assert touch(engine, "appointment-reminder|1|").status == "scheduled"

    def test_r_holds_until_the_clinic_moves_the_appointment(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        """R: reminders stop and the answer links to the patient page; once the clinic moves
        the appointment (S13) the reminders for the new time are planned again."""
        s = book(engine, tmp_path)
        sms_reply(engine, "R", "SM1")
        run(engine, settings, tmp_path)
        (answer,) = answers(tmp_path)
        assert "https://careloop.example/p/t" in answer["body"]
        assert touch(engine, "appointment-reminder|1|").reason == (
            "the patient asked to reschedule")
        s.reconcile(REPLY_AT)
        assert touch(engine, "appointment-reminder|1|").status == "cancelled"
        moved = REPLY_AT
        receive(engine, siu("S13", "C2", filler="F1", start=ny(2026, 3, 12, 10), sent=moved),
                moved)
        s.reconcile(moved)
        again = touch(engine, "appointment-reminder|1|")
        assert again.status == "scheduled"
        assert utc(again.due_at) == utc(ny(2026, 3, 12, 8, 0))


class TestNoGuessing:
    def test_unknown_number_gets_a_helpful_answer(self, engine: Engine, settings: Settings,
                                                  tmp_path: Path) -> None:
        book(engine, tmp_path)
        event_id = sms_reply(engine, "C", "SM1", sender="+15559990000")
        run(engine, settings, tmp_path)
        assert event(engine, event_id).result == "unknown sender"
        assert requests(engine) == []
        assert [r.key for r in outbox(engine) if r.key.startswith("reply-")] == []
        (answer,) = answers(tmp_path)
        assert answer["address"] == "+15559990000"
        assert "could not find a message" in answer["body"] and "+1 555 0100" in answer["body"]

    def test_shared_number_is_ambiguous(self, engine: Engine, settings: Settings,
                                        tmp_path: Path) -> None:
        """Two patients share the phone and both have an open reminder: C is not guessed."""
        book(engine, tmp_path, lang="en^English^HL70296")
        book(engine, tmp_path, filler="F2", mrn="MRN2", control="C2",
             lang="en^English^HL70296")
        sent = [t for t in all_touches(engine) if t.status == "sent"]
        assert len({t.patient_id for t in sent}) == 2
        event_id = sms_reply(engine, "C", "SM1")
        run(engine, settings, tmp_path)
        assert event(engine, event_id).result == "ambiguous"
        assert requests(engine) == []
        assert "more than one person" in answers(tmp_path)[0]["body"]

    def test_free_text_is_kept_and_answered_once(self, engine: Engine, settings: Settings,
                                                 tmp_path: Path) -> None:
        """Free text from a known patient goes on record (reply Communication) and gets the
        list of words; a second one within the hour gets no second list."""
        book(engine, tmp_path, lang="en^English^HL70296")
        first = sms_reply(engine, "I will be 10 minutes late", "SM1")
        second = sms_reply(engine, "ok thanks", "SM2")
        run(engine, settings, tmp_path)
        assert event(engine, first).result == "not understood"
        assert event(engine, second).result == "not understood (answered recently)"
        (answer,) = answers(tmp_path)
        assert "Reply C to confirm, R to reschedule, X to cancel" in answer["body"]
        keys = {r.key for r in outbox(engine)}
        assert {f"reply-{first}", f"reply-{second}"} <= keys

    def test_nothing_open_after_the_appointment(self, engine: Engine, settings: Settings,
                                                tmp_path: Path) -> None:
        book(engine, tmp_path, lang="en^English^HL70296")
        event_id = sms_reply(engine, "C", "SM1", now=ny(2026, 3, 11, 9, 0))
        run(engine, settings, tmp_path, now=ny(2026, 3, 11, 9, 0))
        assert event(engine, event_id).result == "nothing open"
        assert requests(engine) == []
        assert "no upcoming appointment" in answers(tmp_path)[0]["body"]


class TestStatus:
    def test_receipts_update_the_touch_delivery(self, engine: Engine, settings: Settings,
                                                tmp_path: Path) -> None:
        """Receipts set ``delivery``; an older one arriving late changes nothing; a failure
        keeps the touch sent and records the error code."""
        book(engine, tmp_path)
        sent = touch(engine, "appointment-reminder|0|")
        params = {"MessageSid": "SMx", "MessageStatus": "delivered", "To": PATIENT_NUMBER}
        store(engine, "sms", "status", params, now=REPLY_AT, touch_key=sent.key)
        store(engine, "sms", "status", {**params, "MessageStatus": "sent"}, now=REPLY_AT,
              touch_key=sent.key)
        assert run(engine, settings, tmp_path).processed == 2
        assert touch(engine, "appointment-reminder|0|").delivery == "delivered"
        store(engine, "sms", "status", {**params, "MessageStatus": "undelivered",
                                        "ErrorCode": "30003"}, now=REPLY_AT, touch_key=sent.key)
        run(engine, settings, tmp_path)
        after = touch(engine, "appointment-reminder|0|")
        assert (after.status, after.delivery) == ("sent", "undelivered")
        assert after.reason == "delivery undelivered: error 30003"
        assert answers(tmp_path) == []

    def test_receipt_found_by_provider_ref(self, engine: Engine, settings: Settings,
                                           tmp_path: Path) -> None:
        book(engine, tmp_path)
        sent = touch(engine, "appointment-reminder|0|")
        event_id = store(engine, "sms", "status", {
            "MessageSid": "SM-x", "MessageStatus": "delivered", "To": PATIENT_NUMBER},
            now=REPLY_AT)
        with write_lock(engine), engine.begin() as conn:
            conn.execute(update(touches).where(touches.c.id == sent.id)
                         .values(provider_ref="SM-x"))
        run(engine, settings, tmp_path)
        assert touch(engine, "appointment-reminder|0|").delivery == "delivered"
        assert event(engine, event_id).result == f"delivery delivered touch {sent.id}"


def entry_id_for(engine: Engine, filler: str) -> str:
    from integration.models import entry_keys

    with engine.connect() as conn:
        return str(conn.execute(select(entry_keys.c.entry_id).where(
            entry_keys.c.value == filler)).scalars().first())



class _Broken:
    def send(self, message: OutgoingMessage) -> Receipt:
        raise ChannelError("HTTP 400, error 21610: unsubscribed recipient", retryable=False)

    def lookup(self, key: str) -> Receipt | None:
        return None


class TestAnswerDelivery:
    def test_channel_error_is_noted_and_effects_stay(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        """The provider refuses the answer: the opt-out stands, the event says the answer
        was not sent, and a second run does not process it again."""
        book(engine, tmp_path)
        event_id = sms_reply(engine, "STOP", "SM1")
        result = process_events(engine, settings, {"sms": _Broken()}, now=REPLY_AT)
        assert result.processed == 1
        row = event(engine, event_id)
        assert row.status == "processed"
        assert row.result == "opt-out; answer not sent (channel error)"
        with engine.connect() as conn:
            assert len(conn.execute(select(address_optouts)).all()) == 1
        assert process_events(engine, settings, {"sms": _Broken()}, now=REPLY_AT).processed == 0

    def test_no_channel_configured(self, engine: Engine, settings: Settings,
                                   tmp_path: Path) -> None:
        book(engine, tmp_path)
        event_id = sms_reply(engine, "HELP", "SM1")
        process_events(engine, settings, {}, now=REPLY_AT)
        assert event(engine, event_id).result == "help; answer not sent (no channel)"


class TestFailures:
    def test_a_broken_event_is_retried_then_failed(
            self, engine: Engine, settings: Settings, tmp_path: Path) -> None:
        """Processing that raises (here: settings broken on purpose) rolls the event back;
        it is retried up to MAX_ATTEMPTS times, then kept ``failed`` with the error's type,
        and nothing it did is left behind."""
        book(engine, tmp_path)
        event_id = sms_reply(engine, "STOP", "SM1")
        broken = settings.model_copy(update={"organization": None})
        for _ in range(MAX_ATTEMPTS):
            process_events(engine, broken, answer_channels(tmp_path), now=REPLY_AT)
        row = event(engine, event_id)
        assert (row.status, row.attempts) == ("failed", MAX_ATTEMPTS)
        assert row.result == "error: AttributeError"
        with engine.connect() as conn:
            assert conn.execute(select(address_optouts)).all() == []
        assert answers(tmp_path) == []


class TestConcurrency:
    def test_two_workers_process_each_event_once(self, pg_url: str, tmp_path: Path) -> None:
        """PostgreSQL: workers racing over the same events (SKIP LOCKED) handle each once."""
        from integration.db import create_db_engine

        settings = make_settings(pg_url, tmp_path)
        eng = create_db_engine(pg_url)
        try:
            book(eng, tmp_path, lang="en^English^HL70296")
            ids = [sms_reply(eng, "HELP", f"SM{n}", sender=f"+1555000{n:04d}")
                   for n in range(20)]
            results: list[Any] = []

            def work() -> None:
                results.append(process_events(eng, settings, answer_channels(tmp_path),
                                              now=REPLY_AT))

            threads = [threading.Thread(target=work) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sum(r.processed for r in results) == len(ids)
            assert {event(eng, i).status for i in ids} == {"processed"}
            assert len(answers(tmp_path)) == len(ids)
        finally:
            eng.dispose()


class TestNoPhiInLogs:
    def test_replies_log_ids_not_numbers_or_text(
            self, engine: Engine, settings: Settings, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """What the replies modules log (before the allow-list even runs) carries ids and
        words of our own, never the number or the text; every key is allow-listed."""
        captured: list[dict[str, Any]] = []

        def capture(_logger: Any, _method: str, event_dict: Any) -> Any:
            captured.append(dict(event_dict))
            raise structlog.DropEvent

        # Fresh loggers: configure_logging caches loggers for the whole session.
        for module in (processor_module, effects_module):
            monkeypatch.setattr(module, "log", structlog.wrap_logger(
                structlog.PrintLogger(), processors=[capture],
                wrapper_class=structlog.BoundLogger))
        book(engine, tmp_path, lang="en^English^HL70296")
        sms_reply(engine, "my chest hurts since yesterday", "SM1")
        sms_reply(engine, "C", "SM2")
        sms_reply(engine, "STOP", "SM3")
        sms_reply(engine, "C", "SM4", sender="+15559990000")
        run(engine, settings, tmp_path)
        assert {"channel_event_processed", "address_opted_out",
                "patient_request_recorded"} <= {e["event"] for e in captured}
        text = json.dumps(captured, default=str)
        for secret in ("5550101", "5559990000", "chest", "Jane", "Doe"):
            assert secret not in text
        keys = {k for e in captured for k in e}
        assert keys <= ALLOWED_KEYS | {"event_id"}  # event_id: to be allow-listed


class TestSelection:
    def test_only_the_given_ids(self, engine: Engine, settings: Settings,
                                tmp_path: Path) -> None:
        book(engine, tmp_path)
        first = sms_reply(engine, "HELP", "SM1")
        second = sms_reply(engine, "HELP", "SM2")
        assert process_events(engine, settings, answer_channels(tmp_path), now=REPLY_AT,
                              ids=[]).processed == 0
        assert process_events(engine, settings, answer_channels(tmp_path), now=REPLY_AT,
                              ids=[second]).processed == 1
        assert (event(engine, first).status, event(engine, second).status) == (
            "pending", "processed")
        assert process_events(engine, settings, answer_channels(tmp_path), now=REPLY_AT,
                              limit=1).processed == 1
        assert event(engine, first).status == "processed"

    def test_portal_events_are_left_to_the_portal(self, engine: Engine, settings: Settings,
                                                  tmp_path: Path) -> None:
        event_id = store(engine, "sms", "inbound", {"MessageSid": "SM1", "From": "+1"},
                         now=REPLY_AT)
        with write_lock(engine), engine.begin() as conn:
            from integration.models import channel_events

            conn.execute(update(channel_events).values(kind="portal", channel="portal"))
        assert pending_count(engine) == 0
        assert process_events(engine, settings, {}, now=REPLY_AT).processed == 0
        assert event(engine, event_id).status == "pending"
