"""Canonical dumps of what careloop stored, comparable across two databases fed the same input.

Database ids (patients, entries, rows) are random or depend on arrival order, so every dump is
keyed by what identifies a thing in the real world instead:

* a patient by its identifiers (``system|value``, sorted);
* a timeline entry by its kind and its business keys (``entry_keys``);
* a touch by its key with the entry id replaced by the entry's canonical key;
* a message's mapped resources by its sender and MSH-10.

Times are ISO strings in UTC; resources are compared as JSON with every careloop patient or entry
id inside them replaced by its canonical key. Volatile columns (created/updated/first_seen,
received_at, database ids, the inbox row id inside an HL7 source reference) are left out.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text

__all__ = ["Snapshot", "diff", "snapshot", "touch_outcome"]

_HEX_ID = re.compile(r"\b[0-9a-f]{32}\b")
_INBOX_REF = re.compile(r"^inbox/\d+#")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat()


def touch_outcome(status: str) -> str:
    """A touch's status as an outcome that does not depend on timing: ``cancelled`` (planned,
    then no longer wanted) and ``skipped`` (never planned) both mean "not sent", and which one a
    run records depends only on whether a reconcile ran between a booking and its
    cancellation."""
    return "not-sent" if status in ("cancelled", "skipped") else status


class Snapshot:
    """Canonical state of one database (see the module docstring)."""

    def __init__(self) -> None:
        self.patients: dict[str, str | None] = {}
        """patient key → the survivor's key when merged, else None"""
        self.entries: dict[str, dict[str, Any]] = {}
        self.touches: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, list[tuple[str, str, str]]] = {}
        """``sender|MSH-10`` → sorted (resource type, resource id, canonical JSON)"""
        self.counts: dict[str, int] = {}
        self.entry_key_of: dict[str, str] = {}
        self.patient_key_of: dict[str, str] = {}

    def canonical_json(self, value: object) -> str:
        """JSON text of ``value`` with careloop's patient and entry ids replaced by keys."""
        dumped = json.dumps(value, sort_keys=True, separators=(",", ":"))

        def swap(match: re.Match[str]) -> str:
            found = match.group(0)
            if found in self.patient_key_of:
                return f"<patient {self.patient_key_of[found]}>"
            if found in self.entry_key_of:
                return f"<entry {self.entry_key_of[found]}>"
            return found

        return _HEX_ID.sub(swap, dumped)


def _rows(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql)))


def snapshot(engine: Engine, *, with_messages: bool = True) -> Snapshot:
    """Read the canonical state of the database behind ``engine``."""
    snap = Snapshot()
    idents: dict[str, list[str]] = defaultdict(list)
    for r in _rows(engine, "SELECT patient_id, system, value FROM patient_identifiers"):
        idents[r.patient_id].append(f"{r.system}|{r.value}")
    patients = _rows(engine, "SELECT id, merged_into FROM patients")
    for p in patients:
        snap.patient_key_of[p.id] = (";".join(sorted(idents.get(p.id, [])))
                                     or f"(no identifier {p.id})")
    for p in patients:
        snap.patients[snap.patient_key_of[p.id]] = (
            snap.patient_key_of.get(p.merged_into) if p.merged_into else None)

    keys: dict[str, list[str]] = defaultdict(list)
    for r in _rows(engine, "SELECT entry_id, resource_type, system, value FROM entry_keys"):
        keys[r.entry_id].append(f"{r.resource_type}|{r.system}|{r.value}")
    sources: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for r in _rows(engine, "SELECT entry_id, system, connection, ref, version, ordinal "
                           "FROM entry_sources"):
        ref = _INBOX_REF.sub("inbox/#", r.ref)  # the row id depends on arrival order
        sources[r.entry_id].append((r.system, r.connection, ref, r.version, r.ordinal))
    entries = _rows(engine, "SELECT id, patient_id, kind, status, time, end_time, summary, "
                            "resource_type, resource, ordinal FROM timeline_entries")
    for e in entries:
        ident = ";".join(sorted(keys.get(e.id, []))) or "sources:" + ";".join(
            sorted("|".join(s[:3]) for s in sources.get(e.id, [])))
        snap.entry_key_of[e.id] = f"{e.kind}:{ident}"
    for e in entries:
        key = snap.entry_key_of[e.id]
        snap.entries[key] = {
            "patient": snap.patient_key_of.get(e.patient_id),
            "status": e.status,
            "time": _iso(e.time),
            "end": _iso(e.end_time),
            "summary": e.summary,
            "resource_type": e.resource_type,
            "resource": snap.canonical_json(e.resource),
            "ordinal": e.ordinal,
            "sources": sorted(sources.get(e.id, [])),
        }

    for t in _rows(engine, "SELECT key, entry_id, status, due_at, moment, channel, address, "
                           "language, template FROM touches"):
        entry = snap.entry_key_of.get(t.entry_id, f"(missing entry {t.entry_id})")
        key = t.key.replace(t.entry_id, f"<{entry}>")
        outcome = touch_outcome(t.status)
        snap.touches[key] = {"outcome": outcome} if outcome == "not-sent" else {
            "outcome": outcome, "due_at": _iso(t.due_at), "moment": _iso(t.moment),
            "channel": t.channel, "address": t.address, "language": t.language,
            "template": t.template,
        }

    if with_messages:
        grouped: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for r in _rows(engine, "SELECT i.sender, i.control_id, m.resource_type, m.resource_id, "
                               "m.resource FROM inbox i JOIN mapped_resources m "
                               "ON m.inbox_id = i.id"):
            grouped[f"{r.sender}|{r.control_id}"].append(
                (r.resource_type, r.resource_id, json.dumps(r.resource, sort_keys=True)))
        snap.messages = {k: sorted(v) for k, v in grouped.items()}

    for table in ("inbox", "mapped_resources", "patients", "patient_identifiers",
                  "timeline_entries", "entry_keys", "entry_sources", "timeline_changes",
                  "touches"):
        snap.counts[table] = int(_rows(engine, f"SELECT count(*) FROM {table}")[0][0])
    return snap


def diff(name: str, ours: Mapping[str, Any], theirs: Mapping[str, Any], *,
         limit: int = 8) -> list[str]:
    """Human-readable differences between two canonical mappings (empty when equal)."""
    out: list[str] = []
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    changed = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if only_ours:
        out.append(f"{name}: {len(only_ours)} only in the scale run, e.g. {only_ours[:limit]}")
    if only_theirs:
        out.append(f"{name}: {len(only_theirs)} only in the reference run, e.g. "
                   f"{only_theirs[:limit]}")
    for k in changed[:limit]:
        a, b = ours[k], theirs[k]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            fields = {f: (a.get(f), b.get(f)) for f in set(a) | set(b) if a.get(f) != b.get(f)}
            out.append(f"{name} {k}: scale != reference in {_short(fields)}")
        else:
            out.append(f"{name} {k}: scale {_short(a)} != reference {_short(b)}")
    if len(changed) > limit:
        out.append(f"{name}: {len(changed)} differ in all")
    return out


def _short(value: object, width: int = 600) -> str:
    text_ = repr(value)
    return text_ if len(text_) <= width else text_[:width] + "..."

