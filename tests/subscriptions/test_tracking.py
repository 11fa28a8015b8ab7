"""Gap tracking: gaps, grace, duplicates, reordering, heartbeats, errors, resets, JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from subscriptions import (
    CatchUp,
    EventRange,
    Notification,
    NotificationEvent,
    Reference,
    TrackerState,
    Wait,
    caught_up,
    check,
    observe,
)

# A non-UTC zone exposes naive/aware slips.
T0 = datetime(2024, 3, 5, 9, 0, tzinfo=timezone(timedelta(hours=4)))
SUB = Reference("https://ehr.example.org/fhir/Subscription/s1", "Subscription", "s1")
NO_GRACE = timedelta(0)


def note(*numbers: int, kind: str = "event-notification", status: str = "active",
         since: int | None = None) -> Notification:
    events = tuple(NotificationEvent(n, f"2024-03-05T05:{n % 60:02d}:00Z", None) for n in numbers)
    if since is None and numbers:
        since = max(numbers)
    return Notification("r4-backport", kind, SUB, status, "t", since, events)  # type: ignore[arg-type]


def fresh() -> TrackerState:
    return TrackerState.new("s1", now=T0, since="2024-03-05T05:00:00Z")


class TestGaps:
    def test_in_order_events_leave_no_gap(self) -> None:
        """1, 2, 3 in order: nothing to do."""
        state = fresh()
        for n in (1, 2, 3):
            state, decision = observe(state, note(n), now=T0)
            assert decision is None
        assert state.contiguous == 3 and not state.missing()
        assert state.good_timestamp == "2024-03-05T05:03:00Z"

    def test_a_gap_waits_for_stragglers_then_asks_for_catch_up(self) -> None:
        """3 before 2: wait out the grace; 2 arriving in time changes nothing."""
        state, _ = observe(fresh(), note(1), now=T0)
        state, decision = observe(state, note(3), now=T0)
        assert decision == Wait(T0 + timedelta(seconds=10), (EventRange(2, 2),))
        state, decision = observe(state, note(2), now=T0 + timedelta(seconds=3))
        assert decision is None and state.contiguous == 3 and state.gap_seen_at is None

    def test_a_gap_past_its_grace_is_a_catch_up(self) -> None:
        """2 never comes: check after the grace asks for exactly event 2, from event 1's time."""
        state, _ = observe(fresh(), note(1), now=T0)
        state, _ = observe(state, note(3, 5), now=T0)
        state, decision = check(state, now=T0 + timedelta(seconds=11), heartbeat_s=60)
        assert decision == CatchUp("gap", (EventRange(2, 2), EventRange(4, 4)),
                                   "2024-03-05T05:01:00Z", 5)

    def test_a_count_ahead_of_the_events_is_a_gap(self) -> None:
        """A heartbeat saying 2 events happened when none arrived: both are missing."""
        _, decision = observe(fresh(), note(kind="heartbeat", since=2), now=T0,
                                  grace=NO_GRACE)
        assert isinstance(decision, CatchUp)
        assert decision.missing == (EventRange(1, 2),) and decision.through == 2

    def test_duplicates_change_nothing(self) -> None:
        """The same event twice, or an old one again: same state."""
        state, _ = observe(fresh(), note(1), now=T0)
        state, _ = observe(state, note(2), now=T0)
        again, decision = observe(state, note(1), now=T0)
        assert decision is None
        assert (again.contiguous, again.ahead, again.highest_known) == (2, {}, 2)


class TestHeartbeatAndStatus:
    def test_silence_past_two_heartbeats_calls_for_catch_up(self) -> None:
        """No notification for more than 2 × 60 s: catch up everything after contiguous."""
        state, _ = observe(fresh(), note(1), now=T0)
        _, decision = check(state, now=T0 + timedelta(seconds=119), heartbeat_s=60)
        assert decision is None
        _, decision = check(state, now=T0 + timedelta(seconds=121), heartbeat_s=60)
        assert decision == CatchUp("heartbeat-overdue", (EventRange(2, None),),
                                   "2024-03-05T05:01:00Z", 1)

    def test_a_heartbeat_resets_the_silence(self) -> None:
        """Heartbeats are what keeps the silence timer quiet."""
        state, _ = observe(fresh(), note(kind="heartbeat", since=0),
                           now=T0 + timedelta(seconds=100))
        _, decision = check(state, now=T0 + timedelta(seconds=200), heartbeat_s=60)
        assert decision is None

    def test_after_a_catch_up_silence_is_counted_again(self) -> None:
        """A dead subscription is caught up once per period, not on every check."""
        state = caught_up(fresh(), through=0, at=T0 + timedelta(seconds=130))
        _, decision = check(state, now=T0 + timedelta(seconds=200), heartbeat_s=60)
        assert decision is None

    def test_error_status_calls_for_catch_up_at_once(self) -> None:
        """status error: catch up now, open-ended after the announced count."""
        state, _ = observe(fresh(), note(1), now=T0)
        _, decision = observe(state, note(kind="heartbeat", status="error", since=7), now=T0)
        assert decision == CatchUp("status-error", (EventRange(2, None),),
                                   "2024-03-05T05:01:00Z", 7)

    def test_a_lower_count_means_the_server_started_over(self) -> None:
        """Handshake with 0 after 5 events: reset to 0 and search since the good point."""
        state, _ = observe(fresh(), note(1, 2, 3, 4, 5), now=T0)
        state, decision = observe(state, note(kind="handshake", since=0), now=T0)
        assert decision == CatchUp("counter-reset", (), "2024-03-05T05:05:00Z", 0)
        assert state.contiguous == 0
        state, decision = observe(state, note(1), now=T0)
        assert decision is None and state.contiguous == 1


