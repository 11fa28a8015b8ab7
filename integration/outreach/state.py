"""What outreach knows about the present: entries, recipients and stored touches, read in bulk.

The reconciler, the sender (at the moment of sending) and ``careloop outreach preview`` all plan
from the same :class:`Snapshot`, loaded in the caller's transaction, so the three can never
disagree about what "current" means:

* each timeline entry as a planner :class:`~integration.outreach.planner.Entry` (a medication
  order with its last dispense);
* each patient as a :class:`~integration.outreach.policy.Recipient`: telecom (use, rank),
  ``Patient.communication`` (preferred first; PID-15 arrives as that), the given name; then
  ``patient_preferences`` on top (channel, language, time zone, opt-outs), including the rows of
  patients merged into this one (an opt-out under an old id still counts); and the addresses
  among its telecom that opted out (``address_optouts``: a STOP reply from that number);
* what the patient asked about each entry (``patient_requests``): the latest of confirm,
  cancel and reschedule decides; a cancel holds the entry's outreach for good, a reschedule
  until the entry's time changes (the clinic moved it);
* the touches stored for the entries, and the patient's other live touches (for the caps).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import ARRAY, ColumnElement, Connection, String, and_, any_, bindparam, or_, select

from integration.models import (
    address_optouts,
    patient_preferences,
    patient_requests,
    patients,
    timeline_entries,
    touches,
)
from integration.outreach.pathways import Organization, OutreachSettings, Pathway, Trigger
from integration.outreach.planner import Entry, Plan, plan
from integration.outreach.policy import ContactPoint, Recipient, normal_address

__all__ = [
    "FINAL",
    "HOLDING_ACTIONS",
    "LIVE",
    "PLANNED_KINDS",
    "OutreachConfig",
    "Snapshot",
    "StoredTouch",
    "applies",
    "entry_time_key",
    "load_snapshot",
    "one_of",
]

PLANNED_KINDS = ("appointment", "encounter", "medication", "careplan")
LIVE = ("scheduled", "sending", "sent")
"""Touches that count towards the caps."""
FINAL = ("sending", "sent", "failed")
"""Touches the planner must not plan again (a step goes out at most once)."""
_CHUNK = 1000
_CAP_WINDOW = timedelta(days=8)
HOLDING_ACTIONS = ("confirm", "cancel", "reschedule")
"""Patient requests that decide whether an entry's outreach is held (the latest one wins:
"X" then "C" is a patient who changed their mind)."""
_HELD = {"cancel": "the patient asked to cancel", "reschedule": "the patient asked to reschedule"}

# ISO 639-2 codes some senders put in PID-15 (table 0296 is user-defined).
_LANG3 = {"eng": "en", "spa": "es", "fra": "fr", "fre": "fr", "deu": "de", "ger": "de",
          "por": "pt", "ita": "it", "zho": "zh", "chi": "zh", "vie": "vi", "kor": "ko",
          "rus": "ru", "ara": "ar", "tgl": "tl", "pol": "pl", "hat": "ht", "jpn": "ja"}


@dataclass(frozen=True)
class OutreachConfig:
    """The settings outreach runs on, resolved once (time zone object, pathways by name)."""

    pathways: tuple[Pathway, ...]
    outreach: OutreachSettings = field(default_factory=OutreachSettings)
    default_language: str = "en"
    timezone: str = "UTC"
    organization: Organization = field(default_factory=Organization)
    by_name: Mapping[str, Pathway] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {p.name: p for p in self.pathways})

    @classmethod
    def from_settings(cls, settings: Any) -> OutreachConfig:
        return cls(
            pathways=tuple(settings.pathways),
            outreach=settings.outreach,
            default_language=settings.default_language,
            timezone=settings.timezone,
            organization=settings.organization,
        )

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.default_language, *self.outreach.languages)))

    def zone(self, name: str | None = None) -> ZoneInfo:
        for candidate in (name, self.timezone):
            if candidate:
                try:
                    return ZoneInfo(candidate)
                except (ZoneInfoNotFoundError, ValueError):
                    continue
        return ZoneInfo("UTC")


@dataclass
class StoredTouch:
    id: int
    key: str
    pathway: str
    step: int
    entry_id: str
    patient_id: str
    due_at: datetime | None
    moment: datetime | None
    channel: str
    address: str
    language: str
    template: str
    status: str
    reason: str | None
    attempts: int
    sent_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, r: Any) -> StoredTouch:
        return cls(
            id=r.id, key=r.key, pathway=r.pathway, step=r.step, entry_id=r.entry_id,
            patient_id=r.patient_id, due_at=aware(r.due_at), moment=aware(r.moment),
            channel=r.channel, address=r.address, language=r.language, template=r.template,
            status=r.status, reason=r.reason, attempts=r.attempts, sent_at=aware(r.sent_at),
            updated_at=aware(r.updated_at) or datetime.min.replace(tzinfo=UTC),
        )


def aware(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back: they were stored as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass
class Snapshot:
    entries: dict[str, Entry] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    recipients: dict[str, Recipient] = field(default_factory=dict)
    stored: dict[str, dict[str, StoredTouch]] = field(default_factory=dict)
    """entry id → key → touch (every status)."""
    live: dict[str, dict[str, tuple[str, datetime]]] = field(default_factory=dict)
    """patient id → key → (entry id, time) of touches counting towards the caps."""

    def recipient(self, config: OutreachConfig, patient_id: str) -> Recipient:
        found = self.recipients.get(patient_id)
        return found if found is not None else Recipient(patient_id, config.zone())

    def plan(
        self, config: OutreachConfig, entry_id: str, now: datetime, *, sending: str | None = None
    ) -> Plan:
        """Plan one entry against this snapshot. ``sending``: the key the sender is about to
        send (it is neither "already sent" nor a cap competitor of itself)."""
        entry = self.entries[entry_id]
        existing = self.stored.get(entry_id, {})
        final = {k for k, t in existing.items() if t.status in FINAL} - {sending}
        keep = {k for k, t in existing.items() if t.status == "scheduled"}
        if sending:
            keep.add(sending)
        live = self.live.get(entry.patient_id, {})
        others = [at for k, (eid, at) in live.items()
                  if k != sending and (eid != entry_id or k in final)]
        return plan(
            config.pathways, entry, self.recipient(config, entry.patient_id), now,
            settings=config.outreach, languages=config.languages,
            default_language=config.default_language, others=others, sent_keys=final,
            keep=keep,
        )

    def booked(self, patient_id: str, entry_id: str, kept: Mapping[str, datetime]) -> None:
        """After the reconciler applied a plan: the entry's live touches are now ``kept``
        (plus whatever it had sent), so later entries of the same batch see them."""
        live = self.live.setdefault(patient_id, {})
        existing = self.stored.get(entry_id, {})
        for key in [k for k, (eid, _) in live.items() if eid == entry_id]:
            if existing.get(key) is None or existing[key].status not in FINAL:
                del live[key]
        for key, at in kept.items():
            live[key] = (entry_id, at)


def applies(trigger: Trigger, entry: Entry) -> bool:
    """Whether a pathway is about this kind of entry at all: a skip is worth recording only
    then ("not an appointment", "the visit has not ended" are not news)."""
    if trigger is Trigger.APPOINTMENT:
        return entry.kind == "appointment"
    if trigger is Trigger.VISIT_END:
        return (entry.kind, entry.status) in (("appointment", "fulfilled"),
                                              ("encounter", "finished"))
    if trigger is Trigger.MEDICATION_REFILL:
        return entry.kind == "medication"
    return entry.kind == "careplan"


def one_of(conn: Connection, column: Any, values: list[str]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``= ANY(array)``, one statement whatever the count
    (an IN list of a new length is a new statement to parse and plan)."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam("values", values, type_=ARRAY(String)))  # type: ignore[no-any-return]
    return column.in_(values)  # type: ignore[no-any-return]


def _chunks(values: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), _CHUNK):
        yield list(values[start : start + _CHUNK])


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text if "T" in text or len(text) > 10 else text + "T00:00")
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_snapshot(
    conn: Connection,
    config: OutreachConfig,
    entry_ids: Iterable[str],
    now: datetime,
    *,
    lock: bool = False,
) -> Snapshot:
    """Read everything planning ``entry_ids`` needs, in bulk (one query per table and chunk).

    ``lock`` (PostgreSQL) takes ``FOR SHARE`` on the entries: the sender holds it while it
    sends, so a cancel cannot commit between the check and the send.
    """
    snap = Snapshot()
    ids = sorted(set(entry_ids))
    t = timeline_entries
    requests: list[Entry] = []
    for chunk in _chunks(ids):
        query = select(t.c.id, t.c.patient_id, t.c.kind, t.c.status, t.c.time, t.c.end_time,
                       t.c.summary, t.c.resource_type, t.c.resource)
        query = query.where(one_of(conn, t.c.id, chunk))
        if lock and conn.dialect.name == "postgresql":
            query = query.order_by(t.c.id).with_for_update(read=True)
        for r in conn.execute(query):
            if r.kind not in PLANNED_KINDS:
                continue
            if r.kind == "medication" and r.resource_type != "MedicationRequest":
                continue
            entry = Entry(r.id, r.patient_id, r.kind, r.status, aware(r.time),
                          aware(r.end_time), r.resource or {})
            snap.entries[r.id] = entry
            snap.summaries[r.id] = r.summary
            if r.resource_type == "MedicationRequest":
                requests.append(entry)
    if requests:
        _last_dispenses(conn, snap, requests)
    _held(conn, snap)
    patient_ids = sorted({e.patient_id for e in snap.entries.values()})
    _recipients(conn, config, snap, patient_ids)
    tt = touches
    for chunk in _chunks(list(snap.entries)):
        for row in conn.execute(select(tt).where(one_of(conn, tt.c.entry_id, chunk))):
            snap.stored.setdefault(row.entry_id, {})[row.key] = StoredTouch.from_row(row)
    since = now - _CAP_WINDOW
    for chunk in _chunks(patient_ids):
        rows = conn.execute(
            select(tt.c.key, tt.c.entry_id, tt.c.patient_id, tt.c.due_at, tt.c.sent_at)
            .where(one_of(conn, tt.c.patient_id, chunk), tt.c.status.in_(LIVE),
                   or_(tt.c.due_at >= since, tt.c.sent_at >= since))
        )
        for lv in rows:
            at = aware(lv.sent_at) or aware(lv.due_at)
            if at is not None:
                snap.live.setdefault(lv.patient_id, {})[lv.key] = (lv.entry_id, at)
    return snap


def _last_dispenses(conn: Connection, snap: Snapshot, requests: list[Entry]) -> None:
    """A MedicationDispense names its order in ``authorizingPrescription`` (or shares the
    prescription number): the latest one restarts the supply clock."""
    t = timeline_entries
    by_patient: dict[str, list[Entry]] = defaultdict(list)
    for entry in requests:
        by_patient[entry.patient_id].append(entry)
    latest: dict[str, datetime] = {}
    for chunk in _chunks(sorted(by_patient)):
        rows = conn.execute(
            select(t.c.patient_id, t.c.status, t.c.time, t.c.resource).where(
                one_of(conn, t.c.patient_id, chunk), t.c.resource_type == "MedicationDispense"
            )
        )
        for r in rows:
            if r.status in ("cancelled", "entered-in-error", "stopped", "declined", "deleted"):
                continue
            res = r.resource or {}
            when = _time(res.get("whenHandedOver")) or aware(r.time)
            refs = {str((p or {}).get("reference", "")).rsplit("/", 1)[-1]
                    for p in res.get("authorizingPrescription") or []}
            idents = {str(i.get("value")) for i in res.get("identifier") or []
                      if isinstance(i, dict) and i.get("value")}
            for entry in by_patient.get(r.patient_id, []):
                own = {str(i.get("value")) for i in entry.resource.get("identifier") or []
                       if isinstance(i, dict) and i.get("value")}
                if (entry.resource.get("id") in refs or idents & own) and when is not None:
                    latest[entry.id] = max(when, latest.get(entry.id, when))
    for entry_id, when in latest.items():
        e = snap.entries[entry_id]
        snap.entries[entry_id] = Entry(e.id, e.patient_id, e.kind, e.status, e.time, e.end,
                                       e.resource, last_dispense=when)


def _recipients(
    conn: Connection, config: OutreachConfig, snap: Snapshot, patient_ids: list[str]
) -> None:
    t = timeline_entries
    records: dict[str, tuple[tuple[bool, datetime], dict[str, Any]]] = {}
    aliases: dict[str, str] = {pid: pid for pid in patient_ids}
    for chunk in _chunks(patient_ids):
        for m in conn.execute(select(patients.c.id, patients.c.merged_into)
                              .where(one_of(conn, patients.c.merged_into, chunk))):
            aliases[m.id] = m.merged_into
        rows = conn.execute(
            select(t.c.patient_id, t.c.status, t.c.updated_at, t.c.resource)
            .where(and_(one_of(conn, t.c.patient_id, chunk), t.c.kind == "patient"))
        )
        for r in rows:
            # After a merge the survivor has two records: the replaced one (a stub from MRG)
            # never wins over a current one; among current ones the newest does.
            rank = (r.status not in ("replaced", "deleted", "entered-in-error"),
                    aware(r.updated_at) or datetime.min.replace(tzinfo=UTC))
            if r.patient_id not in records or rank > records[r.patient_id][0]:
                records[r.patient_id] = (rank, r.resource or {})
    prefs: dict[str, list[Any]] = defaultdict(list)
    p = patient_preferences
    for chunk in _chunks(sorted(aliases)):
        for r in conn.execute(select(p).where(one_of(conn, p.c.patient_id, chunk))):
            prefs[aliases[r.patient_id]].append(r)
    for pid in patient_ids:
        snap.recipients[pid] = recipient_for(
            config, pid, records.get(pid, (None, {}))[1], prefs.get(pid, [])
        )
    _blocked(conn, snap)


_ADDRESS_CHANNELS = {"email": ("email",), "phone": ("sms", "voice"), "sms": ("sms",)}


def _blocked(conn: Connection, snap: Snapshot) -> None:
    """Mark on each recipient the telecom addresses that opted out (per channel)."""
    wanted: dict[str, set[str]] = defaultdict(set)  # normal address -> patient ids
    for pid, recipient in snap.recipients.items():
        for cp in recipient.telecom:
            for channel in _ADDRESS_CHANNELS.get(cp.system, ()):
                wanted[normal_address(channel, cp.value)].add(pid)
    if not wanted:
        return
    found: dict[str, set[tuple[str, str]]] = defaultdict(set)
    o = address_optouts
    for chunk in _chunks(sorted(wanted)):
        for r in conn.execute(select(o.c.channel, o.c.address)
                              .where(one_of(conn, o.c.address, chunk))):
            for pid in wanted.get(r.address, ()):
                found[pid].add((r.channel, r.address))
    for pid, pairs in found.items():
        snap.recipients[pid] = replace(snap.recipients[pid], blocked=frozenset(pairs))


def _held(conn: Connection, snap: Snapshot) -> None:
    """The latest confirm / cancel / reschedule request of each entry; a cancel holds the
    entry, a reschedule holds it while its time is the one the patient asked about."""
    latest: dict[str, Any] = {}
    r = patient_requests
    for chunk in _chunks(sorted(snap.entries)):
        rows = conn.execute(
            select(r.c.id, r.c.entry_id, r.c.action, r.c.detail)
            .where(one_of(conn, r.c.entry_id, chunk), r.c.action.in_(HOLDING_ACTIONS))
            .order_by(r.c.id)
        )
        for row in rows:
            latest[row.entry_id] = row
    for entry_id, row in latest.items():
        reason = _HELD.get(row.action)
        if reason is None:
            continue
        entry = snap.entries[entry_id]
        if row.action == "reschedule":
            asked_about = (row.detail or {}).get("entry_time") if isinstance(
                row.detail, dict) else None
            if asked_about and entry.time is not None and asked_about != entry_time_key(
                    entry.time):
                continue  # the clinic moved it since: remind about the new time
        snap.entries[entry_id] = replace(entry, held=reason)


def entry_time_key(value: datetime) -> str:
    """An entry's time as recorded with a reschedule request (UTC ISO 8601), to tell later
    whether the clinic has moved the entry since."""
    return value.astimezone(UTC).isoformat()


def recipient_for(
    config: OutreachConfig, patient_id: str, resource: Mapping[str, Any], prefs: Sequence[Any]
) -> Recipient:
    """The patient as outreach sees them: the record's telecom, language and name, with the
    stored preferences on top (the survivor's row first, then merged patients')."""
    own = sorted(prefs, key=lambda r: r.patient_id != patient_id)
    telecom = []
    for cp in resource.get("telecom") or []:
        if not isinstance(cp, dict) or not cp.get("value"):
            continue
        rank = cp.get("rank")
        telecom.append(ContactPoint(str(cp.get("system") or "other"), str(cp["value"]),
                                    str(cp.get("use") or ""),
                                    rank if isinstance(rank, int) else None))
    opted_out: set[str] = set()
    for row in own:
        opted_out.update(str(c) for c in (row.opted_out or []))
    preferred = next((r.preferred_channel for r in own if r.preferred_channel), None)
    language = next((r.language for r in own if r.language), None) or _language(resource)
    zone = next((r.timezone for r in own if r.timezone), None)
    return Recipient(
        patient_id=patient_id,
        timezone=config.zone(zone),
        language=language,
        telecom=tuple(telecom),
        preferred_channel=preferred,
        opted_out=frozenset(opted_out),
        portal=preferred == "portal",
        given_name=_given(resource),
    )


def _language(resource: Mapping[str, Any]) -> str:
    comms = [c for c in resource.get("communication") or [] if isinstance(c, dict)]
    comms.sort(key=lambda c: not c.get("preferred"))
    for comm in comms:
        concept = comm.get("language") or {}
        for coding in concept.get("coding") or []:
            code = str((coding or {}).get("code") or "").strip()
            if code:
                return _LANG3.get(code.lower(), code)
        if concept.get("text"):
            return str(concept["text"])
    return ""


def _given(resource: Mapping[str, Any]) -> str:
    names = [n for n in resource.get("name") or [] if isinstance(n, dict)]
    names.sort(key=lambda n: n.get("use") not in ("usual", "official"))
    for name in names:
        given = name.get("given") or []
        if given:
            return str(given[0])
    return ""
