"""Miss nothing: event-number gap detection and heartbeat watching, per subscription.

The server numbers a subscription's events 1, 2, 3... (``eventNumber``); every notification
also says how many events there have been (``events-since-subscription-start``). A
:class:`TrackerState` remembers, per subscription:

* ``contiguous``: every event up to this number has been received (or caught up);
* ``ahead``: numbers received beyond it (out of order), with their timestamps;
* ``highest_known``: the highest number the server has announced, by an event or a count;
* when careloop last heard from the server, and the server time of the last good point
  (event ``contiguous``), where a ``_lastUpdated`` catch-up search starts.

:func:`observe` folds a notification in and returns a decision: ``None`` (nothing to do),
:class:`Wait` (a gap appeared; give stragglers ``grace`` to arrive, then :func:`check`), or
:class:`CatchUp` (missing event ranges, the good point to search from, and why). Duplicates and
reordering change nothing: a number at or below ``contiguous``, or already in ``ahead``, is
ignored. :func:`check` runs on a timer: an expired grace, or no notification (heartbeats
included) for ``factor`` × the heartbeat period, also call for catch-up. A notification with
status ``error`` calls for catch-up at once. After a catch-up the caller records it with
:func:`caught_up`.

Everything is pure and the state serializes to JSON (:meth:`TrackerState.to_json`) for a
database row. Only one catch-up per subscription should run at a time (the caller's row lock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from subscriptions._json import parse_instant
from subscriptions.notifications import Notification

__all__ = [
    "DEFAULT_GRACE",
    "MAX_AHEAD",
    "CatchUp",
    "CatchUpReason",
    "Decision",
    "EventRange",
    "TrackerState",
    "Wait",
    "caught_up",
    "check",
    "observe",
]

DEFAULT_GRACE = timedelta(seconds=10)
# Numbers kept out of order before the state gives up tracking them one by one (a catch-up is
# then due anyway); keeps a tracker row small when a subscription is far behind.
MAX_AHEAD = 10_000
CatchUpReason = Literal["gap", "heartbeat-overdue", "status-error", "counter-reset"]


@dataclass(frozen=True, order=True)
class EventRange:
    """Event numbers ``first``..``last`` inclusive; ``last`` None: up to the newest."""

    first: int
    last: int | None = None

    def __contains__(self, number: object) -> bool:
        return isinstance(number, int) and self.first <= number and (
            self.last is None or number <= self.last)


@dataclass(frozen=True)
class CatchUp:
    """Catch-up needed: fetch ``missing`` (``$events``), else search what changed since
    ``since`` (server time of the last good point; None: unknown, search everything).
    ``through``: after the catch-up, events up to this number are accounted for."""

    reason: CatchUpReason
    missing: tuple[EventRange, ...]
    since: str | None
    through: int


@dataclass(frozen=True)
class Wait:
    """A gap within its grace period: call :func:`check` again at ``until``."""

    until: datetime
    missing: tuple[EventRange, ...]


Decision = CatchUp | Wait | None


@dataclass(frozen=True)
class TrackerState:
    """What careloop knows about one subscription's event stream (see the module docstring)."""

    subscription: str
    contiguous: int = 0
    ahead: Mapping[int, str | None] = field(default_factory=dict)
    highest_known: int = 0
    last_heard_at: datetime | None = None
    last_caught_up_at: datetime | None = None
    good_timestamp: str | None = None
    gap_seen_at: datetime | None = None
    status: str | None = None

    @classmethod
    def new(cls, subscription: str, *, now: datetime, events_since_start: int = 0,
            since: str | None = None) -> TrackerState:
        """A fresh state for a subscription just created (``now`` starts the heartbeat clock;
        ``since`` is the server time it started from, for a search if events go missing)."""
        return cls(subscription, contiguous=events_since_start,
                   highest_known=events_since_start, last_heard_at=now, good_timestamp=since)

    def missing(self) -> tuple[EventRange, ...]:
        """Numbers announced but not received, as ranges."""
        out: list[EventRange] = []
        previous = self.contiguous
        beyond = sorted(n for n in self.ahead if self.contiguous < n <= self.highest_known)
        for n in [*beyond, self.highest_known + 1]:
            if n > previous + 1:
                out.append(EventRange(previous + 1, n - 1))
            previous = n
        return tuple(out)

    @property
    def has_gap(self) -> bool:
        return self.highest_known > self.contiguous

    # -- persistence ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``ahead`` as ``[[number, timestamp], ...]``)."""
        def when(d: datetime | None) -> str | None:
            return d.isoformat() if d else None
        return {
            "v": 1,
            "subscription": self.subscription,
            "contiguous": self.contiguous,
            "ahead": [[n, ts] for n, ts in sorted(self.ahead.items())],
            "highest_known": self.highest_known,
            "last_heard_at": when(self.last_heard_at),
            "last_caught_up_at": when(self.last_caught_up_at),
            "good_timestamp": self.good_timestamp,
            "gap_seen_at": when(self.gap_seen_at),
            "status": self.status,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackerState:
        if data.get("v") != 1:
            raise ValueError(f"tracker state version {data.get('v')!r} is not 1")

        def when(key: str) -> datetime | None:
            value = data.get(key)
            return parse_instant(value) if value else None
        return cls(
            subscription=str(data["subscription"]),
            contiguous=int(data["contiguous"]),
            ahead={int(n): ts for n, ts in data.get("ahead") or []},
            highest_known=int(data["highest_known"]),
            last_heard_at=when("last_heard_at"),
            last_caught_up_at=when("last_caught_up_at"),
            good_timestamp=data.get("good_timestamp"),
            gap_seen_at=when("gap_seen_at"),
            status=data.get("status"),
        )


def _advance(state: TrackerState, ahead: dict[int, str | None]) -> TrackerState:
    contiguous, good = state.contiguous, state.good_timestamp
    while contiguous + 1 in ahead:
        contiguous += 1
        good = ahead.pop(contiguous) or good
    for n in [n for n in ahead if n <= contiguous]:
        del ahead[n]
    return replace(state, contiguous=contiguous, ahead=ahead, good_timestamp=good,
                   highest_known=max(state.highest_known, contiguous))


def _open_missing(state: TrackerState) -> tuple[EventRange, ...]:
    missing = state.missing()
    if not missing or missing[-1].last != state.highest_known:
        return (*missing, EventRange(state.highest_known + 1, None))
    return (*missing[:-1], EventRange(missing[-1].first, None))


def _gap_decision(state: TrackerState, now: datetime,
                  grace: timedelta) -> tuple[TrackerState, Decision]:
    if not state.has_gap:
        return replace(state, gap_seen_at=None), None
    seen = state.gap_seen_at or now
    state = replace(state, gap_seen_at=seen)
    if now - seen >= grace or len(state.ahead) > MAX_AHEAD:
        return state, CatchUp("gap", state.missing(), state.good_timestamp, state.highest_known)
    return state, Wait(seen + grace, state.missing())


def observe(state: TrackerState, notification: Notification, *, now: datetime,
            grace: timedelta = DEFAULT_GRACE) -> tuple[TrackerState, Decision]:
    """Fold in one notification (any type); returns the new state and what to do."""
    sub_id = notification.subscription_id
    if sub_id != state.subscription:
        raise ValueError(f"notification for Subscription/{sub_id} given to the tracker of "
                         f"Subscription/{state.subscription}")
    state = replace(state, last_heard_at=now, status=notification.status or state.status)
    since = notification.events_since_start
    if (since is not None and since < state.contiguous
            and notification.type in ("handshake", "heartbeat", "query-status")):
        # The server counts again from a lower number (restarted, or recreated the
        # subscription under the same id): what happened meanwhile is unknown.
        reset = replace(state, contiguous=since, ahead={}, highest_known=since, gap_seen_at=None)
        return reset, CatchUp("counter-reset", (), state.good_timestamp, since)
    ahead = dict(state.ahead)
    highest = state.highest_known
    for event in notification.events:
        highest = max(highest, event.number)
        if event.number > state.contiguous:
            ahead.setdefault(event.number, event.timestamp)
    if since is not None:
        highest = max(highest, since)
    state = _advance(replace(state, highest_known=highest), ahead)
    if notification.status == "error":
        state = replace(state, gap_seen_at=state.gap_seen_at or now)
        return state, CatchUp("status-error", _open_missing(state), state.good_timestamp,
                              state.highest_known)
    return _gap_decision(state, now, grace)


def check(state: TrackerState, *, now: datetime, heartbeat_s: float | None,
          factor: float = 2.0, grace: timedelta = DEFAULT_GRACE) -> tuple[TrackerState, Decision]:
    """The timer's view: a gap past its grace, or silence longer than ``factor`` heartbeat
    periods (counted from the last notification or the last catch-up, whichever is later, so
    a dead subscription is caught up once per period, not continuously)."""
    state, decision = _gap_decision(state, now, grace)
    if isinstance(decision, CatchUp):
        return state, decision
    if heartbeat_s:
        marks = [t for t in (state.last_heard_at, state.last_caught_up_at) if t is not None]
        if marks and now - max(marks) > timedelta(seconds=factor * heartbeat_s):
            return state, CatchUp("heartbeat-overdue", _open_missing(state),
                                  state.good_timestamp, state.highest_known)
    return state, decision


def caught_up(state: TrackerState, *, through: int, at: datetime,
              good_timestamp: str | None = None) -> TrackerState:
    """Record a finished catch-up: every event up to ``through`` is accounted for.
    ``good_timestamp`` is the server time the catch-up reached (for the next search)."""
    ahead = {n: ts for n, ts in state.ahead.items() if n > through}
    contiguous = max(state.contiguous, through)
    state = replace(state, contiguous=contiguous, highest_known=max(state.highest_known,
                                                                    contiguous),
                    last_caught_up_at=at, good_timestamp=good_timestamp or state.good_timestamp)
    state = _advance(state, ahead)
    return replace(state, gap_seen_at=None if not state.has_gap else state.gap_seen_at)
