"""Everything careloop holds about one patient, for an access request (``careloop export``).

:func:`export_patient` yields plain JSON objects, one per row, each with a ``type``:

* ``patient`` first: the surviving id, the id asked for, the merged ids, every identifier of
  the patient and its merged patients (source references included), the merges, the
  patient's own preferences and the patient-page checks (never the link token's hash);
* ``timeline_entry`` (the newest FHIR resource, with its ``sources`` and ``keys``),
  ``timeline_change``, ``message`` (the HL7 v2 messages the entries came from: raw text, ACK
  and mapped resources);
* ``touch`` (with the body sent), ``patient_request``, ``channel_event`` (whose address is one
  of the patient's touch addresses, compared as replies are matched, or whose touch is one of
  the patient's, or that carried one of the patient's requests), ``address_optout`` for those
  addresses, ``booking``, ``waitlist_entry``, ``waitlist_offer``, ``ehr_outbox`` (the writes
  owed for those touches, events and requests) and ``audit_event`` (whose target is the
  patient or a merged id).

An old (merged) id resolves to the survivor, and the merged ids' rows are included. The
export is an access to personal data: :func:`write_export` records it in ``audit_events``
(action ``patient.export``, target the survivor) before the first line is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import Connection, Engine, Row, Table, insert, select

from integration.db import write_lock
from integration.identity import resolve_id
from integration.models import (
    address_optouts,
    audit_events,
    bookings,
    channel_events,
    ehr_outbox,
    entry_keys,
    entry_sources,
    inbox,
    mapped_resources,
    patient_identifiers,
    patient_merges,
    patient_preferences,
    patient_requests,
    patients,
    portal_access,
    timeline_changes,
    timeline_entries,
    touches,
    waitlist_entries,
    waitlist_offers,
)
from integration.replies.matching import address_expr, address_key

__all__ = ["EXPORT_ACTION", "UnknownPatient", "export_patient", "record_export", "write_export"]

JSON = dict[str, Any]
EXPORT_ACTION = "patient.export"
_CHUNK = 500
_MAX_HOPS = 32
_INBOX_REF = "inbox/"


class UnknownPatient(LookupError):
    """No patient has this id (nor was merged from it)."""


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return value


def _plain(row: Row[Any], *, drop: Sequence[str] = ()) -> JSON:
    return {k: _value(v) for k, v in row._mapping.items() if k not in drop}


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _rows(conn: Connection, table: Table, column: str, values: Iterable[Any],
          *, order: str = "id") -> list[Row[Any]]:
    """Rows of ``table`` whose ``column`` is one of ``values`` (chunked), by ``order``."""
    wanted = sorted(set(values), key=str)
    out: list[Row[Any]] = []
    for chunk in _chunks(wanted):
        out.extend(conn.execute(select(table).where(table.c[column].in_(chunk))))
    return sorted(out, key=lambda r: (r._mapping[order] is None, r._mapping[order]))


def _merged_ids(conn: Connection, survivor: str) -> list[str]:
    found: list[str] = []
    frontier = [survivor]
    for _ in range(_MAX_HOPS):
        rows = conn.execute(select(patients.c.id).where(patients.c.merged_into.in_(frontier))
                            .order_by(patients.c.id))
        frontier = [r.id for r in rows if r.id not in found and r.id != survivor]
        if not frontier:
            break
        found.extend(frontier)
    return found


def export_patient(conn: Connection, patient_id: str) -> Iterator[JSON]:
    """Every row careloop holds about ``patient_id`` (or the patient it was merged into).

    Raises :class:`UnknownPatient` at once (not on the first ``next``) for an unknown id.
    """
    survivor = resolve_id(conn, patient_id)
    if survivor is None:
        raise UnknownPatient(patient_id)
    return _records(conn, patient_id, survivor)


def _records(conn: Connection, requested: str, survivor: str) -> Iterator[JSON]:
    merged = _merged_ids(conn, survivor)
    ids = [survivor, *merged]

    yield {
        "type": "patient",
        "id": survivor,
        "requested_id": requested,
        "merged_ids": merged,
        "patients": [_plain(r) for r in _rows(conn, patients, "id", ids, order="created_at")],
        "identifiers": [_plain(r) for r in _rows(conn, patient_identifiers, "patient_id", ids)],
        "merges": [_plain(r) for r in _rows(conn, patient_merges, "survivor_id", ids)],
        "preferences": [_plain(r) for r in _rows(conn, patient_preferences, "patient_id", ids,
                                                 order="updated_at")],
        "portal_access": [_plain(r, drop=("token_hash",))
                          for r in _rows(conn, portal_access, "patient_id", ids,
                                         order="updated_at")],
    }

    # the timeline, and the messages it came from
    entries = _rows(conn, timeline_entries, "patient_id", ids, order="time")
    entry_ids = [r.id for r in entries]
    sources: dict[str, list[JSON]] = {}
    inbox_ids: set[int] = set()
    for s in _rows(conn, entry_sources, "entry_id", entry_ids):
        sources.setdefault(s.entry_id, []).append(_plain(s, drop=("entry_id",)))
        if s.system == "hl7v2" and s.ref.startswith(_INBOX_REF):
            number = s.ref[len(_INBOX_REF):].split("#", 1)[0]
            if number.isdigit():
                inbox_ids.add(int(number))
    keys: dict[str, list[JSON]] = {}
    for k in _rows(conn, entry_keys, "entry_id", entry_ids):
        keys.setdefault(k.entry_id, []).append(
            {"resource_type": k.resource_type, "system": k.system, "value": k.value})
    for e in entries:
        yield {"type": "timeline_entry", **_plain(e), "sources": sources.get(e.id, []),
               "keys": keys.get(e.id, [])}
    for c in _rows(conn, timeline_changes, "patient_id", ids):
        yield {"type": "timeline_change", **_plain(c)}
    resources: dict[int, list[JSON]] = {}
    for m in _rows(conn, mapped_resources, "inbox_id", inbox_ids):
        resources.setdefault(m.inbox_id, []).append(_plain(m, drop=("inbox_id",)))
    for i in _rows(conn, inbox, "id", inbox_ids):
        yield {"type": "message", **_plain(i, drop=("dedup_key",)),
               "mapped_resources": resources.get(i.id, [])}

    # outreach and what came back
    touch_rows = _rows(conn, touches, "patient_id", ids)
    for t in touch_rows:
        yield {"type": "touch", **_plain(t)}
    request_rows = _rows(conn, patient_requests, "patient_id", ids)
    for r in request_rows:
        yield {"type": "patient_request", **_plain(r)}

    addresses = sorted({address_key(t.address) for t in touch_rows if t.address.strip()})
    touch_keys = sorted({t.key for t in touch_rows})
    request_events = sorted({r.event_id for r in request_rows if r.event_id is not None})
    events: dict[int, Row[Any]] = {}
    ce = channel_events
    for chunk in _chunks(addresses):
        events.update((r.id, r) for r in conn.execute(
            select(ce).where(address_expr(ce.c.address).in_(chunk))))
    for r in _rows(conn, ce, "touch_key", touch_keys):
        events[r.id] = r
    for r in _rows(conn, ce, "id", request_events):
        events[r.id] = r
    for _, r in sorted(events.items()):
        yield {"type": "channel_event", **_plain(r)}
    optouts: list[Row[Any]] = []
    for chunk in _chunks(addresses):
        optouts.extend(conn.execute(
            select(address_optouts).where(address_expr(address_optouts.c.address).in_(chunk))))
    for o in sorted(optouts, key=lambda o: (o.at, o.channel, o.address)):
        yield {"type": "address_optout", **_plain(o)}

    # self-service
    for b in _rows(conn, bookings, "patient_id", ids):
        yield {"type": "booking", **_plain(b)}
    waitlist = _rows(conn, waitlist_entries, "patient_id", ids)
    for w in waitlist:
        yield {"type": "waitlist_entry", **_plain(w)}
    offers = {o.id: o for o in _rows(conn, waitlist_offers, "patient_id", ids)}
    offers.update((o.id, o) for o in _rows(conn, waitlist_offers, "waitlist_id",
                                           [w.id for w in waitlist]))
    for _, o in sorted(offers.items()):
        yield {"type": "waitlist_offer", **_plain(o)}

    # writes owed to (or made at) the EHR about them
    owed: dict[int, Row[Any]] = {}
    for column, values in (
        ("touch_id", [t.id for t in touch_rows]),
        ("event_id", list(events)),
        ("key", [f"request-{r.id}-{r.action}" for r in request_rows]),
    ):
        owed.update((r.id, r) for r in _rows(conn, ehr_outbox, column, values))
    for _, r in sorted(owed.items()):
        yield {"type": "ehr_outbox", **_plain(r)}

    # who read or changed their record
    for r in _rows(conn, audit_events, "target_id", ids):
        yield {"type": "audit_event", **_plain(r)}


def record_export(conn: Connection, *, requested: str, survivor: str, actor: str,
                  now: datetime | None = None) -> None:
    """Put an export of ``survivor``'s data on record (``audit_events``)."""
    conn.execute(insert(audit_events).values(
        at=now or datetime.now(UTC), actor=actor[:255], action=EXPORT_ACTION,
        target_type="Patient", target_id=survivor,
        detail={"requested_id": requested, "format": "ndjson"},
    ))


def write_export(engine: Engine, patient_id: str, out: IO[str], *, actor: str,
                 now: datetime | None = None) -> dict[str, int]:
    """Record the export, then write ``patient_id``'s data to ``out`` as NDJSON (one object
    per line). Lines written per ``type``. Raises :class:`UnknownPatient` before writing."""
    with engine.connect() as conn:
        survivor = resolve_id(conn, patient_id)
    if survivor is None:
        raise UnknownPatient(patient_id)
    with write_lock(engine), engine.begin() as conn:
        record_export(conn, requested=patient_id, survivor=survivor, actor=actor, now=now)
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        for record in export_patient(conn, patient_id):
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":"),
                                 default=str) + "\n")
            counts[record["type"]] = counts.get(record["type"], 0) + 1
    return counts
