"""The outreach stage end to end: an HL7 v2 (or FHIR) input through the real processing stage,
the reconciler and the due sweep, to a message file in the outbox (real PostgreSQL and SQLite).

Time is frozen by explicit ``now`` values in America/New_York."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update

from integration.db import write_lock
from integration.models import patient_preferences, timeline_changes
from integration.timeline import SourceRef, apply
from tests.outreach.support import (
    NY,
    PID,
    adt_a03,
    all_touches,
    entry_id,
    ny,
    outbox_files,
    rde,
    rds,
    receive,
    siu,
    stage,
    touch,
    utc,
)

T0 = ny(2026, 3, 1, 9, 0)  # a Sunday morning in New York


class TestAppointmentReminder:
    def test_booking_to_outbox(self, engine: Engine, tmp_path: Path) -> None:
        """A SIU S12 booking becomes two reminders; each is sent at its time, in Spanish, to
        the patient's mobile, with the appointment in the patient's zone."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        result = s.reconcile(T0)
        assert result.scheduled == 2
        first = touch(engine, "appointment-reminder|0|")
        assert first.status == "scheduled"
        assert utc(first.due_at) == utc(ny(2026, 3, 7, 14))
        assert (first.channel, first.language) == ("sms", "es")
        assert s.send_due(ny(2026, 3, 7, 13, 59)).claimed == 0
        sweep = s.send_due(ny(2026, 3, 7, 14, 0, ))
        assert sweep.sent == 1
        (message,) = outbox_files(tmp_path / "sms")
        assert message["key"] == first.key
        assert message["address"] == "+1 (555) 5550101"
        assert "martes, 10 de marzo de 2026, 14:00" in message["body"] or "10 mar 2026" in \
            message["body"], message["body"]
        assert "Main Street Clinic" in message["body"]
        sent = touch(engine, "appointment-reminder|0|")
        assert sent.status == "sent" and sent.provider_ref.startswith("file:")
        s.send_due(ny(2026, 3, 10, 12, 0))
        assert len(outbox_files(tmp_path / "sms")) == 2

    def test_cancel_before_due_cancels_the_touches(self, engine: Engine, tmp_path: Path) -> None:
        """S15 cancel: scheduled reminders are cancelled with the reason; nothing is sent."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        later = T0 + timedelta(hours=1)
        receive(engine, siu("S15", "C2", filler="F1", start=ny(2026, 3, 10, 14), sent=later),
                later)
        result = s.reconcile(later)
        assert result.cancelled == 2
        rows = [t for t in all_touches(engine) if t.pathway == "appointment-reminder"]
        assert {t.status for t in rows} == {"cancelled"}
        assert rows[0].reason == "status cancelled is not one of booked"
        assert s.send_due(ny(2026, 3, 10, 13)).sent == 0
        assert outbox_files(tmp_path) == []

    def test_reschedule_moves_the_touches(self, engine: Engine, tmp_path: Path) -> None:
        """S13 reschedule: the same keys move to the new time."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        later = T0 + timedelta(hours=1)
        receive(engine, siu("S13", "C2", filler="F1", start=ny(2026, 3, 12, 10), sent=later),
                later)
        assert s.reconcile(later).moved == 2
        first = touch(engine, "appointment-reminder|0|")
        assert utc(first.due_at) == utc(ny(2026, 3, 9, 10))
        assert first.reason.startswith("moved")

    def test_replay_of_changes_changes_nothing(self, engine: Engine, tmp_path: Path) -> None:
        """Consuming the same timeline changes again writes nothing."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        before = [tuple(t) for t in all_touches(engine)]
        with write_lock(engine), engine.begin() as conn:
            from integration.models import outreach_cursors

            conn.execute(update(outreach_cursors).values(last_id=0))
        again = s.reconcile(T0 + timedelta(minutes=5))
        assert again.changes > 0
        assert (again.scheduled, again.moved, again.cancelled, again.skipped) == (0, 0, 0, 0)
        assert [tuple(t) for t in all_touches(engine)] == before

    def test_late_booking_skips_the_early_step(self, engine: Engine, tmp_path: Path) -> None:
        """Booked a day ahead: the 3-day reminder is recorded as skipped, not sent late."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 2, 14), sent=T0), T0)
        s.reconcile(T0)
        skipped = touch(engine, "appointment-reminder|0|")
        assert skipped.status == "skipped" and "had passed" in skipped.reason
        assert touch(engine, "appointment-reminder|1|").status == "scheduled"


