"""When and how a touch may reach a patient: quiet hours, caps, channel and language.

Pure functions over aware datetimes. Quiet hours are read in the patient's own time zone on the
day in question, so a window keeps its wall-clock meaning across daylight-saving changes (21:00
is 21:00 in March and in November); a moment that falls in a skipped hour is resolved through
UTC, never by guessing an offset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, tzinfo

__all__ = [
    "ContactPoint",
    "Recipient",
    "cap_reached",
    "choose_channel",
    "choose_language",
    "in_quiet_hours",
    "next_allowed",
    "normal_address",
]

_PHONE_NOISE = re.compile(r"[\s\-.()/]+")


def normal_address(channel: str, value: str) -> str:
    """An address as compared and stored for opt-outs and reply matching: a phone number
    without spaces, dashes, dots, slashes and parentheses (a leading ``+`` kept), so that
    ``+1 (555) 555-0101`` in a record and ``+15555550101`` from a provider are one number; an
    email address trimmed and lower-cased. No country code is guessed."""
    text = value.strip()
    if channel == "email" or "@" in text:
        return text.lower()
    return _PHONE_NOISE.sub("", text)


@dataclass(frozen=True)
class ContactPoint:
    """A FHIR ContactPoint, reduced to what channel choice needs."""

    system: str  # phone | email | sms | other
    value: str
    use: str = ""  # home | work | mobile | temp | old
    rank: int | None = None


@dataclass(frozen=True)
class Recipient:
    """The patient as outreach sees them."""

    patient_id: str
    timezone: tzinfo
    language: str = ""
    """BCP 47 tag from Patient.communication (preferred) or PID-15; empty when unknown."""
    telecom: tuple[ContactPoint, ...] = ()
    preferred_channel: str | None = None
    opted_out: frozenset[str] = field(default_factory=frozenset)
    """Channels the patient opted out of (STOP on SMS opts out of SMS only)."""
    portal: bool = False
    """Whether the patient can be reached on the portal page."""
    given_name: str = ""
    blocked: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    """``(channel, address)`` pairs that opted out (a STOP reply from that number), addresses
    as :func:`normal_address` gives them: never used on that channel, whoever the patient."""


def _local(moment: datetime, tz: tzinfo) -> datetime:
    return moment.astimezone(tz)


def in_quiet_hours(moment: datetime, window: tuple[time, time] | None, tz: tzinfo) -> bool:
    """Whether ``moment`` falls inside the quiet window, read in ``tz``."""
    if window is None:
        return False
    start, end = window
    t = _local(moment, tz).time().replace(tzinfo=None)
    if start == end:
        return False
    if start < end:
        return start <= t < end
    return t >= start or t < end  # the window crosses midnight


def next_allowed(moment: datetime, window: tuple[time, time] | None, tz: tzinfo) -> datetime:
    """``moment`` if outside quiet hours, else the end of the quiet window it is in."""
    if not in_quiet_hours(moment, window, tz):
        return moment
    assert window is not None
    _start, end = window
    local = _local(moment, tz)
    day = local.date()
    if local.time().replace(tzinfo=None) >= end:
        day = day + timedelta(days=1)
    wall = datetime.combine(day, end)
    # Attach the zone, then normalise through UTC: a wall time inside a spring-forward gap
    # lands on the first real moment after it.
    candidate = wall.replace(tzinfo=tz)
    return candidate.astimezone(tz).astimezone(moment.tzinfo)


def cap_reached(
    moment: datetime,
    others: Iterable[datetime],
    *,
    tz: tzinfo,
    max_per_day: int,
    max_per_week: int,
) -> str | None:
    """Why one more touch at ``moment`` would break the caps, or None.

    ``others`` are the patient's other touches (scheduled or sent). A day is the patient's
    local calendar day; a week is the seven days ending at ``moment`` (and, for touches already
    scheduled later, the seven days starting at it), so no window of seven days ever holds more
    than ``max_per_week``.
    """
    local_day = _local(moment, tz).date()
    times = sorted(others)
    same_day = sum(1 for t in times if _local(t, tz).date() == local_day)
    if same_day >= max_per_day:
        return f"cap: {same_day} touch(es) already on {local_day.isoformat()}"
    # Every seven-day window holding ``moment`` starts at a touch in the week before it; the
    # busiest such window decides.
    week = timedelta(days=7)
    points = [*times, moment]
    for start in points:
        if moment - week < start <= moment:
            count = sum(1 for x in points if start <= x < start + week)
            if count > max_per_week:
                return f"cap: more than {max_per_week} touches within seven days"
    return None


_PHONE_CHANNELS = {"sms": ("mobile", ""), "voice": ("mobile", "home", "work", "")}


def _reach(channel: str, recipient: Recipient) -> tuple[str | None, bool]:
    """The address for ``channel`` and whether an opted-out address was passed over (so that
    "no contact" and "opted out" can be told apart)."""
    if channel == "portal":
        return ("portal" if recipient.portal else None), False
    system = "email" if channel == "email" else "phone"
    candidates = [
        cp
        for cp in recipient.telecom
        if (cp.system == system or (channel == "sms" and cp.system == "sms"))
        and cp.value
        and cp.use != "old"
    ]
    if channel == "sms":
        # Texts go to mobiles: a number marked home or work is a landline until told otherwise.
        candidates = [cp for cp in candidates if cp.system == "sms" or cp.use in ("mobile", "")]
    blocked = False
    if recipient.blocked:
        allowed = [cp for cp in candidates
                   if (channel, normal_address(channel, cp.value)) not in recipient.blocked]
        blocked = len(allowed) < len(candidates)
        candidates = allowed
    if not candidates:
        return None, blocked
    candidates.sort(key=lambda cp: (cp.rank if cp.rank is not None else 1_000, cp.use != "mobile"))
    return candidates[0].value, blocked


def choose_channel(
    step_channel: str, recipient: Recipient, fallback: Sequence[str]
) -> tuple[str, str] | str:
    """``(channel, address)`` for a step, or the reason there is none.

    A named channel is used as is (if reachable and not opted out). ``preferred`` takes the
    patient's stated preference, then the channel of their best-ranked contact point, then the
    pathway's fallback order. An address that opted out (``recipient.blocked``) is passed over
    like a channel the patient opted out of: another address on the channel, else the next
    channel.
    """
    if step_channel != "preferred":
        if step_channel in recipient.opted_out:
            return f"opted out of {step_channel}"
        address, blocked = _reach(step_channel, recipient)
        if address:
            return step_channel, address
        return f"opted out of {step_channel}" if blocked else f"no {step_channel} contact"
    order: list[str] = []
    if recipient.preferred_channel:
        order.append(recipient.preferred_channel)
    ranked = sorted(
        (cp for cp in recipient.telecom if cp.rank is not None),
        key=lambda cp: cp.rank if cp.rank is not None else 1_000,
    )
    for cp in ranked:
        order.append("email" if cp.system == "email" else "sms" if cp.use == "mobile" else "voice")
    order += list(fallback)
    tried: list[str] = []
    for channel in dict.fromkeys(order):
        if channel in recipient.opted_out:
            tried.append(f"{channel}: opted out")
            continue
        address, blocked = _reach(channel, recipient)
        if address:
            return channel, address
        tried.append(f"{channel}: opted out" if blocked else f"{channel}: no contact")
    return "no channel: " + ", ".join(tried) if tried else "no channel"


def choose_language(recipient_language: str, available: Sequence[str], default: str) -> str:
    """The first of the patient's language, its base language (``es-MX`` → ``es``) and the
    default that templates exist for."""
    tag = recipient_language.strip().replace("_", "-").lower()
    for candidate in (tag, tag.split("-")[0]):
        if candidate and candidate in available:
            return candidate
    return default
