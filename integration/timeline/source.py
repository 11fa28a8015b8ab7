"""Where a version came from (:class:`SourceRef`) and how versions are ordered (ordinals).

An ordinal is a string that sorts like the versions it names (newest greatest)::

    <UTC time, microseconds>|<tie-break>|<content hash>

* time: HL7 v2 EVN-2 (recorded date/time of the event), else MSH-7, read in the sender's time
  zone; FHIR ``meta.lastUpdated``. A version without a readable time sorts before all others.
* tie-break, for versions stamped with the same time (MSH-7 often has minute precision):
  FHIR ``meta.versionId`` (numerically), then a state further along its life (a cancel or a
  no-show beats a booking sent the same minute); HL7 that state rank first, then MSH-10
  compared with its digit runs as numbers (senders count up).
* content hash: the same resource content always gives the same ordinal, so an exact tie can
  only be a duplicate and any arrival order ends in the same state.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal

from mappings.datatypes import DatatypeError, fhir_datetime
from mappings.message import Message

__all__ = ["EPOCH", "SourceRef", "hl7v2_source", "hl7v2_time", "ordinal_for"]

JSON = dict[str, Any]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SourceRef:
    """One version's origin: ``system`` hl7v2|fhir, the sender (``MSH-3^MSH-4``) or EHR
    connection, a reference to the exact version (``inbox/42#MSG00012``,
    ``Appointment/7/_history/3``), its version label (MSH-10, ``meta.versionId``) and its
    ordinal time (aware)."""

    system: Literal["hl7v2", "fhir"]
    connection: str
    ref: str
    version: str
    ordinal: datetime
    received_at: datetime | None = None
    deleted: bool = False
    """A FHIR delete: the resource is a stub (type and id, maybe identifiers)."""

    @property
    def namespace(self) -> str:
        """The namespace of this source's resource ids (for ``Patient/x`` references)."""
        return "hl7v2" if self.system == "hl7v2" else f"fhir:{self.connection}"


_RANK = {
    "proposed": 1, "draft": 1, "planned": 1, "registered": 1, "pending": 2, "waitlist": 2,
    "preliminary": 3, "booked": 3, "active": 3, "on-hold": 3, "arrived": 4, "checked-in": 4,
    "in-progress": 4, "triaged": 4, "final": 5, "amended": 6, "corrected": 6,
    "completed": 6, "fulfilled": 6, "finished": 6, "not-done": 7, "stopped": 7,
    "cancelled": 7, "noshow": 7, "revoked": 7, "replaced": 7, "entered-in-error": 8,
    "deleted": 9,
}
_DIGITS = re.compile(r"(\d+)")


def _natural(text: str) -> str:
    return _DIGITS.sub(lambda m: m.group(1).lstrip("0").rjust(12, "0")[-12:], text)[:60]


def _content_hash(resource: JSON) -> str:
    body = {k: v for k, v in resource.items() if k != "meta"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def ordinal_for(source: SourceRef, resource: JSON, status: str) -> str:
    """The ordinal of this version of ``resource`` (see the module docs)."""
    at = source.ordinal.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")
    rank = str(_RANK.get(status, 3))
    if source.system == "fhir":
        tie = f"{_natural(source.version)}~{rank}"
    else:
        tie = f"{rank}~{_natural(source.version)}"
    return f"{at}|{tie}|{_content_hash(resource)}"


def ordinal_time(ordinal: str) -> datetime:
    return datetime.strptime(ordinal.split("|", 1)[0], "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)


def hl7v2_time(value: str, tz: tzinfo) -> datetime | None:
    """An HL7 DTM in the sender's zone (when it has no offset) as an aware datetime."""
    if not value:
        return None
    try:
        text = fhir_datetime(value, tz)
    except DatatypeError:
        return None
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed.astimezone(UTC)


def hl7v2_source(msg: Message, tz: tzinfo, *, inbox_id: int, sender: str) -> SourceRef:
    """The source of a mapped HL7 v2 message: EVN-2, else MSH-7, in the sender's zone."""
    evn = msg.segment("EVN")
    at = hl7v2_time(evn.get(2), tz) if evn is not None else None
    if at is None:
        at = hl7v2_time(msg.header.timestamp, tz)
    control = msg.header.control_id
    return SourceRef(
        system="hl7v2",
        connection=sender[:255],
        ref=f"inbox/{inbox_id}#{control}"[:512],
        version=control[:64],
        ordinal=at or EPOCH,
    )
