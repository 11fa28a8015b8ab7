"""What the timeline needs from one FHIR R4 resource: kind, status, time, a short summary, the
patient it is about. Pure functions, no I/O.

Summaries are structured and short (``Appointment booked: Checkup``): a status and a coded
display (service type, encounter class, medication, observation code), never notes, comments,
names or values, so a summary can be shown in a list without becoming a free-text dump.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["KINDS", "EntryFacts", "facts_for", "parse_fhir_time", "patient_reference"]

JSON = dict[str, Any]

#: resource type → timeline kind (INTERFACE.md); other types are not timeline entries.
KINDS: dict[str, str] = {
    "Appointment": "appointment",
    "Encounter": "encounter",
    "MedicationRequest": "medication",
    "MedicationDispense": "medication",
    "MedicationAdministration": "medication",
    "MedicationStatement": "medication",
    "CarePlan": "careplan",
    "Observation": "observation",
    "DiagnosticReport": "observation",
    "Immunization": "immunization",
    "Communication": "communication",
    "Patient": "patient",
}

_LABELS = {
    "Appointment": "Appointment",
    "Encounter": "Encounter",
    "MedicationRequest": "Medication order",
    "MedicationDispense": "Medication dispense",
    "MedicationAdministration": "Medication given",
    "MedicationStatement": "Medication statement",
    "CarePlan": "Care plan",
    "Observation": "Observation",
    "DiagnosticReport": "Report",
    "Immunization": "Immunization",
    "Communication": "Communication",
    "Patient": "Patient record",
}

# The coded element whose display describes the thing (never free text such as notes).
_CONCEPT = {
    "Appointment": ("serviceType", "appointmentType"),
    "Encounter": ("class", "type", "serviceType"),
    "MedicationRequest": ("medicationCodeableConcept",),
    "MedicationDispense": ("medicationCodeableConcept",),
    "MedicationAdministration": ("medicationCodeableConcept",),
    "MedicationStatement": ("medicationCodeableConcept",),
    "CarePlan": ("category",),
    "Observation": ("code",),
    "DiagnosticReport": ("code",),
    "Immunization": ("vaccineCode",),
    "Communication": ("category",),
}

# (start element, end element) paths, first found wins.
_TIMES: dict[str, tuple[tuple[str, ...], ...]] = {
    "Appointment": (("start",),),
    "Encounter": (("period", "start"),),
    "MedicationRequest": (("authoredOn",),),
    "MedicationDispense": (("whenHandedOver",), ("whenPrepared",)),
    "MedicationAdministration": (("effectiveDateTime",), ("effectivePeriod", "start")),
    "MedicationStatement": (("effectiveDateTime",), ("effectivePeriod", "start"),
                            ("dateAsserted",)),
    "CarePlan": (("period", "start"), ("created",)),
    "Observation": (("effectiveDateTime",), ("effectivePeriod", "start"),
                    ("effectiveInstant",), ("issued",)),
    "DiagnosticReport": (("effectiveDateTime",), ("effectivePeriod", "start"), ("issued",)),
    "Immunization": (("occurrenceDateTime",),),
    "Communication": (("sent",), ("received",)),
}
_ENDS: dict[str, tuple[str, ...]] = {
    "Appointment": ("end",),
    "Encounter": ("period", "end"),
    "MedicationAdministration": ("effectivePeriod", "end"),
    "MedicationStatement": ("effectivePeriod", "end"),
    "CarePlan": ("period", "end"),
    "Observation": ("effectivePeriod", "end"),
    "DiagnosticReport": ("effectivePeriod", "end"),
}

_SUBJECT = {"Appointment": None, "Immunization": "patient", "Patient": None}


@dataclass(frozen=True)
class EntryFacts:
    kind: str
    status: str
    time: datetime | None
    end: datetime | None
    summary: str


def parse_fhir_time(value: object) -> datetime | None:
    """A FHIR date, dateTime or instant as an aware UTC datetime (dates at 00:00 UTC)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        if len(text) == 4:
            parsed = datetime(int(text), 1, 1)
        elif len(text) == 7:
            parsed = datetime(int(text[:4]), int(text[5:7]), 1)
        else:
            parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _path(resource: JSON, path: tuple[str, ...]) -> object:
    node: object = resource
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _display(concept: object) -> str:
    if isinstance(concept, list):
        concept = concept[0] if concept else None
    if not isinstance(concept, dict):
        return ""
    if "coding" not in concept and "code" in concept:  # a bare Coding (Encounter.class)
        return str(concept.get("display") or concept.get("code") or "")
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return str(concept.get("text") or "")


def _status(resource: JSON) -> str:
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        links = resource.get("link") or []
        if any(isinstance(lk, dict) and lk.get("type") == "replaced-by" for lk in links):
            return "replaced"
        return "inactive" if resource.get("active") is False else "active"
    status = resource.get("status")
    return str(status)[:32] if status else "unknown"


def facts_for(resource: JSON, *, deleted: bool = False) -> EntryFacts | None:
    """The entry facts for a resource, or None when its type is not a timeline kind."""
    rtype = str(resource.get("resourceType", ""))
    kind = KINDS.get(rtype)
    if kind is None:
        return None
    status = "deleted" if deleted else _status(resource)
    time = None
    for path in _TIMES.get(rtype, ()):
        time = parse_fhir_time(_path(resource, path))
        if time is not None:
            break
    end_path = _ENDS.get(rtype)
    end = parse_fhir_time(_path(resource, end_path)) if end_path else None
    summary = f"{_LABELS[rtype]} {status}"
    for element in _CONCEPT.get(rtype, ()):
        label = _display(resource.get(element))
        if label:
            summary = f"{summary}: {' '.join(label.split())[:80]}"
            break
    return EntryFacts(kind, status, time, end, summary[:255])


def patient_reference(resource: JSON) -> str | None:
    """The ``Patient/...`` reference a resource is about (None for Patient itself)."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return None
    if rtype == "Appointment":
        for p in resource.get("participant") or []:
            ref = _path(p, ("actor", "reference")) if isinstance(p, dict) else None
            if isinstance(ref, str) and "Patient/" in ref:
                return ref
        return None
    element = _SUBJECT.get(str(rtype), "subject") or "subject"
    ref = _path(resource, (element, "reference"))
    if isinstance(ref, str) and "Patient/" in ref:
        return ref
    if rtype == "Communication":
        for r in resource.get("recipient") or []:
            ref = _path(r, ("reference",)) if isinstance(r, dict) else None
            if isinstance(ref, str) and "Patient/" in ref:
                return ref
    return None
