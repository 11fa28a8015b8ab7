"""The waitlist itself: a patient asks for an earlier slot of the same service as an
appointment they hold (``waitlist_entries``).

A waitlist entry keeps what a freed slot must match, read from the appointment when the patient
joins: the service (``Appointment.serviceType``: the first coding's code, else the text or a
display), the location (the ``Location`` participant's reference, else its display), and the
window ``earliest`` (now plus ``[waitlist] min_notice``) to ``latest`` (the appointment's own
start: only earlier slots are worth offering). Matching is done on those keys; the labels shown
to the patient come from their own appointment (:func:`labels`), never from internal
references.

On SQLite the caller holds :func:`integration.db.write_lock`. On PostgreSQL the functions that
change rows other transactions also change take their row locks in one order (freed slots,
then offers, then waitlist entries), the order :mod:`integration.waitlist.offers` uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from integration.logs import get_logger
from integration.models import freed_slots, timeline_entries, waitlist_entries, waitlist_offers
from integration.settings import Settings
from integration.writeback.references import entry_fhir_connections

__all__ = [
    "HOLDING_STATUSES",
    "active_for",
    "fits",
    "join",
    "labels",
    "location_keys",
    "location_of",
    "service_keys",
    "service_of",
    "withdraw",
]

log = get_logger("careloop.waitlist")

HOLDING_STATUSES = frozenset({"proposed", "pending", "booked", "arrived", "checked-in",
                              "waitlist"})
"""Appointment statuses in which the patient still holds the appointment (may move it up)."""


def utc(value: datetime) -> datetime:
    """Stored times are UTC; SQLite gives them back naive."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _concept_code(concept: object) -> str:
    if not isinstance(concept, Mapping):
        return ""
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping) and coding.get("code"):
            return str(coding["code"])
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping) and coding.get("display"):
            return str(coding["display"])
    return ""


def _concept_label(concept: object) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping) and coding.get("display"):
            return str(coding["display"])
    return _concept_code(concept)


def _first_service(resource: Mapping[str, Any]) -> object:
    services = resource.get("serviceType") or []
    return services[0] if isinstance(services, list) and services else None


def service_of(resource: Mapping[str, Any]) -> str:
    """What a slot must offer: ``Appointment.serviceType[0]``'s first coding code, else its
    text or a display; ``""`` when the appointment names no service."""
    return _concept_code(_first_service(resource))[:255]


def _location_actor(resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for p in resource.get("participant") or []:
        actor = p.get("actor") if isinstance(p, Mapping) else None
        if not isinstance(actor, Mapping):
            continue
        reference = str(actor.get("reference") or "")
        if (reference.startswith("Location/") or "/Location/" in reference
                or actor.get("type") == "Location"):
            return actor
    return None


def location_of(resource: Mapping[str, Any]) -> str:
    """Where a slot must be: the ``Location`` participant's reference, else its display;
    ``""`` when the appointment names no location."""
    actor = _location_actor(resource)
    if actor is None:
        return ""
    return str(actor.get("reference") or actor.get("display") or "")[:255]


def service_keys(resource: Mapping[str, Any]) -> set[str]:
    """Every way the appointment names its service (codes, texts, displays of each
    ``serviceType``), case-folded: a slot freed by another part of careloop may name it by its
    display rather than its code."""
    keys: set[str] = set()
    for concept in resource.get("serviceType") or []:
        if not isinstance(concept, Mapping):
            continue
        if concept.get("text"):
            keys.add(str(concept["text"]).strip().casefold())
        for coding in concept.get("coding") or []:
            if isinstance(coding, Mapping):
                keys.update(str(coding[k]).strip().casefold() for k in ("code", "display")
                            if coding.get(k))
    return keys


def location_keys(resource: Mapping[str, Any]) -> set[str]:
    """The appointment's place as a reference and as a display, case-folded."""
    actor = _location_actor(resource)
    if actor is None:
        return set()
    return {str(actor[k]).strip().casefold() for k in ("reference", "display") if actor.get(k)}


def fits(slot_value: str, stored: str, keys: set[str]) -> bool:
    """Whether a freed slot's service (or place) is the waitlist entry's: either side not
    known, the value the entry was joined with, or any name of it in the appointment
    (``keys``, from :func:`service_keys` / :func:`location_keys`)."""
    if not slot_value.strip() or not stored.strip():
        return True
    wanted = slot_value.strip().casefold()
    return wanted == stored.strip().casefold() or wanted in keys


def labels(resource: Mapping[str, Any], *, location: str = "") -> tuple[str, str]:
    """``(service, location)`` as a patient can read them, from their own appointment.

    ``location``: the freed slot's location key; the appointment's location display is used
    when it is the same place (or the slot names none), a slot's own plain-text location when
    it is not a reference; never a ``Location/<id>`` reference."""
    service = _concept_label(_first_service(resource))
    actor = _location_actor(resource)
    own_key = location_of(resource)
    place = ""
    if actor is not None and (not location or location == own_key):
        place = str(actor.get("display") or "")
    elif location and "/" not in location:
        place = location
    return service, place


def _entry(conn: Connection, entry_id: str, *, lock: bool = False) -> Any:
    t = timeline_entries
    query = select(t.c.id, t.c.patient_id, t.c.kind, t.c.status, t.c.time, t.c.end_time,
                   t.c.resource).where(t.c.id == entry_id)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).first()