class TestVisitEnd:
    def test_discharge_sends_followup_and_survey(self, engine: Engine, tmp_path: Path) -> None:
        """ADT A03: the follow-up (4 h after) and the survey by email (a day later, with the
        survey link) are sent."""
        s = stage(engine, tmp_path)
        discharged = ny(2026, 3, 2, 11, 0)
        receive(engine, adt_a03("A1", visit="V1", admitted=ny(2026, 3, 2, 9),
                                discharged=discharged), discharged)
        s.reconcile(discharged)
        followup = touch(engine, "visit-followup|0|")
        assert utc(followup.due_at) == utc(discharged + timedelta(hours=4))
        assert s.send_due(discharged + timedelta(hours=4)).sent == 1
        assert s.send_due(discharged + timedelta(days=1, hours=2)).sent == 1
        (survey,) = outbox_files(tmp_path / "email")
        eid = entry_id(engine, "Encounter")
        assert f"https://survey.example/s/{eid}" in survey["body"]
        assert survey["language"] == "en" and survey["subject"]
        assert len(outbox_files(tmp_path)) == 2


class TestRefill:
    def test_order_then_dispense(self, engine: Engine, tmp_path: Path) -> None:
        """RDE: a reminder 5 days before a 30-day supply runs out; a later RDS dispense
        restarts the clock and moves it; the reminder names the medication."""
        s = stage(engine, tmp_path)
        receive(engine, rde("R1", order="O1", authored=T0, refills=2, days=30), T0)
        s.reconcile(T0)
        first = touch(engine, "refill-reminder|0|")
        # 30 days of supply from 09:00 EST is 10:00 EDT; the reminder 5 days (wall clock) before
        assert utc(first.due_at) == utc(ny(2026, 3, 26, 10, 0))
        dispensed = T0 + timedelta(days=3)
        receive(engine, rds("R2", order="O1", dispensed=dispensed, refills=1, days=30), dispensed)
        s.reconcile(dispensed)
        moved = touch(engine, "refill-reminder|0|")
        assert utc(moved.due_at) == utc(ny(2026, 3, 29, 10, 0))
        assert s.send_due(ny(2026, 3, 29, 10, 0)).sent == 1
        (message,) = outbox_files(tmp_path)
        assert "Doxycycline 100 mg" in message["body"]

    def test_no_refills_left_plans_nothing(self, engine: Engine, tmp_path: Path) -> None:
        s = stage(engine, tmp_path)
        receive(engine, rde("R1", order="O1", authored=T0, refills=0, days=30), T0)
        s.reconcile(T0)
        skipped = touch(engine, "refill-reminder|0|")
        assert (skipped.status, skipped.reason) == ("skipped", "no refills remain")


def careplan(status: str = "active", when: str = "2026-03-05T10:00:00-05:00") -> dict[str, Any]:
    return {
        "resourceType": "CarePlan", "id": "cp1", "status": status, "intent": "plan",
        "identifier": [{"system": "urn:oid:1.2.3.9", "value": "CP1"}],
        "subject": {"reference": "Patient/pt1"},
        "period": {"start": "2026-03-01"},
        "activity": [{"detail": {"status": "scheduled",
                                 "code": {"text": "Blood pressure check"},
                                 "scheduledPeriod": {"start": when}}}],
    }


PATIENT = {
    "resourceType": "Patient", "id": "pt1",
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN9"}],
    "name": [{"given": ["Ana"], "family": "Ruiz"}],
    "telecom": [{"system": "email", "value": "ana@example.org", "rank": 1},
                {"system": "phone", "value": "+15550199", "use": "mobile", "rank": 2}],
    "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "es-MX"}]},
                       "preferred": True}],
}


def fhir(engine: Engine, resources: list[dict[str, Any]], version: int, now: Any) -> None:
    source = SourceRef("fhir", "main-ehr", f"CarePlan/cp1/_history/{version}", str(version),
                       now.astimezone(UTC))
    with write_lock(engine), engine.begin() as conn:
        apply(conn, resources, source, now)


