"""The outreach planner (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integration.outreach.pathways import OutreachSettings, Pathway, parse_offset
from integration.outreach.planner import Entry, moments, plan
from integration.outreach.policy import ContactPoint, Recipient

# Time "frozen" at a non-UTC moment: 09:00 in Dubai (+04:00) is 05:00 UTC.
DUBAI = ZoneInfo("Asia/Dubai")
NOW = datetime(2026, 3, 1, 9, 0, tzinfo=DUBAI)
NY = ZoneInfo("America/New_York")
OUT = OutreachSettings()
REMINDER = Pathway.model_validate({
    "name": "appointment-reminder", "on": "appointment", "when": {"status": ["booked"]},
    "steps": [{"at": "-P3D", "channel": "preferred", "template": "appointment-reminder"},
              {"at": "-PT2H", "channel": "sms", "template": "appointment-reminder-short"}],
})
FOLLOWUP = Pathway.model_validate({
    "name": "visit-followup", "on": "visit-end",
    "steps": [{"at": "P1D", "template": "visit-followup"}],
})
REFILL = Pathway.model_validate({
    "name": "refill", "on": "medication-refill",
    "steps": [{"at": "-P5D", "template": "refill-reminder"}],
})
CAREPLAN = Pathway.model_validate({
    "name": "careplan", "on": "careplan-activity",
    "steps": [{"at": "-P1D", "template": "careplan-step"}],
})
PATIENT = Recipient("p1", NY, "es-MX",
                    (ContactPoint("phone", "+15550101", "mobile", 1),
                     ContactPoint("email", "p@example.org", "home", 2)))


def appointment(status: str = "booked", start: datetime | None = None, **kw: Any) -> Entry:
    start = start or datetime(2026, 3, 10, 14, 0, tzinfo=NY)
    return Entry("e1", "p1", "appointment", status, start, start + timedelta(minutes=30), **kw)


def run(pathways: list[Pathway], entry: Entry, **kw: Any) -> Any:
    values: dict[str, Any] = {"settings": OUT, "languages": ["en", "es"],
                              "default_language": "en"}
    values.update(kw)
    return plan(pathways, entry, values.pop("recipient", PATIENT), values.pop("now", NOW),
                **values)


class TestOffsets:
    @pytest.mark.parametrize(("text", "delta"), [
        ("-P3D", timedelta(days=-3)), ("-PT2H", timedelta(hours=-2)),
        ("P1DT12H", timedelta(days=1, hours=12)), ("PT0S", timedelta(0)),
        ("P2W", timedelta(days=14)),
    ])
    def test_parse(self, text: str, delta: timedelta) -> None:
        assert parse_offset(text) == delta

    @pytest.mark.parametrize("text", ["3 days", "P1M", "-P", "PT", "P1Y"])
    def test_refused(self, text: str) -> None:
        with pytest.raises(ValueError, match="ISO 8601"):
            parse_offset(text)


class TestAppointmentReminders:
    def test_two_steps_planned(self) -> None:
        result = run([REMINDER], appointment())
        assert [t.key for t in result.touches] == [
            "appointment-reminder|0|e1", "appointment-reminder|1|e1"]
        first, second = result.touches
        assert first.due_at == datetime(2026, 3, 7, 14, 0, tzinfo=NY)
        assert first.channel == "sms" and first.language == "es"
        assert second.due_at == datetime(2026, 3, 10, 12, 0, tzinfo=NY)

    def test_cap_limits_same_day(self) -> None:
        """The 2-hour reminder falls on a day that already has a touch: capped, with reason."""
        others = [datetime(2026, 3, 10, 9, 0, tzinfo=NY)]
        result = run([REMINDER], appointment(), others=others)
        assert [t.step for t in result.touches] == [0]
        assert result.skips[0].reason.startswith("cap:")

    def test_cancelled_appointment_plans_nothing(self) -> None:
        result = run([REMINDER], appointment(status="cancelled"))
        assert result.touches == []
        assert {s.reason for s in result.skips} == {"status cancelled is not one of booked"}

    def test_booking_after_a_steps_moment_skips_it(self) -> None:
        """Booked two days ahead: the 3-day reminder is skipped, not sent late."""
        start = NOW.astimezone(NY) + timedelta(days=2)
        result = run([REMINDER], appointment(start=start.replace(hour=14, minute=0)))
        assert [t.step for t in result.touches] == [1]
        assert "had passed" in result.skips[0].reason

    def test_quiet_hours_move_the_touch(self) -> None:
        """A 07:00 appointment's 2-hour reminder would be at 05:00; 08:00, the end of quiet
        hours, is too late to be useful: dropped with the reason. A 09:30 one's moves to 08:00."""
        result = run([REMINDER], appointment(start=datetime(2026, 3, 10, 7, 0, tzinfo=NY)))
        skip = next(s for s in result.skips if s.step == 1)
        assert "quiet hours" in skip.reason
        early = run([REMINDER], appointment(start=datetime(2026, 3, 10, 9, 30, tzinfo=NY)))
        moved = next(t for t in early.touches if t.step == 1)
        assert moved.due_at == datetime(2026, 3, 10, 8, 0, tzinfo=NY)
        assert moved.moved == "quiet hours"

    def test_already_sent_never_planned_again(self) -> None:
        result = run([REMINDER], appointment(), sent_keys=["appointment-reminder|0|e1"])
        assert [t.step for t in result.touches] == [1]
        assert result.skips[0].reason == "already sent"

    def test_opted_out_of_everything(self) -> None:
        r = Recipient("p1", NY, telecom=PATIENT.telecom,
                      opted_out=frozenset({"sms", "email", "voice", "portal"}))
        result = run([REMINDER], appointment(), recipient=r)
        assert result.touches == []

    def test_held_by_the_patients_request(self) -> None:
        """An entry the patient asked to cancel gets no reminder, each step skipped with the
        reason; a visit-end pathway still applies once the visit happened anyway."""
        result = run([REMINDER], appointment(held="the patient asked to cancel"))
        assert result.touches == []
        assert {s.reason for s in result.skips} == {"the patient asked to cancel"}
        done = appointment(status="fulfilled", start=datetime(2026, 3, 1, 9, 0, tzinfo=NY),
                           held="the patient asked to cancel")
        assert run([FOLLOWUP], done).touches

    def test_service_type_filter(self) -> None:
        pathway = REMINDER.model_copy(update={"when": REMINDER.when.model_copy(
            update={"service_type": ("colonoscopy",)})})
        entry = appointment(resource={"serviceType": [{"coding": [{"code": "COLONOSCOPY"}]}]})
        assert run([pathway], entry).touches
        assert not run([pathway], appointment()).touches