def join(conn: Connection, settings: Settings, *, patient_id: str, entry_id: str,
         now: datetime) -> int:
    """Put the patient on the waitlist for an earlier slot of the same service as the
    appointment ``entry_id`` (see the module docstring); returns the waitlist id.

    Idempotent: the patient's active waitlist entry for the same appointment is returned (its
    service, location and window refreshed from the appointment as it is now), never a second
    one. :class:`ValueError` when the entry is not an appointment of this patient that they
    still hold with a start time.
    """
    now = utc(now)
    entry = _entry(conn, entry_id, lock=True)  # serialises two joins of the same appointment
    if entry is None or entry.kind != "appointment":
        raise ValueError(f"entry {entry_id} is not an appointment on the timeline")
    if entry.patient_id != patient_id:
        raise ValueError(f"entry {entry_id} is not an appointment of patient {patient_id}")
    if entry.status not in HOLDING_STATUSES:
        raise ValueError(f"appointment {entry_id} is {entry.status}: nothing to move up")
    if entry.time is None:
        raise ValueError(f"appointment {entry_id} has no start time")
    resource = entry.resource or {}
    values = {
        "service": service_of(resource),
        "location": location_of(resource),
        "earliest": now + settings.waitlist.min_notice,
        "latest": utc(entry.time),
        "updated_at": now,
    }
    w = waitlist_entries
    existing = conn.execute(
        select(w.c.id).where(w.c.patient_id == patient_id, w.c.entry_id == entry_id,
                             w.c.status == "active").order_by(w.c.id)
    ).first()
    if existing is not None:
        conn.execute(update(w).where(w.c.id == existing.id).values(**values))
        return int(existing.id)
    connections = entry_fhir_connections(conn, entry_id)
    waitlist_id = int(conn.execute(
        insert(w).values(patient_id=patient_id, entry_id=entry_id,
                         connection=connections[0] if connections else None,
                         status="active", created_at=now, **values)
        .returning(w.c.id)
    ).scalar_one())
    log.info("waitlist_joined", patient_id=patient_id, entry_id=entry_id)
    return waitlist_id


def lock_slots_of(conn: Connection, waitlist_ids: Iterable[int]) -> None:
    """PostgreSQL: lock the freed slots the entries have live offers for, in id order, before
    their offers and the entries themselves are changed (the lock order of ``accept``)."""
    ids = sorted(set(waitlist_ids))
    if not ids or conn.dialect.name != "postgresql":
        return
    o = waitlist_offers
    slot_ids = sorted({r.slot_id for r in conn.execute(
        select(o.c.slot_id).where(o.c.waitlist_id.in_(ids), o.c.status == "offered"))})
    if slot_ids:
        conn.execute(select(freed_slots.c.id).where(freed_slots.c.id.in_(slot_ids))
                     .order_by(freed_slots.c.id).with_for_update())


def end_entries(conn: Connection, waitlist_ids: Iterable[int], *, now: datetime) -> int:
    """Withdraw active waitlist entries; their live offers are closed (``declined``) so the
    slots go to the next patients. Returns how many entries were withdrawn."""
    ids = sorted(set(waitlist_ids))
    if not ids:
        return 0
    now = utc(now)
    lock_slots_of(conn, ids)
    o, w = waitlist_offers, waitlist_entries
    conn.execute(update(o).where(o.c.waitlist_id.in_(ids), o.c.status == "offered")
                 .values(status="declined", responded_at=now))
    return int(conn.execute(
        update(w).where(w.c.id.in_(ids), w.c.status == "active")
        .values(status="withdrawn", updated_at=now)
    ).rowcount)


def withdraw(conn: Connection, *, waitlist_id: int, now: datetime) -> bool:
    """Take an entry off the waitlist; ``True`` when it was active. Its live offers are
    closed."""
    done = end_entries(conn, [waitlist_id], now=now) == 1
    if done:
        log.info("waitlist_withdrawn", count=1)
    return done


def active_for(conn: Connection, patient_id: str) -> list[Mapping[str, Any]]:
    """The patient's active waitlist entries, oldest first (for the patient's page): ``id``,
    ``entry_id``, ``service``, ``location``, ``earliest``, ``latest`` (aware UTC),
    ``created_at``..."""
    w = waitlist_entries
    rows = conn.execute(
        select(w).where(w.c.patient_id == patient_id, w.c.status == "active")
        .order_by(w.c.created_at, w.c.id)
    ).mappings()
    out: list[Mapping[str, Any]] = []
    for row in rows:
        item = dict(row)
        for key in ("earliest", "latest", "created_at", "updated_at"):
            if isinstance(item.get(key), datetime):
                item[key] = utc(item[key])
        out.append(item)
    return out