class TestCaughtUp:
    def test_catch_up_closes_the_gap_and_keeps_later_events(self) -> None:
        """Through 4 recorded; 6 (received) stays, 5 is still missing."""
        state, _ = observe(fresh(), note(1, 3, 6), now=T0, grace=NO_GRACE)
        state = caught_up(state, through=4, at=T0, good_timestamp="2024-03-05T05:04:00Z")
        assert state.contiguous == 4 and state.missing() == (EventRange(5, 5),)
        state, decision = observe(state, note(5), now=T0)
        assert decision is None and state.contiguous == 6

    def test_json_round_trip(self) -> None:
        """The state survives a database row as JSON."""
        state, _ = observe(fresh(), note(1, 4, 6), now=T0)
        data = json.loads(json.dumps(state.to_json()))
        assert TrackerState.from_json(data) == state

    def test_notifications_for_another_subscription_are_refused(self) -> None:
        """The tracker of s2 does not take s1's events."""
        try:
            observe(TrackerState.new("s2", now=T0), note(1), now=T0)
        except ValueError as exc:
            assert "Subscription/s1" in str(exc)
        else:
            raise AssertionError("expected a ValueError")


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, list[int]]:
    """N, and a shuffled delivery of a subset of 1..N with duplicates."""
    n = draw(st.integers(1, 60))
    subset = draw(st.lists(st.integers(1, n), max_size=3 * n))
    return n, draw(st.permutations(subset))


class TestProperties:
    @settings(max_examples=300, deadline=None)
    @given(deliveries(), st.integers(1, 4))
    def test_reports_exactly_the_missing_numbers(self, case: tuple[int, list[int]],
                                                 batch: int) -> None:
        """Any order, any duplicates, any batching: missing = announced - delivered."""
        n, order = case
        state = TrackerState.new("s1", now=T0)
        for i in range(0, len(order), batch):
            state, _ = observe(state, note(*order[i:i + batch]), now=T0, grace=NO_GRACE)
        state, decision = observe(state, note(kind="heartbeat", since=n), now=T0,
                                  grace=NO_GRACE)
        missing = {m for r in state.missing() for m in range(r.first, (r.last or n) + 1)}
        assert missing == set(range(1, n + 1)) - set(order)
        assert (decision is None) == (not missing)
        if isinstance(decision, CatchUp):
            assert decision.missing == state.missing() and decision.through == n

    @settings(max_examples=200, deadline=None)
    @given(st.integers(1, 60).flatmap(lambda n: st.tuples(
        st.just(n), st.permutations(list(range(1, n + 1))),
        st.lists(st.integers(1, n), max_size=n))))
    def test_everything_delivered_leaves_no_gap(self, case: tuple[int, list[int],
                                                                  list[int]]) -> None:
        """Every number at least once, in any order: contiguous reaches N, nothing missing."""
        n, order, extra = case
        state = TrackerState.new("s1", now=T0)
        for number in [*order, *extra]:
            state, _ = observe(state, note(number), now=T0, grace=NO_GRACE)
        _, decision = check(state, now=T0, heartbeat_s=60)
        assert decision is None
        assert state.contiguous == n and not state.ahead and not state.missing()

    @settings(max_examples=100, deadline=None)
    @given(deliveries())
    def test_state_survives_json_at_every_step(self, case: tuple[int, list[int]]) -> None:
        """Persisting and reloading between notifications changes nothing."""
        _, order = case
        direct = stored = TrackerState.new("s1", now=T0.astimezone(UTC))
        for number in order:
            direct, _ = observe(direct, note(number), now=T0)
            stored, _ = observe(TrackerState.from_json(json.loads(json.dumps(
                stored.to_json()))), note(number), now=T0)
        assert direct == stored
