"""Free slots in an EHR, as data: the searches to make, and what to read from the answers.

No I/O here: functions build :class:`~adapters.fhir.FHIRRequest` values and read FHIR R4
``Schedule``, ``Slot``, ``Appointment`` and ``CapabilityStatement`` resources;
:mod:`integration.scheduling.service` sends the requests.

Finding the slots of an appointment (``docs``: the patient page's "rebook"):

1. the ``Schedule`` resources of the appointment's practitioner, practitioner role, location or
   healthcare service (``Schedule?actor=<refs, comma-separated>``), else of its service type
   (``Schedule?service-type=<system|code, comma-separated>``), else the schedule of the slot the
   appointment holds;
2. their free ``Slot`` resources in a window (``Slot?schedule=...&status=free&start=ge...&
   start=lt...&_sort=start&_count=...``), of the same service as the appointment (any when
   either side does not say), never the appointment's own slot, by start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.fhir import FHIRRequest
from integration.timeline.facts import parse_fhir_time

__all__ = [
    "SCHEDULE_ACTOR_TYPES",
    "Capabilities",
    "FreeSlot",
    "actor_refs",
    "fhir_time",
    "free_slot",
    "location_refs",
    "matches_service",
    "normal_ref",
    "ref_of",
    "refs_of",
    "schedule_actor_search",
    "schedule_service_search",
    "service_text",
    "service_tokens",
    "slot_refs",
    "slot_search",
]

JSON = dict[str, Any]

SCHEDULE_ACTOR_TYPES = ("Practitioner", "PractitionerRole", "Location", "HealthcareService")
"""Appointment participants whose Schedules hold the appointment's Slots."""


@dataclass(frozen=True)
class FreeSlot:
    """One free slot in an EHR, as the patient page offers it."""

    ref: str
    """``Slot/<id>``"""
    schedule_ref: str
    """``Schedule/<id>``"""
    start: datetime
    """aware (UTC)"""
    end: datetime
    version: str | None
    """``meta.versionId`` (for ``If-Match``)"""
    service: str
    """the service type's display, text or code; may be ``""``"""
    location: str
    """the display (or name) of the Schedule's Location actor; may be ``""``"""


@dataclass(frozen=True)
class Capabilities:
    """What an EHR's CapabilityStatement says about booking."""

    book: bool = False
    """``Appointment/$book`` (Argonaut Scheduling) is offered."""
    transaction: bool = False
    """``transaction`` Bundles are accepted."""

    @classmethod
    def from_statement(cls, statement: object) -> Capabilities:
        if not isinstance(statement, Mapping):
            return cls()
        book = transaction = False
        for rest in statement.get("rest") or []:
            if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
                continue
            codes = {i.get("code") for i in rest.get("interaction") or []
                     if isinstance(i, Mapping)}
            transaction = transaction or "transaction" in codes
            for resource in rest.get("resource") or []:
                if isinstance(resource, Mapping) and resource.get("type") == "Appointment":
                    book = book or any(_is_book(op) for op in resource.get("operation") or [])
            # some servers list type-level operations at the system level, with a definition
            # that names the Appointment operation
            book = book or any(
                _is_book(op) and "appointment" in str(op.get("definition") or "").lower()
                for op in rest.get("operation") or [] if isinstance(op, Mapping))
        return cls(book=book, transaction=transaction)


def _is_book(operation: object) -> bool:
    return isinstance(operation, Mapping) and \
        str(operation.get("name") or "").lstrip("$").lower() == "book"


def fhir_time(value: datetime) -> str:
    """An aware datetime as a FHIR instant in UTC, to the second (``2030-02-01T15:00:00Z``)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat(timespec="seconds").replace("+00:00", "Z")


def normal_ref(value: str, resource_type: str) -> str:
    """``Type/id`` from ``Type/id``, a bare id, ``Type/id/_history/v`` or an absolute URL."""
    text = value.strip().split("?", 1)[0].rstrip("/")
    parts = [p for p in text.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == resource_type:
        return f"{resource_type}/{parts[-1]}"
    if len(parts) == 1:
        return f"{resource_type}/{parts[0]}"
    raise ValueError(f"{value!r} is not a {resource_type} reference")


def ref_of(reference: object) -> str | None:
    """``Type/id`` of a Reference (relative or absolute), ``None`` for other forms."""
    if not isinstance(reference, Mapping):
        return None
    text = reference.get("reference")
    if not isinstance(text, str) or "/" not in text or text.startswith(("#", "urn:")):
        return None
    parts = [p for p in text.split("?", 1)[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else None


def actor_refs(appointment: Mapping[str, Any]) -> list[str]:
    """The appointment's participants that have Schedules (``Practitioner/1``...), in order."""
    out: list[str] = []
    for participant in appointment.get("participant") or []:
        if not isinstance(participant, Mapping):
            continue
        ref = ref_of(participant.get("actor"))
        if ref and ref.split("/", 1)[0] in SCHEDULE_ACTOR_TYPES and ref not in out:
            out.append(ref)
    return out


def slot_refs(appointment: Mapping[str, Any]) -> list[str]:
    """``Slot/<id>`` of each slot the appointment holds."""
    out: list[str] = []
    for slot in appointment.get("slot") or []:
        ref = ref_of(slot)
        if ref and ref.startswith("Slot/") and ref not in out:
            out.append(ref)
    return out


def location_refs(schedule: Mapping[str, Any]) -> list[str]:
    """The Schedule's Location actors."""
    return [ref for ref in (ref_of(a) for a in schedule.get("actor") or [])
            if ref and ref.startswith("Location/")]