class TestCarePlan:
    def test_fhir_careplan_activity(self, engine: Engine, tmp_path: Path) -> None:
        """A FHIR CarePlan (as a subscription would deliver it): a touch the day before the
        activity, by the best-ranked contact (email), in Spanish, naming the activity."""
        s = stage(engine, tmp_path)
        fhir(engine, [PATIENT, careplan()], 1, T0)
        s.reconcile(T0)
        step = touch(engine, "careplan-step|0|")
        assert step.key.endswith("|activity:0:0")
        assert (step.channel, step.language) == ("email", "es")
        assert s.send_due(ny(2026, 3, 4, 10)).sent == 1
        (message,) = outbox_files(tmp_path / "email")
        assert "Blood pressure check" in message["body"]
        assert message["address"] == "ana@example.org"

    def test_completed_plan_cancels(self, engine: Engine, tmp_path: Path) -> None:
        s = stage(engine, tmp_path)
        fhir(engine, [PATIENT, careplan()], 1, T0)
        s.reconcile(T0)
        fhir(engine, [careplan(status="completed")], 2, T0 + timedelta(hours=1))
        s.reconcile(T0 + timedelta(hours=1))
        assert touch(engine, "careplan-step|0|").status == "cancelled"
        assert s.send_due(ny(2026, 3, 4, 10)).sent == 0


