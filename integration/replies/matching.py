"""Which touch a reply answers: the most recent open touch sent to that number, or why none.

A reply carries only the sender's number. It is matched to the touches careloop sent to that
number on that channel (numbers compared as :func:`~integration.outreach.policy.normal_address`
gives them, on both sides) within :data:`WINDOW`, keeping those whose entry is still open:

* an appointment whose start is still ahead and that is not cancelled, fulfilled, a no-show or
  entered in error;
* any other entry (a follow-up, a refill, a care-plan step) for :data:`OTHER_WINDOW` after the
  touch was sent.

When the open touches belong to more than one patient (a family sharing a phone) the answer is
``ambiguous``: careloop never guesses whose appointment "C" confirms. No open touch: ``unknown``
when careloop never sent anything to that number, else ``nothing_open`` (with the patient when
only one was ever sent to it, so the reply can still go on their record).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, func, select

from integration.models import timeline_entries, touches
from integration.outreach.policy import normal_address

__all__ = [
    "CLOSED_APPOINTMENT",
    "OTHER_WINDOW",
    "WINDOW",
    "Match",
    "MatchedTouch",
    "address_expr",
    "address_key",
    "entry_open",
    "match_reply",
    "touch_by_key",
]

WINDOW = timedelta(days=30)
OTHER_WINDOW = timedelta(days=7)
CLOSED_APPOINTMENT = frozenset({"cancelled", "fulfilled", "noshow", "entered-in-error",
                                "deleted", "checked-in", "arrived"})
"""Appointment statuses a reply can no longer act on."""


@dataclass(frozen=True)
class MatchedTouch:
    id: int
    key: str
    entry_id: str
    patient_id: str
    """The entry's patient now (after a merge, the survivor)."""
    channel: str
    address: str
    language: str
    body: str | None
    sent_at: datetime | None
    entry_kind: str
    entry_status: str
    entry_time: datetime | None = None

    def is_open(self, now: datetime) -> bool:
        """Whether a reply can still act on this touch's entry (see :func:`entry_open`)."""
        return entry_open(self.entry_kind, self.entry_status, self.entry_time, self.sent_at,
                          now)


@dataclass(frozen=True)
class Match:
    kind: Literal["touch", "unknown", "ambiguous", "nothing_open"]
    touch: MatchedTouch | None = None
    patient_id: str | None = None
    """The sender's patient when it is known: the touch's, or the only patient ever sent to
    that number."""

    @property
    def language(self) -> str:
        return self.touch.language if self.touch is not None else ""


_KEY_NOISE = (" ", "-", ".", "(", ")", "/")


def address_expr(column: Any) -> ColumnElement[str]:
    """An address column as the index ``ix_touches_channel_address_norm`` keys it: trimmed,
    lower-cased, without spaces, dashes, dots, parentheses and slashes. Compare it with
    :func:`address_key` of a value (for a phone that is :func:`normal_address`; an email keeps
    its dots there, so never compare this with ``normal_address`` directly)."""
    expr = func.lower(func.trim(column))
    for ch in _KEY_NOISE:
        expr = func.replace(expr, ch, "")
    return expr


def address_key(value: str) -> str:
    """:func:`address_expr` in Python, for the value it is compared with."""
    text = value.strip(" ").lower()
    for ch in _KEY_NOISE:
        text = text.replace(ch, "")
    return text


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def entry_open(kind: str, status: str, time: datetime | None, sent_at: datetime | None,
               now: datetime) -> bool:
    """Whether a reply to a touch about this entry can still act on it."""
    if kind == "appointment":
        start = _aware(time)
        return status not in CLOSED_APPOINTMENT and start is not None and start > now
    sent = _aware(sent_at)
    return sent is not None and now - sent <= OTHER_WINDOW


_COLUMNS = (touches.c.id, touches.c.key, touches.c.entry_id, touches.c.channel,
            touches.c.address, touches.c.language, touches.c.body, touches.c.sent_at,
            timeline_entries.c.patient_id, timeline_entries.c.kind, timeline_entries.c.status,
            timeline_entries.c.time)


def _matched(r: Any) -> MatchedTouch:
    return MatchedTouch(
        id=int(r.id), key=r.key, entry_id=r.entry_id, patient_id=r.patient_id,
        channel=r.channel, address=r.address, language=r.language, body=r.body,
        sent_at=_aware(r.sent_at), entry_kind=r.kind, entry_status=r.status,
        entry_time=_aware(r.time),
    )


def match_reply(conn: Connection, channel: str, address: str, *, now: datetime) -> Match:
    """The touch a reply from ``address`` on ``channel`` answers (see the module docstring)."""
    now = now.astimezone(UTC)
    wanted = normal_address(channel, address)
    if not wanted:
        return Match("unknown")
    t, e = touches, timeline_entries
    rows = conn.execute(
        select(*_COLUMNS)
        .join(e, e.c.id == t.c.entry_id)
        .where(t.c.channel == channel, t.c.status == "sent", t.c.sent_at >= now - WINDOW,
               address_expr(t.c.address) == address_key(wanted))
        .order_by(t.c.sent_at.desc(), t.c.id.desc())
    ).all()
    open_rows = [r for r in rows if entry_open(r.kind, r.status, r.time, r.sent_at, now)]
    if open_rows:
        patients = {r.patient_id for r in open_rows}
        if len(patients) > 1:
            return Match("ambiguous")
        found = _matched(open_rows[0])
        return Match("touch", found, found.patient_id)
    ever = conn.execute(
        select(e.c.patient_id)
        .select_from(t.join(e, e.c.id == t.c.entry_id))
        .where(t.c.channel == channel, t.c.status == "sent",
               address_expr(t.c.address) == address_key(wanted))
        .group_by(e.c.patient_id)
        .limit(2)
    ).scalars().all()
    if not ever:
        return Match("unknown")
    return Match("nothing_open", None, ever[0] if len(ever) == 1 else None)


def touch_by_key(conn: Connection, key: str) -> MatchedTouch | None:
    """The touch with this key (a voice call's ``<Gather>`` names it), with its entry."""
    t, e = touches, timeline_entries
    row = conn.execute(
        select(*_COLUMNS).join(e, e.c.id == t.c.entry_id).where(t.c.key == key)
    ).first()
    return _matched(row) if row is not None else None
