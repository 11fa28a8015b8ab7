"""Pathway settings: ``[[pathways]]`` and ``[outreach]`` in the configuration file.

```toml
[[pathways]]
name = "appointment-reminder"
on = "appointment"                 # appointment | visit-end | medication-refill | careplan-activity
when = { status = ["booked"] }     # filters on the timeline entry
steps = [ { at = "-P3D", channel = "preferred", template = "appointment-reminder" },
          { at = "-PT2H", channel = "sms", template = "appointment-reminder-short" } ]

[outreach]
quiet_hours = "21:00-08:00"
max_per_day = 1
max_per_week = 3
```
"""

from __future__ import annotations

import re
from datetime import time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CHANNELS",
    "Organization",
    "OutreachSettings",
    "Pathway",
    "PathwayFilter",
    "Step",
    "Trigger",
    "parse_offset",
]

CHANNELS = ("sms", "email", "voice", "portal")
ChannelName = Literal["preferred", "sms", "email", "voice", "portal"]

_DURATION = re.compile(
    r"^(?P<sign>[-+])?P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$"
)


def parse_offset(text: str) -> timedelta:
    """An ISO 8601 duration with an optional sign: ``-P3D``, ``-PT2H``, ``P1DT12H``, ``PT0S``.

    Years and months are refused: their length depends on the date, and a reminder offset
    should not.
    """
    match = _DURATION.match(text.strip().upper())
    if not match or text.strip().upper() in {"P", "-P", "+P", "PT", "-PT", "+PT"}:
        raise ValueError(
            f"{text!r} is not an ISO 8601 duration such as -P3D or -PT2H "
            "(weeks, days, hours, minutes, seconds)"
        )
    parts = {k: int(v) for k, v in match.groupdict().items() if k != "sign" and v}
    delta = timedelta(**parts)
    return -delta if match.group("sign") == "-" else delta


class Trigger(StrEnum):
    APPOINTMENT = "appointment"
    """Before (or after) an appointment's start, while its status matches the filter."""
    VISIT_END = "visit-end"
    """After a visit ends: appointment fulfilled, encounter finished (ADT A03 discharge)."""
    MEDICATION_REFILL = "medication-refill"
    """Before a medication's supply runs out, while refills remain."""
    CAREPLAN_ACTIVITY = "careplan-activity"
    """Around each scheduled care-plan activity."""


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: timedelta
    """Offset from the pathway's moment (appointment start, visit end, supply end...)."""
    channel: ChannelName = "preferred"
    template: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")

    @field_validator("at", mode="before")
    @classmethod
    def _offset(cls, v: object) -> object:
        return parse_offset(v) if isinstance(v, str) else v


class PathwayFilter(BaseModel):
    """Which timeline entries a pathway applies to; an empty list means any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: tuple[str, ...] = ()
    service_type: tuple[str, ...] = ()
    """Codes or display texts of the entry's service type (Appointment.serviceType)."""
    location: tuple[str, ...] = ()
    """Location names or ids the entry references."""


class Pathway(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    on: Trigger
    when: PathwayFilter = PathwayFilter()
    steps: tuple[Step, ...] = Field(min_length=1)
    fallback: tuple[Literal["sms", "email", "voice", "portal"], ...] = CHANNELS  # type: ignore[assignment]
    """Channel order when the patient states no usable preference."""
    survey_url: str | None = None
    """For survey pathways: the link the patient opens (``{entry}`` and ``{patient}`` are
    replaced by ids)."""


def _clock(text: str) -> time:
    try:
        hours, minutes = text.strip().split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"{text!r} is not HH:MM") from None


class OutreachSettings(BaseModel):
    """``[outreach]``. Caps default to the FCC's healthcare exemption (at most one message a
    day and three a week per patient); quiet hours to 21:00-08:00 in the patient's time zone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quiet_hours: str = "21:00-08:00"
    max_per_day: int = Field(default=1, ge=1)
    max_per_week: int = Field(default=3, ge=1)
    templates_dir: Path | None = None
    """Folder of ``{template}.{language}.j2`` files; the built-in templates when unset."""
    languages: tuple[str, ...] = ("en", "es")
    max_sms_segments: int = Field(default=3, ge=1, le=10)
    min_notice: timedelta = timedelta(hours=1)
    """A reminder moved out of quiet hours must still arrive this long before the moment."""
    max_lateness: timedelta = timedelta(hours=6)
    """A touch the sweep reaches later than this after its due time is dropped ("too late"),
    and a reminder is never sent later than ``min_notice`` before its moment."""
    outbox_dir: Path = Path("var/outbox")
    """The development channel's folder: one JSON file per message under ``<channel>/``."""
    interval_s: float = Field(default=1.0, gt=0)
    """How often the stage reconciles timeline changes and sweeps due touches."""
    batch: int = Field(default=500, ge=1, le=10_000)
    """Timeline changes per reconcile transaction; due touches per sweep transaction."""
    sending_timeout_s: float = Field(default=300.0, gt=0)
    """A touch still ``sending`` after this long (a crash between send and record) is resolved by
    asking the channel whether its key was delivered."""
    gap_grace_s: float = Field(default=10.0, ge=0)
    """How long the reconciler waits on a gap in ``timeline_changes`` ids (a transaction still
    running on PostgreSQL, which will commit with the lower id) before stepping over it."""
    max_attempts: int = Field(default=5, ge=1)

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, v: str) -> str:
        if v.strip().lower() in ("", "none", "off"):
            return ""
        start, sep, end = v.partition("-")
        if not sep:
            raise ValueError(f"{v!r} is not HH:MM-HH:MM")
        _clock(start)
        _clock(end)
        return v

    @field_validator("min_notice", "max_lateness", mode="before")
    @classmethod
    def _notice(cls, v: object) -> object:
        return parse_offset(v) if isinstance(v, str) else v

    @property
    def quiet_window(self) -> tuple[time, time] | None:
        if not self.quiet_hours:
            return None
        start, _, end = self.quiet_hours.partition("-")
        return _clock(start), _clock(end)


class Organization(BaseModel):
    """``[organization]``: who the messages come from (used by templates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "Your care team"
    phone: str = ""
    link: str = ""
    """The patient portal or website: where a patient confirms, reschedules, reads next steps."""
    results_link: str = ""
    """The hospital's own portal for results: careloop's patient page links there and shows no
    clinical values itself."""