def _concepts(resource: Mapping[str, Any], *names: str) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for name in names:
        value = resource.get(name)
        items = value if isinstance(value, list) else [value]
        out.extend(c for c in items if isinstance(c, Mapping))
    return out


def service_text(resource: Mapping[str, Any]) -> str:
    """The display of a resource's service type: text, else a coding's display, else its code
    (``serviceType``, then ``appointmentType``); ``""`` when it has none."""
    for concept in _concepts(resource, "serviceType", "appointmentType"):
        if isinstance(concept.get("text"), str) and concept["text"].strip():
            return str(concept["text"]).strip()
        codings = [c for c in concept.get("coding") or [] if isinstance(c, Mapping)]
        for key in ("display", "code"):
            for coding in codings:
                if isinstance(coding.get(key), str) and coding[key].strip():
                    return str(coding[key]).strip()
    return ""


def service_tokens(resource: Mapping[str, Any]) -> set[str]:
    """What identifies the service of a resource's ``serviceType``: ``system|code`` and ``|code``
    of each coding, and the lower-cased text, for matching across resources."""
    tokens: set[str] = set()
    for concept in _concepts(resource, "serviceType"):
        for coding in concept.get("coding") or []:
            if not isinstance(coding, Mapping) or not coding.get("code"):
                continue
            code = str(coding["code"]).strip()
            tokens.add(f"|{code}")
            if coding.get("system"):
                tokens.add(f"{coding['system']}|{code}")
        if isinstance(concept.get("text"), str) and concept["text"].strip():
            tokens.add("text:" + concept["text"].strip().lower())
    return tokens


def matches_service(wanted: set[str], offered: set[str]) -> bool:
    """Same service when the tokens meet; any service when either side names none."""
    return not wanted or not offered or bool(wanted & offered)


def _service_params(appointment: Mapping[str, Any]) -> list[str]:
    values: list[str] = []
    for concept in _concepts(appointment, "serviceType"):
        for coding in concept.get("coding") or []:
            if isinstance(coding, Mapping) and coding.get("code"):
                system = str(coding.get("system") or "")
                value = f"{system}|{coding['code']}" if system else str(coding["code"])
                if value not in values:
                    values.append(value)
    return values


def schedule_actor_search(appointment: Mapping[str, Any]) -> FHIRRequest | None:
    """``Schedule?actor=<refs>`` for the appointment's schedulable participants."""
    refs = actor_refs(appointment)
    if not refs:
        return None
    return FHIRRequest.get("Schedule", [("actor", ",".join(refs)), ("_count", "100")])


def schedule_service_search(appointment: Mapping[str, Any]) -> FHIRRequest | None:
    """``Schedule?service-type=<system|code>`` for the appointment's service type."""
    values = _service_params(appointment)
    if not values:
        return None
    return FHIRRequest.get("Schedule", [("service-type", ",".join(values)), ("_count", "100")])


def slot_search(schedules: Sequence[str], *, start: datetime, days: int,
                limit: int) -> FHIRRequest:
    """``Slot?schedule=<refs>&status=free&start=ge<start>&start=lt<start+days>&_sort=start&
    _count=<limit>``."""
    if not schedules:
        raise ValueError("a slot search needs at least one schedule")
    end = start + timedelta(days=days)
    return FHIRRequest.get("Slot", [
        ("schedule", ",".join(schedules)),
        ("status", "free"),
        ("start", f"ge{fhir_time(start)}"),
        ("start", f"lt{fhir_time(end)}"),
        ("_sort", "start"),
        ("_count", str(limit)),
    ])


def free_slot(slot: Mapping[str, Any], schedule: Mapping[str, Any] | None,
              locations: Mapping[str, str]) -> FreeSlot | None:
    """A :class:`FreeSlot` from a Slot (and its Schedule; ``locations`` gives Location names by
    ``Location/<id>``); ``None`` when the Slot lacks an id, a schedule or its times."""
    sid = slot.get("id")
    schedule_ref = ref_of(slot.get("schedule"))
    start = parse_fhir_time(slot.get("start"))
    end = parse_fhir_time(slot.get("end"))
    if not sid or schedule_ref is None or start is None or end is None:
        return None
    meta = slot.get("meta") if isinstance(slot.get("meta"), Mapping) else {}
    assert isinstance(meta, Mapping)
    version = meta.get("versionId")
    service = service_text(slot) or (service_text(schedule) if schedule else "")
    return FreeSlot(
        ref=f"Slot/{sid}", schedule_ref=schedule_ref, start=start, end=end,
        version=str(version) if version else None, service=service,
        location=_location(schedule, locations) if schedule else "")


def _location(schedule: Mapping[str, Any], names: Mapping[str, str]) -> str:
    for actor in schedule.get("actor") or []:
        ref = ref_of(actor)
        if not ref or not ref.startswith("Location/"):
            continue
        display = actor.get("display") if isinstance(actor, Mapping) else None
        if isinstance(display, str) and display.strip():
            return display.strip()
        if names.get(ref):
            return names[ref]
    return ""


def refs_of(resources: Iterable[Mapping[str, Any]], resource_type: str) -> list[str]:
    """``Type/id`` of each resource of ``resource_type`` (in order, once each)."""
    out: list[str] = []
    for r in resources:
        if r.get("resourceType") == resource_type and r.get("id"):
            ref = f"{resource_type}/{r['id']}"
            if ref not in out:
                out.append(ref)
    return out