class TestOtherPathways:
    def test_visit_end_after_fulfilled(self) -> None:
        result = run([FOLLOWUP], appointment(status="fulfilled",
                                             start=datetime(2026, 3, 1, 9, 0, tzinfo=NY)))
        assert result.touches[0].due_at == datetime(2026, 3, 2, 9, 30, tzinfo=NY)
        assert run([FOLLOWUP], appointment()).touches == []

    def test_encounter_finished(self) -> None:
        entry = Entry("enc", "p1", "encounter", "finished",
                      datetime(2026, 3, 1, 8, tzinfo=NY), datetime(2026, 3, 2, 11, tzinfo=NY))
        assert run([FOLLOWUP], entry).touches[0].moment == datetime(2026, 3, 2, 11, tzinfo=NY)

    def test_refill_before_supply_runs_out(self) -> None:
        resource = {"resourceType": "MedicationRequest", "authoredOn": "2026-02-20",
                    "dispenseRequest": {"numberOfRepeatsAllowed": 2,
                                        "expectedSupplyDuration": {"value": 30, "code": "d"}}}
        entry = Entry("m1", "p1", "medication", "active", resource=resource)
        [touch] = run([REFILL], entry).touches
        assert touch.moment.date().isoformat() == "2026-03-22"
        assert touch.due_at.date().isoformat() == "2026-03-17"
        none_left = {**resource, "dispenseRequest": {**resource["dispenseRequest"],
                                                      "numberOfRepeatsAllowed": 0}}
        result = run([REFILL], Entry("m1", "p1", "medication", "active", resource=none_left))
        assert result.touches == [] and result.skips[0].reason == "no refills remain"
        stopped = run([REFILL], Entry("m1", "p1", "medication", "stopped", resource=resource))
        assert stopped.touches == []

    def test_careplan_activities(self) -> None:
        resource = {"activity": [
            {"detail": {"status": "scheduled",
                        "scheduledPeriod": {"start": "2026-03-05T10:00:00Z"}}},
            {"detail": {"status": "completed", "scheduledString": "2026-03-06T10:00:00Z"}},
            {"detail": {"status": "scheduled",
                        "scheduledTiming": {"event": ["2026-03-08T10:00:00Z",
                                                      "2026-03-15T10:00:00Z"]}}},
        ]}
        entry = Entry("c1", "p1", "careplan", "active", resource=resource)
        result = run([CAREPLAN], entry, others=[])
        keys = [t.key for t in result.touches]
        assert keys[0] == "careplan|0|c1|activity:0:0"
        assert len(keys) == 3  # the completed activity is left out


EVENTS = st.lists(
    st.tuples(st.sampled_from(["booked", "cancelled", "fulfilled", "noshow", "booked"]),
              st.integers(min_value=-2, max_value=20)),
    min_size=1, max_size=8,
)


class TestProperties:
    @given(EVENTS, st.integers(min_value=0, max_value=30 * 24))
    @settings(max_examples=200, deadline=None)
    def test_touches_only_for_the_current_state(
        self, events: list[tuple[str, int]], hours_later: int
    ) -> None:
        """Whatever happened to an appointment, planning at any moment yields touches only
        when its current status is booked, only in the future, never twice for a step, and
        never inside quiet hours."""
        status, day = events[-1]
        start = (NOW + timedelta(days=day)).astimezone(NY).replace(hour=11, minute=0)
        now = NOW + timedelta(hours=hours_later)
        result = run([REMINDER, FOLLOWUP], appointment(status=status, start=start), now=now)
        keys = [t.key for t in result.touches]
        assert len(keys) == len(set(keys))
        for touch in result.touches:
            assert touch.due_at >= now
            if touch.pathway == "appointment-reminder":
                assert status == "booked" and touch.due_at < start
            else:
                assert status == "fulfilled"
            local = touch.due_at.astimezone(NY)
            assert 8 <= local.hour < 21


def test_moments_reason_for_wrong_kind() -> None:
    entry = Entry("x", "p", "observation", "final")
    assert moments(REMINDER.on, entry) == "not an appointment"
