"""Upserting resources onto the timeline: one entry per real-world thing, newest version wins.

:func:`apply_batch` takes the resources of many source versions (a batch of HL7 messages, or
FHIR resources) and, in the caller's transaction:

1. resolves every Patient (and every ``Patient/x`` reference) to a careloop patient
   (:class:`integration.identity.IdentityBook`), then applies merges;
2. finds each resource's entry by its business identifiers (``entry_keys``, per resource type:
   placer/filler ids, visit numbers, FHIR ``identifier``), by its source reference only when it
   has no identifier; a resource whose identifiers name two entries joins them into one;
3. applies the version if its ordinal is greater than the entry's (see
   :mod:`integration.timeline.source`), records it in ``entry_sources`` either way, and writes a
   ``timeline_changes`` row per change.

Replaying a version changes nothing: its ordinal equals the entry's and its source row exists.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, tuple_, update

from integration.db import dialect_insert
from integration.identity import (
    REF_SYSTEM_PREFIX,
    IdentityBook,
    IdentityRules,
    Key,
    PatientRecord,
    claim_keys,
    identifier_keys,
    reference_key,
)
from integration.logs import get_logger
from integration.models import entry_keys, entry_sources, timeline_changes, timeline_entries
from integration.timeline.facts import EntryFacts, facts_for, patient_reference
from integration.timeline.source import SourceRef, ordinal_for, ordinal_time

__all__ = ["Change", "apply", "apply_batch"]

log = get_logger("careloop.timeline")

JSON = dict[str, Any]
EntryKey = tuple[str, str, str]
"""(resource type, system, value)"""

_CHUNK = 1000


@dataclass(frozen=True)
class Change:
    """One change to the timeline, as written to ``timeline_changes``."""

    entry_id: str
    patient_id: str
    kind: str
    change: str
    """created | updated | moved (patient merge) | removed (joined into another entry)"""
    status: str
    at: datetime


@dataclass
class _Item:
    resource: JSON
    source: SourceRef
    facts: EntryFacts
    record: PatientRecord | None
    patient_key: Key | None
    idents: list[EntryKey]
    ref: EntryKey
    patient_id: str = ""


@dataclass
class _Entry:
    id: str
    patient_id: str
    kind: str
    status: str
    time: datetime
    end_time: datetime | None
    summary: str
    resource_type: str
    resource: JSON
    ordinal: str
    first_seen: datetime
    created_at: datetime
    updated_at: datetime
    new: bool = False
    dirty: bool = False
    into: str | None = None
    """Set when this entry was joined into another one."""
    changes: list[str] = field(default_factory=list)


def apply(
    conn: Connection,
    resources: list[JSON],
    source: SourceRef,
    now: datetime,
    rules: IdentityRules | None = None,
) -> list[Change]:
    """Apply one source version's resources (see :func:`apply_batch`)."""
    return apply_batch(conn, [(resources, source)], now, rules)


def apply_batch(
    conn: Connection,
    batch: Sequence[tuple[list[JSON], SourceRef]],
    now: datetime,
    rules: IdentityRules | None = None,
) -> list[Change]:
    """Apply many source versions in the caller's transaction; returns the changes made."""
    items = _items(batch)
    if not items:
        return []
    book = IdentityBook(conn, now, rules or IdentityRules())
    book.prepare(_patient_keys(items))
    links = _resolve_patients(book, items)
    book.flush()
    changes: list[Change] = []
    for survivor, replaced, source in links:
        if book.merge(survivor, replaced, source.system, source.ref):
            changes.extend(_move_entries(conn, book.survivor(survivor), replaced, now))
    for item in items:
        item.patient_id = book.survivor(item.patient_id)
    writer = _EntryWriter(conn, now)
    writer.prepare(items)
    for item in items:
        writer.apply(item)
    changes.extend(writer.flush())
    if changes:
        conn.execute(insert(timeline_changes), [_change_row(c) for c in changes])
    return changes


# --- building items ---------------------------------------------------------------------------