class TestSendTimeChecks:
    def test_opt_out_stops_a_scheduled_touch(self, engine: Engine, tmp_path: Path) -> None:
        """A preferences row written after planning (no timeline change) stops the touch at
        send time, with the reason."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        pid = touch(engine, "appointment-reminder|0|").patient_id
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(patient_preferences).values(
                patient_id=pid, opted_out=["sms", "email", "voice", "portal"],
                updated_at=T0))
        result = s.send_due(ny(2026, 3, 7, 14))
        assert (result.sent, result.cancelled) == (0, 1)
        stopped = touch(engine, "appointment-reminder|0|")
        assert stopped.status == "cancelled" and "opted out" in stopped.reason
        assert outbox_files(tmp_path) == []

    def test_sms_opt_out_switches_a_preferred_step(self, engine: Engine,
                                                   tmp_path: Path) -> None:
        """STOP on SMS only: a ``preferred`` step moves to email instead of being sent by SMS."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        pid = touch(engine, "appointment-reminder|0|").patient_id
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(patient_preferences).values(
                patient_id=pid, opted_out=["sms"], updated_at=T0))
        due = ny(2026, 3, 7, 14)
        assert s.send_due(due).sent == 0
        assert touch(engine, "appointment-reminder|0|").channel == "email"
        assert s.send_due(due + timedelta(seconds=1)).sent == 1
        assert len(outbox_files(tmp_path / "email")) == 1

    def test_quiet_hours_at_send_time_across_dst(self, engine: Engine, tmp_path: Path) -> None:
        """Planned in New York; the patient then tells us they live in Los Angeles. On the day
        clocks spring forward (8 March 2026) the touch due at 08:30 New York time is 05:30 in
        Los Angeles, inside quiet hours: it is not sent but moved to 08:00 PDT (UTC-7, not the
        UTC-8 of the night before), i.e. 15:00 UTC, and sent then."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 11, 8, 30), sent=T0), T0)
        s.reconcile(T0)
        first = touch(engine, "appointment-reminder|0|")
        assert utc(first.due_at) == utc(ny(2026, 3, 8, 8, 30))  # wall clock across the change
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(patient_preferences).values(
                patient_id=first.patient_id, timezone="America/Los_Angeles", updated_at=T0))
        result = s.send_due(ny(2026, 3, 8, 8, 30))
        assert (result.sent, result.rescheduled) == (0, 1)
        moved = touch(engine, "appointment-reminder|0|")
        assert moved.status == "scheduled" and moved.reason.startswith("at send time")
        assert utc(moved.due_at) == datetime(2026, 3, 8, 15, 0, tzinfo=UTC)
        assert s.send_due(datetime(2026, 3, 8, 14, 59, tzinfo=UTC)).sent == 0
        assert s.send_due(datetime(2026, 3, 8, 15, 0, tzinfo=UTC)).sent == 1

    def test_sweep_running_into_quiet_hours(self, engine: Engine, tmp_path: Path) -> None:
        """A sweep that reaches a due touch late, inside quiet hours, moves it to the end of
        quiet hours when still useful."""
        s = stage(engine, tmp_path)
        discharged = ny(2026, 3, 2, 16, 30)
        receive(engine, adt_a03("A1", visit="V1", admitted=ny(2026, 3, 2, 9),
                                discharged=discharged), discharged)
        s.reconcile(discharged)
        followup = touch(engine, "visit-followup|0|")
        assert utc(followup.due_at) == utc(ny(2026, 3, 2, 20, 30))
        result = s.send_due(ny(2026, 3, 2, 21, 15))
        assert result.rescheduled == 1
        held = touch(engine, "visit-followup|0|")
        assert held.reason == "quiet hours at send time"
        assert utc(held.due_at) == utc(ny(2026, 3, 3, 8, 0))

    def test_cap_at_send_time(self, engine: Engine, tmp_path: Path) -> None:
        """Two appointments the same week with a cap of one a day: the second's reminder that
        would share a day is skipped when planned, with the cap as the reason."""
        s = stage(engine, tmp_path, max_per_day=1, max_per_week=3)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        receive(engine, siu("S12", "C2", filler="F2", start=ny(2026, 3, 10, 16), sent=T0), T0)
        s.reconcile(T0)
        statuses = sorted((t.pathway, t.step, t.status, (t.reason or "")[:4])
                          for t in all_touches(engine))
        assert statuses.count(("appointment-reminder", 0, "scheduled", "")) == 1
        assert ("appointment-reminder", 0, "skipped", "cap:") in statuses
        s.send_due(ny(2026, 3, 10, 16))
        sent = [t for t in all_touches(engine) if t.status == "sent"]
        days = [utc(t.sent_at).astimezone(NY).date() for t in sent]
        assert len(days) == len(set(days))


class TestAtMostOnce:
    def test_crash_between_claim_and_send(self, engine: Engine, tmp_path: Path) -> None:
        """A touch claimed by a sweep that died is re-checked and sent once after the timeout."""
        from integration.outreach.sender import claim_due

        s = stage(engine, tmp_path, sending_timeout_s=60)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        due = ny(2026, 3, 7, 14)
        assert len(claim_due(engine, now=due, limit=10)) == 1  # ...and the process dies
        assert s.send_due(due + timedelta(seconds=30)).sent == 0  # not stale yet
        result = s.send_due(due + timedelta(seconds=90))
        assert (result.recovered, result.sent) == (1, 1)
        assert len(outbox_files(tmp_path)) == 1
        assert touch(engine, "appointment-reminder|0|").attempts == 2

    def test_crash_between_send_and_record(self, engine: Engine, tmp_path: Path,
                                           monkeypatch: Any) -> None:
        """The message left but the commit did not: the stale row is resolved by asking the
        channel, and marked sent without a second delivery."""
        from integration.outreach import sender

        s = stage(engine, tmp_path, sending_timeout_s=60)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0), T0)
        s.reconcile(T0)
        due = ny(2026, 3, 7, 14)
        real = sender._sent

        def crash(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("power cut")

        monkeypatch.setattr(sender, "_sent", crash)
        with contextlib.suppress(RuntimeError):
            s.send_due(due)
        monkeypatch.setattr(sender, "_sent", real)
        assert touch(engine, "appointment-reminder|0|").status == "sending"
        assert len(outbox_files(tmp_path)) == 1
        sends: list[str] = []
        for channel in s.channels.values():
            original = channel.send

            def counting(message: Any, _orig: Any = original) -> Any:
                sends.append(message.key)
                return _orig(message)

            monkeypatch.setattr(channel, "send", counting)
        result = s.send_due(due + timedelta(minutes=2))
        assert result.recovered == 1
        row = touch(engine, "appointment-reminder|0|")
        assert row.status == "sent" and row.reason == "recorded after an interrupted send"
        assert sends == []
        assert len(outbox_files(tmp_path)) == 1


class TestMerge:
    def test_touches_follow_a_merged_entry(self, engine: Engine, tmp_path: Path) -> None:
        """ADT A40 merges MRN2 into MRN1: the appointment moves, and its touches with it."""
        s = stage(engine, tmp_path)
        receive(engine, siu("S12", "C1", filler="F1", start=ny(2026, 3, 10, 14), sent=T0,
                            mrn="MRN2"), T0)
        receive(engine, siu("S12", "C2", filler="F2", start=ny(2026, 3, 20, 14), sent=T0,
                            mrn="MRN1"), T0)
        s.reconcile(T0)
        merged = T0 + timedelta(hours=1)
        raw = ("\r".join([
            f"MSH|^~\\&|EPIC|MAIN|CARELOOP|HOSP|{merged.strftime('%Y%m%d%H%M%S%z')}||"
            "ADT^A40^ADT_A39|M1|P|2.5.1",
            f"EVN|A40|{merged.strftime('%Y%m%d%H%M%S%z')}",
            PID.format(mrn="MRN1", lang="es^Spanish^HL70296"),
            "MRG|MRN2^^^HOSP^MR",
        ]) + "\r").encode()
        receive(engine, raw, merged)
        s.reconcile(merged)
        rows = [t for t in all_touches(engine) if t.status == "scheduled"]
        assert len({t.patient_id for t in rows}) == 1
        with engine.connect() as conn:
            moved = conn.execute(select(timeline_changes.c.change)).scalars().all()
        assert "moved" in moved
