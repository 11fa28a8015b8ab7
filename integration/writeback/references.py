"""How a write-back names the patient and the entry in the EHR it goes to.

The best reference is literal (``Patient/<EHR id>``, ``Appointment/<EHR id>``): careloop knows
it when the patient or the entry came from that EHR over FHIR. Otherwise a logical reference by
business identifier (an MRN, a filler order number) lets the EHR, or the staff reading it, find
the record. Identifiers careloop made up for itself (``urn:careloop:ref:`` source references)
mean nothing to an EHR and are never used; one without a system of its own (kept by careloop
as ``urn:careloop:local:<sender>:<authority>:<type>``) is given as its value, type and assigner,
like the sender wrote it, only when nothing better exists (``identifier_systems`` in
``[[hl7_senders]]`` gives such identifiers a real system).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from sqlalchemy import Connection, select

from integration.identity import LOCAL_SYSTEM_PREFIX, REF_SYSTEM_PREFIX, resolve_id
from integration.models import (
    entry_keys,
    entry_sources,
    patient_identifiers,
    patients,
    timeline_entries,
)

__all__ = [
    "entry_fhir_connections",
    "entry_reference",
    "entry_resource_type",
    "fhir_ref",
    "patient_reference",
]

JSON = dict[str, Any]


def fhir_ref(ref: str) -> str | None:
    """``Type/id`` of an ``entry_sources.ref`` (``Appointment/7/_history/3``,
    ``Appointment/7@...``, ``Appointment/7/_deleted@...``)."""
    parts = ref.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    rid = parts[1].split("@", 1)[0]
    return f"{parts[0]}/{rid}" if rid else None


def _logical(system: str, value: str) -> JSON | None:
    """A FHIR Identifier for ``system|value``; ``None`` for careloop's own references."""
    if system.startswith(REF_SYSTEM_PREFIX):
        return None
    if not system.startswith(LOCAL_SYSTEM_PREFIX):
        return {"system": system, "value": value}
    parts = system[len(LOCAL_SYSTEM_PREFIX):].rsplit(":", 2)
    ident: JSON = {}
    if len(parts) == 3:
        authority, type_code = unquote(parts[1]), unquote(parts[2])
        if type_code and type_code != "-":
            ident["type"] = {"text": type_code}
        ident["value"] = value
        if authority and authority != "-":
            ident["assigner"] = {"display": authority}
    else:
        ident["value"] = value
    return ident


def _patient_ids(conn: Connection, patient_id: str) -> list[str]:
    """The surviving patient first, then the ones merged into it (their identifiers stay
    theirs and still name the survivor)."""
    survivor = resolve_id(conn, patient_id) or patient_id
    merged = sorted(r.id for r in conn.execute(
        select(patients.c.id).where(patients.c.merged_into == survivor)))
    return [survivor, *merged]


def patient_reference(conn: Connection, patient_id: str, connection: str) -> JSON:
    """How the EHR behind ``connection`` knows the patient (merges followed to the survivor):

    1. ``{"reference": "Patient/<id>"}`` when careloop has that EHR's own Patient id;
    2. ``{"identifier": ...}`` with the patient's first identifier that has a real system
       (stable order: by row id);
    3. ``{"identifier": ...}`` with the first identifier the sender gave without a system
       (value, type and assigner as sent).

    :class:`ValueError` when the patient is unknown or has no identifier at all.
    """
    ids = _patient_ids(conn, patient_id)
    t = patient_identifiers
    rows = conn.execute(
        select(t.c.system, t.c.value, t.c.patient_id).where(t.c.patient_id.in_(ids))
        .order_by(t.c.id)
    ).all()
    if not rows:
        raise ValueError(f"patient {patient_id} has no identifier an EHR could know it by")
    own = f"{REF_SYSTEM_PREFIX}fhir:{connection}:Patient"
    rank = {pid: n for n, pid in enumerate(ids)}
    ordered = sorted(rows, key=lambda r: rank.get(r.patient_id, len(ids)))
    for r in ordered:
        if r.system == own:
            return {"reference": f"Patient/{r.value}"}
    for local in (False, True):
        for r in ordered:
            if r.system.startswith(LOCAL_SYSTEM_PREFIX) != local:
                continue
            ident = _logical(r.system, r.value)
            if ident is not None:
                return {"identifier": ident}
    raise ValueError(f"patient {patient_id} has no identifier an EHR could know it by")


def entry_fhir_connections(conn: Connection, entry_id: str) -> list[str]:
    """The EHR connections an entry came from over FHIR, first seen first."""
    rows = conn.execute(
        select(entry_sources.c.connection).where(
            entry_sources.c.entry_id == entry_id, entry_sources.c.system == "fhir")
        .order_by(entry_sources.c.id)
    )
    return list(dict.fromkeys(r.connection for r in rows))


def entry_resource_type(conn: Connection, entry_id: str) -> str | None:
    """The FHIR resource type of a timeline entry (``Appointment``, ``CarePlan``...)."""
    row = conn.execute(
        select(timeline_entries.c.resource_type).where(timeline_entries.c.id == entry_id)
    ).first()
    return str(row.resource_type) if row is not None else None


def entry_reference(
    conn: Connection, entry_id: str, connection: str | None
) -> tuple[JSON | None, str | None]:
    """``(reference, source_connection)`` for a timeline entry in the EHR behind
    ``connection`` (``None``: whichever EHR the entry came from over FHIR, if any).

    A literal ``Type/id`` when the entry came from that EHR over FHIR (``source_connection``
    is then its name); else ``{"type": ..., "identifier": ...}`` from the entry's first
    business identifier (by row id; real systems before system-less ones); ``(None, None)``
    when neither exists.
    """
    query = select(entry_sources.c.connection, entry_sources.c.ref).where(
        entry_sources.c.entry_id == entry_id, entry_sources.c.system == "fhir")
    if connection is not None:
        query = query.where(entry_sources.c.connection == connection)
    for source in conn.execute(query.order_by(entry_sources.c.id.desc())):
        literal = fhir_ref(source.ref)
        if literal is not None:
            return {"reference": literal}, str(source.connection)
    t = entry_keys
    rows = conn.execute(
        select(t.c.resource_type, t.c.system, t.c.value).where(t.c.entry_id == entry_id)
        .order_by(t.c.id)
    ).all()
    for local in (False, True):
        for r in rows:
            if r.system.startswith(LOCAL_SYSTEM_PREFIX) != local:
                continue
            ident = _logical(r.system, r.value)
            if ident is not None:
                return {"type": r.resource_type, "identifier": ident}, None
    return None, None