def _items(batch: Sequence[tuple[list[JSON], SourceRef]]) -> list[_Item]:
    items: list[_Item] = []
    for resources, source in batch:
        for res in resources:
            facts = facts_for(res, deleted=source.deleted)
            rtype, rid = res.get("resourceType"), res.get("id")
            if facts is None or not isinstance(rid, str) or not rid:
                continue
            idents = identifier_keys(res.get("identifier") or [], source.connection)
            ns = source.namespace
            alias = (f"{REF_SYSTEM_PREFIX}{ns}:{rtype}", rid[:255])
            record = None
            patient_key = None
            if rtype == "Patient":
                record = PatientRecord(idents, alias)
                for link in res.get("link") or []:
                    target = reference_key(ns, str((link.get("other") or {}).get("reference", "")))
                    if target is None or target == alias:
                        continue
                    if link.get("type") == "replaced-by":
                        record.replaced_by.append(target)
                    elif link.get("type") == "replaces":
                        record.replaces.append(target)
            else:
                ref = patient_reference(res)
                patient_key = reference_key(ns, ref) if ref else None
                if patient_key is None:
                    continue  # not about a patient: not on any timeline
            items.append(
                _Item(
                    resource=res,
                    source=source,
                    facts=facts,
                    record=record,
                    patient_key=patient_key,
                    idents=[(str(rtype), s, v) for s, v in idents],
                    ref=(str(rtype), alias[0], alias[1]),
                )
            )
    return items


def _patient_keys(items: Iterable[_Item]) -> set[Key]:
    keys: set[Key] = set()
    for item in items:
        if item.record is not None:
            keys.update(item.record.keys)
            keys.add(item.record.alias)
            keys.update(item.record.replaced_by)
            keys.update(item.record.replaces)
        elif item.patient_key is not None:
            keys.add(item.patient_key)
    return keys


def _resolve_patients(
    book: IdentityBook, items: list[_Item]
) -> list[tuple[str, str, SourceRef]]:
    """Give every item its patient; returns the merges asked for (survivor, replaced)."""
    links: list[tuple[str, str, SourceRef]] = []
    for item in items:
        if item.record is not None:
            item.patient_id = book.resolve(item.record)
        elif item.patient_key is not None:
            item.patient_id = book.patient_for_reference(item.patient_key)
    for item in items:
        record = item.record
        if record is None or item.source.deleted:
            continue
        for target in record.replaced_by:
            links.append((book.patient_for_reference(target), item.patient_id, item.source))
        for target in record.replaces:
            links.append((item.patient_id, book.patient_for_reference(target), item.source))
    return links


def _move_entries(conn: Connection, survivor: str, replaced: str, now: datetime) -> list[Change]:
    t = timeline_entries
    rows = conn.execute(
        update(t)
        .where(t.c.patient_id == replaced)
        .values(patient_id=survivor, updated_at=now)
        .returning(t.c.id, t.c.kind, t.c.status)
    ).all()
    return [Change(r.id, survivor, r.kind, "moved", r.status, now) for r in rows]


def _change_row(c: Change) -> dict[str, Any]:
    return {
        "entry_id": c.entry_id,
        "patient_id": c.patient_id,
        "kind": c.kind,
        "change": c.change,
        "status": c.status,
        "at": c.at,
    }


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- entries ------------------------------------------------------------------------------------


