"""Freed slots: a cancellation (or a rebooking) leaves a time the waitlist may take.

* :func:`slot_freed` records one (``freed_slots``, status ``open``), once per key.
* :func:`consume_cancellations` finds them on the timeline: a consumer of ``timeline_changes``
  with its own cursor (``outreach_cursors`` row ``waitlist``), like the outreach reconciler.
  An appointment whose status became ``cancelled`` (SIU S15 over HL7 v2, or a FHIR Appointment
  change) with a start still ahead frees its slot. The key says what was freed: the FHIR
  ``Slot`` reference when the Appointment names one (a second notice of the same cancellation,
  or the rebooking that cancelled it, finds the same key and changes nothing), else the
  cancelled entry and its start (:func:`freed_key`). Waitlist entries that were waiting to move
  up the cancelled appointment itself are withdrawn: the patient no longer holds it.

Ids in ``timeline_changes`` are handed out before commit, so the cursor waits on a gap for
``[outreach] gap_grace_s`` before stepping over it; on PostgreSQL the cursor row is locked
``FOR UPDATE SKIP LOCKED``, so one consumer advances it at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, select

from integration.db import dialect_insert, write_lock
from integration.logs import get_logger
from integration.models import (
    entry_sources,
    freed_slots,
    timeline_entries,
    waitlist_entries,
)
from integration.settings import Settings
from integration.timeline.consumers import advance, next_changes
from integration.waitlist.entries import end_entries, location_of, service_of, utc

__all__ = ["CURSOR", "consume_cancellations", "freed_key", "slot_freed", "slot_ref_of"]

log = get_logger("careloop.waitlist")

CURSOR = "waitlist"



def slot_ref_of(resource: Mapping[str, Any]) -> str | None:
    """``Slot/<id>`` of an Appointment's first ``slot`` reference, if any."""
    for ref in resource.get("slot") or []:
        reference = str((ref or {}).get("reference") or "") if isinstance(ref, Mapping) else ""
        if not reference:
            continue
        parts = reference.split("/")
        for i, part in enumerate(parts[:-1]):
            if part == "Slot" and parts[i + 1]:
                return f"Slot/{parts[i + 1]}"
        return reference[:512]
    return None


def freed_key(*, entry_id: str, start: datetime, slot_ref: str | None = None) -> str:
    """The key of a freed slot: the ``Slot`` reference when there is one, else
    ``entry:<entry id>:<start, UTC ISO 8601>`` (what a rebooking that cancels an appointment
    should use too, so that its later cancellation notice is the same slot)."""
    if slot_ref:
        return slot_ref[:255]
    return f"entry:{entry_id}:{utc(start).isoformat()}"


def slot_freed(
    conn: Connection,
    *,
    key: str,
    source: str,
    connection: str | None,
    slot_ref: str | None,
    service: str,
    location: str,
    start: datetime,
    end: datetime | None,
    now: datetime,
    min_notice: timedelta = timedelta(0),
) -> int | None:
    """Record a freed slot (status ``open``) in the caller's transaction; its id, or ``None``
    when the key was recorded before or the slot starts too soon (``start <= now +
    min_notice``) to be offered."""
    now, start = utc(now), utc(start)
    if start <= now + min_notice:
        return None
    if source not in ("hl7v2", "fhir", "rebooking"):
        raise ValueError(f"source must be hl7v2, fhir or rebooking, not {source!r}")
    f = freed_slots
    slot_id = conn.execute(
        dialect_insert(conn, f)
        .values(key=key[:255], source=source, connection=connection, slot_ref=slot_ref,
                service=service[:255], location=location[:255], start=start,
                end=utc(end) if end is not None else None, status="open", freed_at=now,
                updated_at=now)
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(f.c.id)
    ).scalar()
    if slot_id is None:
        return None
    log.info("slot_freed", source=source, connection=connection)
    return int(slot_id)


def consume_cancellations(engine: Engine, settings: Settings, *,
                          now: datetime | None = None) -> int:
    """Consume pending timeline changes (a batch per transaction) and free the slots of
    cancelled appointments; returns how many freed slots were recorded."""
    freed = 0
    while True:
        wall = datetime.now(UTC)
        at = utc(now) if now is not None else wall
        with write_lock(engine), engine.begin() as conn:
            result = _batch(conn, settings, at, wall)
        if result is None:
            break
        taken, count = result
        freed += count
        if taken == 0:
            break
    if freed:
        log.info("waitlist_slots_freed", count=freed)
    return freed


def _batch(conn: Connection, settings: Settings, now: datetime,
           wall: datetime) -> tuple[int, int] | None:
    """One batch: ``(changes consumed, slots freed)``; ``None`` when another consumer holds
    the cursor."""
    run = next_changes(conn, CURSOR, limit=settings.outreach.batch,
                       gap_grace_s=settings.outreach.gap_grace_s, wall=wall)
    if run is None:
        return None
    if not run.changes:
        return 0, 0
    cancelled = sorted({r.entry_id for r in run.changes if r.kind == "appointment"
                        and r.change in ("created", "updated") and r.status == "cancelled"})
    freed = _free(conn, settings, cancelled, now) if cancelled else 0
    advance(conn, CURSOR, run, wall=wall)
    return len(run.changes), freed


def _free(conn: Connection, settings: Settings, entry_ids: list[str], now: datetime) -> int:
    t = timeline_entries
    freed = 0
    ending: list[int] = []
    for start in range(0, len(entry_ids), 500):
        chunk = entry_ids[start : start + 500]
        entries = conn.execute(
            select(t.c.id, t.c.status, t.c.time, t.c.end_time, t.c.resource)
            .where(t.c.id.in_(chunk), t.c.kind == "appointment")
        ).all()
        sources: dict[str, list[str]] = {}
        for s in conn.execute(
            select(entry_sources.c.entry_id, entry_sources.c.connection)
            .where(entry_sources.c.entry_id.in_(chunk), entry_sources.c.system == "fhir")
            .order_by(entry_sources.c.id)
        ):
            sources.setdefault(s.entry_id, []).append(s.connection)
        w = waitlist_entries
        gone = [e.id for e in entries if e.status == "cancelled"]
        if gone:
            ending.extend(r.id for r in conn.execute(
                select(w.c.id).where(w.c.entry_id.in_(gone), w.c.status == "active")))
        for e in entries:
            if e.status != "cancelled" or e.time is None:
                continue  # booked again since (newest wins), or no time to offer
            resource = e.resource or {}
            slot_ref = slot_ref_of(resource)
            connection = sources.get(e.id, [None])[0]
            source = "fhir" if slot_ref or connection else "hl7v2"
            begin = utc(e.time)
            if slot_freed(conn, key=freed_key(entry_id=e.id, start=begin, slot_ref=slot_ref),
                          source=source, connection=connection, slot_ref=slot_ref,
                          service=service_of(resource), location=location_of(resource),
                          start=begin, end=utc(e.end_time) if e.end_time else None, now=now,
                          min_notice=settings.waitlist.min_notice) is not None:
                freed += 1
    if ending:
        end_entries(conn, ending, now=now)
    return freed
