"""Patient identity: who a resource is about, by identifier, never by demographics.

* A patient is found by identifier ``system|value`` (``patient_identifiers``, unique). An
  identifier the mapping could not give a system (no ``[[hl7_senders]] identifier_systems``
  entry, no OID) only means something inside its sender, so it is keyed under a local system,
  ``urn:careloop:local:<sender>:<assigning authority>:<type code>`` (see :func:`local_system`):
  MRN 123 from sender A never matches MRN 123 from sender B.
* Source references are keys too: ``urn:careloop:ref:hl7v2:Patient|<mapped id>`` or
  ``urn:careloop:ref:fhir:<connection>:Patient|<EHR id>``, so ``Patient/x`` in an Appointment
  finds the patient its Patient resource resolved to (or creates one known by that reference
  alone, which its Patient joins later).
* When one resource's identifiers name several known patients careloop does not guess and does
  not merge: the patient named by the strongest ``authoritative_identifier_systems`` identifier
  wins, else the one named by the resource's first matching identifier (PID-3's first
  repetition: the sender's primary id); the other identifiers stay where they are, and an
  ``identity.conflict`` audit event records the patients involved for a person to review.
* Merges (ADT A34/A40/A47, FHIR ``Patient.link`` replaced-by / replaces) set the replaced
  patient's ``merged_into``; its entries move to the survivor, and its ids and identifiers keep
  resolving to the survivor (:func:`resolve_id` follows the chain). Each merge is a
  ``patient_merges`` row.
* No fuzzy demographic matching: two people with the same name and birth date are common, and
  a false match shows one person's record to another (worse than a duplicate, which a merge
  message fixes). A probabilistic rule would plug in at :meth:`IdentityBook.resolve`, where a
  resource with no identifier match currently creates a new patient.

Concurrency (PostgreSQL, several workers): every key a batch touches is claimed first, in one
sorted ``INSERT ... ON CONFLICT DO UPDATE ... WHERE false`` (inserted or locked, never written
twice), then the patients they name are locked ``FOR UPDATE`` in id order. Two workers with a
key in common therefore take turns, and, locks being taken in one global order (keys, then
patients, then timeline keys, then entries), they cannot wait on each other in a cycle.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Table, bindparam, false, insert, select, tuple_, update

from integration.db import dialect_insert
from integration.logs import get_logger
from integration.models import (
    audit_events,
    patient_identifiers,
    patient_merges,
    patients,
    timeline_entries,
)

__all__ = [
    "LOCAL_SYSTEM_PREFIX",
    "REF_SYSTEM_PREFIX",
    "IdentityBook",
    "IdentityRules",
    "Key",
    "PatientRecord",
    "claim_keys",
    "find_by_identifier",
    "identifier_keys",
    "local_system",
    "patient_summary",
    "reference_key",
    "resolve_id",
]

log = get_logger("careloop.identity")

JSON = dict[str, Any]
Key = tuple[str, str]
"""(system, value)"""

REF_SYSTEM_PREFIX = "urn:careloop:ref:"
LOCAL_SYSTEM_PREFIX = "urn:careloop:local:"
_MAX_HOPS = 32
_CHUNK = 1000


@dataclass(frozen=True)
class IdentityRules:
    authoritative_systems: tuple[str, ...] = ()
    """Strongest first; from the ``authoritative_identifier_systems`` setting."""


def local_system(scope: str, ident: JSON) -> str:
    """The system for an identifier without one: its sender, authority and type."""
    assigner = (ident.get("assigner") or {}).get("display", "")
    codings = (ident.get("type") or {}).get("coding") or [{}]
    type_code = codings[0].get("code", "") or (ident.get("type") or {}).get("text", "")
    parts = (scope or "-", assigner or "-", type_code or "-")
    return LOCAL_SYSTEM_PREFIX + ":".join(quote(p, safe="^") for p in parts)


def identifier_keys(identifiers: Iterable[JSON], scope: str) -> list[Key]:
    """``system|value`` keys of FHIR Identifiers, in order, without repeats."""
    keys: list[Key] = []
    for ident in identifiers:
        value = ident.get("value")
        if not isinstance(value, str) or not value:
            continue
        system = ident.get("system") or local_system(scope, ident)
        key = (system[:512], value[:255])
        if key not in keys:
            keys.append(key)
    return keys


def reference_key(namespace: str, reference: str, resource_type: str = "Patient") -> Key | None:
    """``Patient/x`` (or ``https://ehr/fhir/Patient/x``) → its reference key."""
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return (f"{REF_SYSTEM_PREFIX}{namespace}:{resource_type}", parts[-1][:255])
    if len(parts) >= 4 and parts[-2] == "_history" and parts[-4] == resource_type:
        return (f"{REF_SYSTEM_PREFIX}{namespace}:{resource_type}", parts[-3][:255])
    return None


@dataclass
class PatientRecord:
    """What one Patient resource says about identity."""

    keys: list[Key]
    """Its identifiers, in the resource's order."""
    alias: Key
    """Its own reference key."""
    replaced_by: list[Key] = field(default_factory=list)
    replaces: list[Key] = field(default_factory=list)



def claim_keys(
    conn: Connection, table: Table, target: str, rows: Sequence[dict[str, Any]], unique: list[str]
) -> None:
    """Insert ``rows`` (sorted, unique) with ``target`` NULL, or lock the ones that exist.

    On PostgreSQL ``ON CONFLICT DO UPDATE ... WHERE false`` locks an existing row without
    writing it, so after this call the transaction holds every key it will use.
    """
    if not rows:
        return
    stmt = dialect_insert(conn, table)
    if conn.dialect.name == "postgresql":
        stmt = stmt.on_conflict_do_update(
            index_elements=unique, set_={target: table.c[target]}, where=false()
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=unique)
    # executemany: SQLAlchemy sends the rows as multi-row INSERTs, in order (the lock order).
    conn.execute(stmt, list(rows))


class IdentityBook:
    """Identity for one transaction: loaded once, resolved in memory, written by :meth:`flush`."""

    def __init__(self, conn: Connection, now: datetime, rules: IdentityRules) -> None:
        self._conn = conn
        self._now = now
        self._rules = rules
        self._owner: dict[Key, str | None] = {}
        self._merged: dict[str, str | None] = {}
        self._new_patients: list[str] = []
        self._assign: dict[Key, str] = {}
        self.warnings: list[str] = []

    # --- loading ------------------------------------------------------------------------------

    def prepare(self, keys: Iterable[Key]) -> None:
        """Claim and lock ``keys`` and the patients they name (see the module docs)."""
        wanted = sorted(set(keys))
        claim_keys(
            self._conn,
            patient_identifiers,
            "patient_id",
            [{"system": s, "value": v, "created_at": self._now} for s, v in wanted],
            ["system", "value"],
        )
        t = patient_identifiers
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            rows = self._conn.execute(
                select(t.c.system, t.c.value, t.c.patient_id).where(
                    tuple_(t.c.system, t.c.value).in_(chunk)
                )
            )
            for r in rows:
                self._owner[(r.system, r.value)] = r.patient_id
        self._lock({p for p in self._owner.values() if p})

    def _lock(self, ids: set[str]) -> None:
        """Lock patient rows (id order) and follow their merges, locking survivors too."""
        todo = sorted(i for i in ids if i not in self._merged)
        hops = 0
        while todo and hops < _MAX_HOPS:
            query = select(patients.c.id, patients.c.merged_into).where(patients.c.id.in_(todo))
            if self._conn.dialect.name == "postgresql":
                query = query.order_by(patients.c.id).with_for_update()
            found = {r.id: r.merged_into for r in self._conn.execute(query)}
            self._merged.update(found)
            todo = sorted({m for m in found.values() if m and m not in self._merged})
            hops += 1

    def survivor(self, patient_id: str) -> str:
        seen = 0
        while seen < _MAX_HOPS:
            nxt = self._merged.get(patient_id)
            if not nxt:
                return patient_id
            if nxt not in self._merged:
                self._lock({nxt})
            patient_id = nxt
            seen += 1
        return patient_id

    def owner(self, key: Key) -> str | None:
        """The (surviving) patient a key names, or None."""
        pid = self._assign.get(key) or self._owner.get(key)
        return self.survivor(pid) if pid else None

    # --- resolving ------------------------------------------------------------------------------

    def resolve(self, record: PatientRecord) -> str:
        """The patient a Patient resource is about; new keys are given to it."""
        matches: list[tuple[Key, str]] = [
            (k, p) for k in record.keys if (p := self.owner(k)) is not None
        ]
        if not matches:
            alias_owner = self.owner(record.alias)
            if alias_owner is not None:
                matches = [(record.alias, alias_owner)]
        distinct = list(dict.fromkeys(p for _, p in matches))
        chosen = self._choose(matches, distinct) if distinct else self._create()
        for key in (*record.keys, record.alias):
            if self.owner(key) is None:
                self._assign[key] = chosen
        return chosen

    def _choose(self, matches: list[tuple[Key, str]], distinct: list[str]) -> str:
        if len(distinct) == 1:
            return distinct[0]
        chosen = distinct[0]
        for system in self._rules.authoritative_systems:
            hit = next((p for (s, _), p in matches if s == system), None)
            if hit is not None:
                chosen = hit
                break
        others = [p for p in distinct if p != chosen]
        self.warnings.append(f"identity conflict: chose {chosen} over {', '.join(others)}")
        log.warning("identity_conflict", patient_id=chosen, count=len(others))
        self._conn.execute(
            insert(audit_events).values(
                at=self._now,
                actor="careloop",
                action="identity.conflict",
                target_type="Patient",
                target_id=chosen,
                detail={"other_patients": others,
                        "systems": sorted({s for (s, _), _ in matches})},
            )
        )
        return chosen

    def patient_for_reference(self, key: Key) -> str:
        """The patient a ``Patient/x`` reference names; a new one known by it alone if none."""
        owner = self.owner(key)
        if owner is not None:
            return owner
        chosen = self._create()
        self._assign[key] = chosen
        return chosen

    def _create(self) -> str:
        pid = uuid.uuid4().hex
        self._new_patients.append(pid)
        self._merged[pid] = None
        return pid

    # --- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write new patients and key assignments; drop claimed keys nobody took."""
        if self._new_patients:
            self._conn.execute(
                insert(patients),
                [{"id": p, "created_at": self._now} for p in self._new_patients],
            )
            self._new_patients = []
        t = patient_identifiers
        if self._assign:
            self._conn.execute(
                update(t)
                .where(t.c.system == bindparam("k_system"), t.c.value == bindparam("k_value"))
                .values(patient_id=bindparam("k_patient")),
                [{"k_system": s, "k_value": v, "k_patient": p}
                 for (s, v), p in sorted(self._assign.items())],
            )
        for key, pid in self._assign.items():
            self._owner[key] = pid
        self._assign = {}
        unclaimed = [k for k, p in self._owner.items() if p is None]
        for start in range(0, len(unclaimed), _CHUNK):
            self._conn.execute(
                t.delete().where(
                    tuple_(t.c.system, t.c.value).in_(unclaimed[start : start + _CHUNK]),
                    t.c.patient_id.is_(None),
                )
            )
        for key in unclaimed:
            self._owner.pop(key, None)

    def merge(self, survivor: str, replaced: str, source_system: str, source_ref: str) -> bool:
        """Merge ``replaced`` into ``survivor`` (after :meth:`flush`); False when nothing to do.

        The caller moves the replaced patient's timeline entries (it records the changes).
        """
        survivor, replaced = self.survivor(survivor), self.survivor(replaced)
        if survivor == replaced:
            return False
        self._conn.execute(
            update(patients)
            .where(patients.c.id == replaced)
            .values(merged_into=survivor, merged_at=self._now)
        )
        self._merged[replaced] = survivor
        stmt = dialect_insert(self._conn, patient_merges).on_conflict_do_nothing(
            index_elements=["replaced_id"]
        )
        self._conn.execute(
            stmt.values(
                survivor_id=survivor,
                replaced_id=replaced,
                at=self._now,
                source_system=source_system,
                source_ref=source_ref[:512],
            )
        )
        log.info("patient_merged", patient_id=survivor, replaced_id=replaced)
        return True


# --- reads ------------------------------------------------------------------------------------


def resolve_id(conn: Connection, patient_id: str) -> str | None:
    """The surviving patient for ``patient_id`` (itself unless merged); None if unknown."""
    current = patient_id
    for _ in range(_MAX_HOPS):
        row = conn.execute(
            select(patients.c.merged_into).where(patients.c.id == current)
        ).first()
        if row is None:
            return None
        if not row.merged_into:
            return current
        current = row.merged_into
    return current


def find_by_identifier(conn: Connection, system: str, value: str) -> str | None:
    """The surviving patient an identifier names, or None."""
    row = conn.execute(
        select(patient_identifiers.c.patient_id).where(
            patient_identifiers.c.system == system,
            patient_identifiers.c.value == value,
            patient_identifiers.c.patient_id.is_not(None),
        )
    ).first()
    return resolve_id(conn, row.patient_id) if row is not None else None


def _merged_ids(conn: Connection, survivor: str) -> list[str]:
    """Every patient merged (directly or through a chain) into ``survivor``."""
    found: list[str] = []
    frontier = [survivor]
    for _ in range(_MAX_HOPS):
        rows = conn.execute(select(patients.c.id).where(patients.c.merged_into.in_(frontier)))
        frontier = [r.id for r in rows if r.id not in found]
        if not frontier:
            break
        found.extend(frontier)
    return found


def patient_summary(conn: Connection, survivor: str) -> JSON:
    """A patient's id, its identifiers (its own and its merged patients') and its merges."""
    merged = _merged_ids(conn, survivor)
    ids = [survivor, *merged]
    t = patient_identifiers
    rows = conn.execute(
        select(t.c.system, t.c.value)
        .where(t.c.patient_id.in_(ids), t.c.system.not_like(REF_SYSTEM_PREFIX + "%"))
        .order_by(t.c.id)
    )
    merges = conn.execute(
        select(patient_merges.c.replaced_id, patient_merges.c.survivor_id, patient_merges.c.at)
        .where(patient_merges.c.survivor_id.in_(ids))
        .order_by(patient_merges.c.id)
    )
    created = conn.execute(select(patients.c.created_at).where(patients.c.id == survivor)).scalar()
    entries = conn.execute(
        select(timeline_entries.c.id).where(timeline_entries.c.patient_id == survivor).limit(1)
    ).first()
    return {
        "id": survivor,
        "identifiers": [{"system": r.system, "value": r.value} for r in rows],
        "merged": [
            {"id": m.replaced_id, "into": m.survivor_id, "at": _iso(m.at)} for m in merges
        ],
        "created_at": _iso(created),
        "has_timeline": entries is not None,
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