class _EntryWriter:
    """The entries one batch touches: claimed and locked first, changed in memory, written
    by :meth:`flush`."""

    def __init__(self, conn: Connection, now: datetime) -> None:
        self._conn = conn
        self._now = now
        self._owner: dict[EntryKey, str | None] = {}
        self._assign: dict[EntryKey, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._sources: list[dict[str, Any]] = []

    def prepare(self, items: list[_Item]) -> None:
        wanted = sorted({k for item in items for k in (*item.idents, item.ref)})
        claim_keys(
            self._conn,
            entry_keys,
            "entry_id",
            [{"resource_type": r, "system": s, "value": v} for r, s, v in wanted],
            ["resource_type", "system", "value"],
        )
        t = entry_keys
        for start in range(0, len(wanted), _CHUNK):
            rows = self._conn.execute(
                select(t.c.resource_type, t.c.system, t.c.value, t.c.entry_id).where(
                    tuple_(t.c.resource_type, t.c.system, t.c.value).in_(
                        wanted[start : start + _CHUNK]
                    )
                )
            )
            for r in rows:
                self._owner[(r.resource_type, r.system, r.value)] = r.entry_id
        self._load({e for e in self._owner.values() if e})

    def _load(self, ids: set[str]) -> None:
        todo = sorted(i for i in ids if i not in self._entries)
        t = timeline_entries
        for start in range(0, len(todo), _CHUNK):
            query = select(t).where(t.c.id.in_(todo[start : start + _CHUNK])).order_by(t.c.id)
            if self._conn.dialect.name == "postgresql":
                query = query.with_for_update()
            for r in self._conn.execute(query):
                self._entries[r.id] = _Entry(
                    id=r.id,
                    patient_id=r.patient_id,
                    kind=r.kind,
                    status=r.status,
                    time=_aware(r.time),
                    end_time=_aware(r.end_time) if r.end_time else None,
                    summary=r.summary,
                    resource_type=r.resource_type,
                    resource=r.resource,
                    ordinal=r.ordinal,
                    first_seen=_aware(r.first_seen),
                    created_at=_aware(r.created_at),
                    updated_at=_aware(r.updated_at),
                )

    def _final(self, entry_id: str) -> _Entry:
        entry = self._entries[entry_id]
        while entry.into is not None:
            entry = self._entries[entry.into]
        return entry

    def _owner_of(self, key: EntryKey) -> _Entry | None:
        eid = self._assign.get(key) or self._owner.get(key)
        if not eid:
            return None
        if eid not in self._entries:  # joined elsewhere meanwhile; load it (rare)
            self._load({eid})
        return self._final(eid)

    def apply(self, item: _Item) -> None:
        match = item.idents or [item.ref]
        found = list(
            {e.id: e for k in match if (e := self._owner_of(k)) is not None}.values()
        )
        ordinal = ordinal_for(item.source, item.resource, item.facts.status)
        at = ordinal_time(ordinal)
        if not found:
            entry = self._create(item, ordinal, at)
        else:
            entry = found[0]
            for other in found[1:]:
                self._join(other, entry)
            self._apply_version(entry, item, ordinal, at)
        for key in (*item.idents, item.ref):
            if self._owner_of(key) is None:
                self._assign[key] = entry.id
        self._sources.append(
            {
                "entry_id": entry.id,
                "system": item.source.system,
                "connection": item.source.connection,
                "ref": item.source.ref,
                "version": item.source.version,
                "ordinal": ordinal,
                "received_at": item.source.received_at or self._now,
            }
        )

    def _create(self, item: _Item, ordinal: str, at: datetime) -> _Entry:
        f = item.facts
        entry = _Entry(
            id=uuid.uuid4().hex,
            patient_id=item.patient_id,
            kind=f.kind,
            status=f.status,
            time=f.time or at,
            end_time=f.end,
            summary=f.summary,
            resource_type=str(item.resource["resourceType"]),
            resource=item.resource,
            ordinal=ordinal,
            first_seen=at,
            created_at=self._now,
            updated_at=self._now,
            new=True,
            dirty=True,
        )
        entry.changes.append("created")
        self._entries[entry.id] = entry
        return entry

    def _apply_version(self, entry: _Entry, item: _Item, ordinal: str, at: datetime) -> None:
        if at < entry.first_seen:
            entry.first_seen = at
            entry.dirty = True
        if ordinal > entry.ordinal:
            f = item.facts
            entry.patient_id = item.patient_id
            entry.kind, entry.status, entry.summary = f.kind, f.status, f.summary
            entry.time, entry.end_time = f.time or entry.first_seen, f.end
            entry.resource_type = str(item.resource["resourceType"])
            entry.resource, entry.ordinal = item.resource, ordinal
            entry.updated_at, entry.dirty = self._now, True
            if not {"created", "updated"} & set(entry.changes):
                entry.changes.append("updated")
        _retime(entry)

    def _join(self, other: _Entry, into: _Entry) -> None:
        """Two entries turned out to be one thing: ``other`` joins ``into``."""
        into.first_seen = min(into.first_seen, other.first_seen)
        if other.ordinal > into.ordinal:
            for name in ("patient_id", "kind", "status", "time", "end_time", "summary",
                         "resource_type", "resource", "ordinal"):
                setattr(into, name, getattr(other, name))
            into.updated_at = self._now
            if not {"created", "updated"} & set(into.changes):
                into.changes.append("updated")
        into.dirty = True
        _retime(into)
        other.into = into.id
        other.changes.append("removed")
        log.info("timeline_entries_joined", entry_id=into.id, replaced_id=other.id)

    def flush(self) -> list[Change]:
        conn, changes = self._conn, []
        entries = list(self._entries.values())
        new = [e for e in entries if e.new and e.into is None]
        if new:
            conn.execute(insert(timeline_entries), [_row(e) for e in new])
        dirty = [e for e in entries if e.dirty and not e.new and e.into is None]
        if dirty:
            conn.execute(
                _UPDATE_ENTRY,
                [{"eid": e.id, **{f"b_{c}": getattr(e, c) for c in _ENTRY_COLUMNS}}
                 for e in dirty],
            )
        t = entry_keys
        if self._assign:
            conn.execute(
                update(t)
                .where(t.c.resource_type == bindparam("k_type"),
                       t.c.system == bindparam("k_system"), t.c.value == bindparam("k_value"))
                .values(entry_id=bindparam("k_entry")),
                [{"k_type": r, "k_system": s, "k_value": v, "k_entry": self._final(e).id}
                 for (r, s, v), e in sorted(self._assign.items())],
            )
        unclaimed = [k for k, e in self._owner.items() if e is None and k not in self._assign]
        for start in range(0, len(unclaimed), _CHUNK):
            conn.execute(
                delete(t).where(
                    tuple_(t.c.resource_type, t.c.system, t.c.value).in_(
                        unclaimed[start : start + _CHUNK]),
                    t.c.entry_id.is_(None),
                )
            )
        for e in entries:
            if e.into is not None and not e.new:
                self._retire(e)
        sources = [{**s, "entry_id": self._final(s["entry_id"]).id} for s in self._sources]
        if sources:
            stmt = dialect_insert(conn, entry_sources).on_conflict_do_nothing(
                index_elements=["entry_id", "system", "ref"]
            )
            seen: set[tuple[str, str, str]] = set()
            unique = []
            for s in sources:
                k = (s["entry_id"], s["system"], s["ref"])
                if k not in seen:
                    seen.add(k)
                    unique.append(s)
            conn.execute(stmt, unique)
        for e in entries:
            if e.into is not None and e.new:
                continue
            final = self._final(e.id)
            for change in e.changes:
                changes.append(Change(e.id, final.patient_id, e.kind if e.into else final.kind,
                                      change, final.status, self._now))
        return changes

    def _retire(self, e: _Entry) -> None:
        """Move a joined entry's keys and sources to its survivor, then delete it."""
        conn, final = self._conn, self._final(e.id)
        conn.execute(update(entry_keys).where(entry_keys.c.entry_id == e.id)
                     .values(entry_id=final.id))
        existing = select(entry_sources.c.ref).where(entry_sources.c.entry_id == final.id)
        conn.execute(delete(entry_sources).where(
            entry_sources.c.entry_id == e.id, entry_sources.c.ref.in_(existing)))
        conn.execute(update(entry_sources).where(entry_sources.c.entry_id == e.id)
                     .values(entry_id=final.id))
        conn.execute(delete(timeline_entries).where(timeline_entries.c.id == e.id))



def _retime(entry: _Entry) -> None:
    """An entry whose newest version has no clinical time sits at its earliest version's."""
    winner = facts_for(entry.resource, deleted=entry.status == "deleted")
    if (winner is None or winner.time is None) and entry.time != entry.first_seen:
        entry.time = entry.first_seen
        entry.dirty = True


def _row(e: _Entry) -> dict[str, Any]:
    return {
        "id": e.id,
        "patient_id": e.patient_id,
        "kind": e.kind,
        "status": e.status,
        "time": e.time,
        "end_time": e.end_time,
        "summary": e.summary,
        "resource_type": e.resource_type,
        "resource": e.resource,
        "ordinal": e.ordinal,
        "first_seen": e.first_seen,
        "created_at": e.created_at,
        "updated_at": e.updated_at,
    }


_ENTRY_COLUMNS = (
    "patient_id",
    "kind",
    "status",
    "time",
    "end_time",
    "summary",
    "resource_type",
    "resource",
    "ordinal",
    "first_seen",
    "updated_at",
)

_UPDATE_ENTRY = (
    update(timeline_entries)
    .where(timeline_entries.c.id == bindparam("eid"))
    .values({c: bindparam(f"b_{c}") for c in _ENTRY_COLUMNS})
)
