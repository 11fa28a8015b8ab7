"""Offering freed slots to the waitlist, and the race to accept one.

:func:`offer_round` (the waitlist stage runs it every few seconds) walks the open freed slots:

* a slot that now starts within ``[waitlist] min_notice`` is ``expired``, with its offers;
* offers past ``expires_at`` are ``expired``; offers whose waitlist entry is no longer active
  (the patient withdrew, or took another slot) are closed (``declined``);
* a slot with no live offer goes to the next wave (``[waitlist] wave``) of active waitlist
  entries that fit: the same service and location (the code or reference the entry was joined
  with, or any name of them in the patient's appointment; or either not known),
  ``earliest <= start``
  and a start earlier than ``latest`` (the appointment the patient holds), not offered this
  slot before, first come first served. Each is reached as the outreach policy decides
  (preferred channel, then SMS, email, voice; opted-out channels and addresses passed over);
  patients in their quiet hours now, or with no channel, are skipped this round (a later round
  may reach them);
* the offers are committed (the slot is ``offering``), then sent, each once (key
  ``offer:<offer id>``), with a link to the offer's page (``/p/o<id>...``), and written back to
  the EHR as a Communication (key ``offer-<offer id>``). An offer that could not be sent is
  ``expired`` at once, so the next round asks the next patients.

:func:`accept` is the race: one guarded ``UPDATE freed_slots SET status='filled' WHERE
status IN ('open', 'offering')`` decides it, in the transaction that marks the offer
``accepted``, the waitlist entry ``booked`` and the slot's other offers ``taken``. On
PostgreSQL the slot row is locked first (``FOR UPDATE``), so two acceptances in two processes
take turns and the second sees ``filled``; on SQLite the write lock serialises them. The winner
then books: through the scheduling service where the slot is an EHR ``Slot`` and the connection
lets careloop book (``scheduling = "slots"``), else as a reschedule request for staff (a Task),
recorded in the same transaction. When the EHR refuses the booking the slot is ``withdrawn``,
the offer ``taken`` and the patient back on the waitlist. The other patients offered the slot
are told it was taken (key ``offer-taken:<their offer id>``), unless it is night for them
(their quiet hours) or they opted out since: their offer's page says so in any case.

Lock order on PostgreSQL, everywhere: freed slot, then offers, then waitlist entries, then
timeline entries; the round takes slots with ``SKIP LOCKED`` and never waits for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Connection, Engine, and_, or_, select, update

from adapters.channels import Channel, OutgoingMessage
from integration.db import dialect_insert, write_lock
from integration.delivery import link_signer
from integration.logs import get_logger
from integration.metrics import count_waitlist_offer
from integration.models import (
    freed_slots,
    patient_preferences,
    timeline_entries,
    waitlist_entries,
    waitlist_offers,
)
from integration.outreach.policy import Recipient, choose_channel, in_quiet_hours
from integration.outreach.state import OutreachConfig, Snapshot, load_snapshot
from integration.portal.links import LinkSigner
from integration.replies.effects import record_request
from integration.settings import Settings
from integration.waitlist.entries import (
    HOLDING_STATUSES,
    fits,
    labels,
    location_keys,
    service_keys,
    utc,
)
from integration.waitlist.texts import (
    Outcome,
    clock_text,
    offer_message,
    outcome_text,
    taken_message,
    text_language,
    when_text,
)
from integration.writeback import enqueue, entry_reference, patient_reference
from integration.writeback.outbox import write_back_connection
from integration.writeback.resources import fhir_instant, medium

__all__ = [
    "FALLBACK",
    "AcceptOutcome",
    "OfferRound",
    "Rebooker",
    "accept",
    "decline",
    "offer_round",
    "offer_view",
]

log = get_logger("careloop.waitlist")

FALLBACK = ("sms", "email", "voice")
"""The channel order when the patient states no usable preference (the portal page is not a
way to reach someone about a slot that goes in minutes)."""
_LIVE_SLOT = ("open", "offering")
_PAGE = 200
"""Waitlist entries read at a time while filling a wave."""


class Rebooker(Protocol):
    """What :func:`accept` needs of :class:`integration.scheduling.SchedulingService`."""

    async def rebook(self, *, patient_id: str, entry_id: str, slot: str, source: str,
                     now: datetime) -> Any: ...


@dataclass
class OfferRound:
    offered: int = 0
    """Offers sent this round."""
    expired: int = 0
    """Offers that expired this round (past ``expires_at``, or their slot became too close)."""
    skipped: int = 0
    """Fitting patients passed over this round: in quiet hours now, or no channel reaches
    them."""


@dataclass(frozen=True)
class AcceptOutcome:
    status: str
    """``booked`` | ``requested`` | ``taken`` | ``expired`` | ``invalid``."""
    slot_start: datetime | None
    message: str
    """What the patient page says, in the patient's language."""


@dataclass
class _Message:
    kind: str  # offer | taken
    offer_id: int
    patient_id: str
    entry_id: str | None
    channel: str
    address: str
    language: str
    subject: str
    body: str
    slot_id: int = 0

    @property
    def key(self) -> str:
        return f"offer:{self.offer_id}" if self.kind == "offer" else f"offer-taken:{self.offer_id}"

    @property
    def writeback_key(self) -> str:
        return f"offer-{self.offer_id}" if self.kind == "offer" else f"offer-taken-{self.offer_id}"


def _now(now: datetime | None) -> datetime:
    return utc(now) if now is not None else datetime.now(UTC)



def _channel(recipient: Recipient, channels: Mapping[str, Channel]) -> tuple[str, str] | str:
    """``(channel, address)`` for an offer, or why there is none."""
    fallback = [c for c in FALLBACK if c in channels]
    reachable = replace(recipient, portal=False)
    chosen = choose_channel("preferred", reachable, fallback)
    if isinstance(chosen, tuple) and chosen[0] not in channels:
        chosen = choose_channel("preferred", replace(reachable, preferred_channel=None),
                                fallback)
    if isinstance(chosen, tuple) and chosen[0] not in channels:
        return f"no channel {chosen[0]}"
    return chosen


# --- the offer round -----------------------------------------------------------------------


def offer_round(engine: Engine, settings: Settings, channels: Mapping[str, Channel], *,
                now: datetime | None = None) -> OfferRound:
    """Expire, then offer every open freed slot to its next wave (module docstring)."""
    now = _now(now)
    result = OfferRound()
    config = OutreachConfig.from_settings(settings)
    signer = link_signer(settings)
    with write_lock(engine), engine.begin() as conn:
        messages = _plan(conn, _Round(settings, config, channels, signer, now, result))
    for message in messages:
        if _deliver(engine, settings, channels, message, now):
            result.offered += 1
        else:
            _expire_unsent(engine, message.offer_id, now)
    if result.offered:
        count_waitlist_offer("offered", result.offered)
    if result.expired:
        count_waitlist_offer("expired", result.expired)
    if result.offered or result.expired or result.skipped:
        log.info("waitlist_offer_round", count=result.offered,
                 status=f"expired {result.expired} skipped {result.skipped}")
    return result


@dataclass
class _Round:
    settings: Settings
    config: OutreachConfig
    channels: Mapping[str, Channel]
    signer: LinkSigner
    now: datetime
    result: OfferRound


def _plan(conn: Connection, r: _Round) -> list[_Message]:
    settings, now, result = r.settings, r.now, r.result
    f, o = freed_slots, waitlist_offers
    query = select(f).where(f.c.status.in_(_LIVE_SLOT)).order_by(f.c.start, f.c.id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=f)
    messages: list[_Message] = []
    for slot in conn.execute(query).all():
        start = utc(slot.start)
        if start <= now + settings.waitlist.min_notice:
            result.expired += conn.execute(
                update(o).where(o.c.slot_id == slot.id, o.c.status == "offered")
                .values(status="expired")).rowcount
            conn.execute(update(f).where(f.c.id == slot.id)
                         .values(status="expired", updated_at=now))
            continue
        result.expired += conn.execute(
            update(o).where(o.c.slot_id == slot.id, o.c.status == "offered",
                            o.c.expires_at <= now)
            .values(status="expired")).rowcount
        _close_stale(conn, slot.id, now)
        live = conn.execute(select(o.c.id).where(o.c.slot_id == slot.id,
                                                 o.c.status == "offered").limit(1)).first()
        wave = [] if live is not None else _offer_wave(conn, r, slot, start)
        messages.extend(wave)
        status = "offering" if live is not None or wave else "open"
        if status != slot.status:
            conn.execute(update(f).where(f.c.id == slot.id)
                         .values(status=status, updated_at=now))
    return messages


def _close_stale(conn: Connection, slot_id: int, now: datetime) -> None:
    """Offers whose waitlist entry is no longer active (withdrawn, or booked into another
    slot) stop holding the slot."""
    o, w = waitlist_offers, waitlist_entries
    stale = [r.id for r in conn.execute(
        select(o.c.id).select_from(o.join(w, w.c.id == o.c.waitlist_id))
        .where(o.c.slot_id == slot_id, o.c.status == "offered", w.c.status != "active"))]
    if stale:
        conn.execute(update(o).where(o.c.id.in_(stale), o.c.status == "offered")
                     .values(status="declined", responded_at=now))


def _waiting(conn: Connection, slot: Any, start: datetime) -> Iterator[list[Any]]:
    """Pages of active waitlist entries whose window holds ``start`` and whose patient was
    not offered this slot before, first come first served. Service and place are matched by
    the caller (:func:`integration.waitlist.entries.fits`), against the appointment too."""
    w, o = waitlist_entries, waitlist_offers
    asked = select(o.c.patient_id).where(o.c.slot_id == slot.id)
    after: tuple[Any, int] | None = None
    while True:
        query = select(w).where(
            w.c.status == "active",
            (w.c.earliest.is_(None)) | (w.c.earliest <= start),
            (w.c.latest.is_(None)) | (w.c.latest > start),
            w.c.patient_id.not_in(asked),
        )
        if after is not None:
            query = query.where(or_(w.c.created_at > after[0],
                                    and_(w.c.created_at == after[0], w.c.id > after[1])))
        rows = conn.execute(query.order_by(w.c.created_at, w.c.id).limit(_PAGE)).all()
        if rows:
            yield list(rows)
        if len(rows) < _PAGE:
            return
        after = (rows[-1].created_at, int(rows[-1].id))


def _offer_wave(conn: Connection, r: _Round, slot: Any, start: datetime) -> list[_Message]:
    messages: list[_Message] = []
    seen: set[str] = set()
    for rows in _waiting(conn, slot, start):
        _offer_page(conn, r, slot, start, rows, messages, seen)
        if len(messages) >= r.settings.waitlist.wave:
            break
    return messages


def _offer_page(conn: Connection, r: _Round, slot: Any, start: datetime,  # noqa: PLR0917
                rows: list[Any], messages: list[_Message], seen: set[str]) -> None:
    settings, config, channels, signer, now = r.settings, r.config, r.channels, r.signer, r.now
    o, t = waitlist_offers, timeline_entries
    entry_ids = sorted({x.entry_id for x in rows if x.entry_id})
    entries = {e.id: e for e in conn.execute(
        select(t.c.id, t.c.patient_id, t.c.status, t.c.time, t.c.resource)
        .where(t.c.id.in_(entry_ids)))} if entry_ids else {}
    snap: Snapshot | None = None
    window = settings.outreach.quiet_window
    expires = now + settings.waitlist.offer_ttl
    ttl = max(signer.ttl, settings.waitlist.offer_ttl)
    for row in rows:
        if len(messages) >= settings.waitlist.wave:
            return
        if row.patient_id in seen:
            continue
        entry = entries.get(row.entry_id) if row.entry_id else None
        resource = (entry.resource or {}) if entry is not None else {}
        if row.entry_id and (entry is None or entry.status not in HOLDING_STATUSES
                             or (entry.time is not None and utc(entry.time) <= start)):
            continue  # the appointment is gone, or already as early as this slot
        if not (fits(slot.service or "", row.service or "", service_keys(resource))
                and fits(slot.location or "", row.location or "", location_keys(resource))):
            continue
        seen.add(row.patient_id)
        if snap is None:
            snap = load_snapshot(conn, config, entry_ids, now)
        recipient = snap.recipient(config, entry.patient_id if entry else row.patient_id)
        if in_quiet_hours(now, window, recipient.timezone):
            r.result.skipped += 1
            continue
        chosen = _channel(recipient, channels)
        if isinstance(chosen, str):
            r.result.skipped += 1
            continue
        channel, address = chosen
        offer_id = conn.execute(
            dialect_insert(conn, o)
            .values(slot_id=slot.id, waitlist_id=row.id, patient_id=row.patient_id,
                    channel=channel, status="offered", offered_at=now, expires_at=expires)
            .on_conflict_do_nothing(index_elements=["slot_id", "waitlist_id"])
            .returning(o.c.id)
        ).scalar()
        if offer_id is None:
            continue
        language = text_language(recipient.language, settings.default_language)
        service, place = labels(resource, location=slot.location or "")
        subject, body = offer_message(
            channel, language, settings.organization, service=service,
            when=when_text(start, language, recipient.timezone), location=place,
            link=signer.url("o", int(offer_id), now=now, ttl=ttl),
            until=clock_text(expires, language, recipient.timezone, today=now))
        messages.append(_Message("offer", int(offer_id), row.patient_id, row.entry_id, channel,
                                 address, language, subject, body, slot_id=int(slot.id)))


def _deliver(engine: Engine, settings: Settings, channels: Mapping[str, Channel],
             message: _Message, now: datetime) -> bool:
    """Send one message (outside any transaction), then owe the EHR its Communication."""
    channel = channels.get(message.channel)
    if channel is None:
        return False
    try:
        receipt = channel.send(OutgoingMessage(
            key=message.key, channel=message.channel, address=message.address,
            language=message.language, subject=message.subject, body=message.body))
    except Exception as exc:  # a provider error must not stop the other offers
        log.warning("waitlist_send_failed", patient_id=message.patient_id,
                    source=message.channel, exc_type=type(exc).__name__, error=str(exc)[:200])
        return False
    log.info("waitlist_message_sent", patient_id=message.patient_id, source=message.channel,
             status=message.kind, count=0 if receipt.duplicate else 1)
    with write_lock(engine), engine.begin() as conn:
        _write_back(conn, settings, message, sent_at=now, now=now)
    return True


def _expire_unsent(engine: Engine, offer_id: int, now: datetime) -> None:
    """An offer that could not be sent stops holding its slot: the next round asks the next
    patients."""
    o = waitlist_offers
    with write_lock(engine), engine.begin() as conn:
        conn.execute(update(o).where(o.c.id == offer_id, o.c.status == "offered")
                     .values(status="expired", expires_at=now))


def _write_back(conn: Connection, settings: Settings, message: _Message, *,
                sent_at: datetime, now: datetime) -> bool:
    """Owe the EHR the Communication for a message sent (silently nothing when no connection
    takes write-backs, or the EHR could not know the patient)."""
    target = write_back_connection(conn, settings, message.entry_id)
    if target is None:
        return False
    try:
        patient = patient_reference(conn, message.patient_id, target.name)
    except ValueError:
        return False
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "category": [{"text": "careloop waitlist offer" if message.kind == "offer"
                      else "careloop waitlist offer taken"}],
    }
    channel_medium = medium(message.channel)
    if channel_medium is not None:
        resource["medium"] = [channel_medium]
    resource["subject"] = patient
    if message.entry_id:
        entry_ref, _ = entry_reference(conn, message.entry_id, target.name)
        if entry_ref is not None:
            resource["about"] = [entry_ref]
    resource["sent"] = fhir_instant(sent_at)
    resource["recipient"] = [patient]
    resource["sender"] = {"display": settings.organization.name}
    resource["payload"] = [{"contentString": message.body}]
    return enqueue(conn, key=message.writeback_key, connection=target.name,
                   resource_type="Communication", resource=resource, now=now)


# --- accept, decline, the page's view --------------------------------------------------------


@dataclass
class _Claim:
    outcome: AcceptOutcome | None = None
    """Final (no booking to do)."""
    offer_id: int = 0
    slot_id: int = 0
    slot_ref: str | None = None
    start: datetime | None = None
    patient_id: str = ""
    entry_id: str | None = None
    waitlist_id: int = 0
    language: str = "en"
    when: str = ""
    books: bool = False
    others: list[_Message] = field(default_factory=list)


class _NotWaiting(Exception):
    """The offer's waitlist entry is no longer active: undo the claim."""


def _books(settings: Settings, slot: Any, scheduling: Rebooker | None) -> bool:
    """Whether the winner books the slot in the EHR (else: a reschedule request for staff)."""
    if not slot.slot_ref or scheduling is None:
        return False
    connection = settings.connection(slot.connection) if slot.connection else None
    return connection is None or connection.scheduling == "slots"


async def accept(engine: Engine, settings: Settings, channels: Mapping[str, Channel],
                 scheduling: Rebooker | None, *, offer_id: int,
                 now: datetime | None = None) -> AcceptOutcome:
    """The patient takes the offered slot; the first acceptance wins (module docstring)."""
    now = _now(now)
    config = OutreachConfig.from_settings(settings)
    try:
        claim = await asyncio.to_thread(_claim, engine, settings, config=config,
                                        scheduling=scheduling, offer_id=offer_id, now=now)
    except _NotWaiting:
        await asyncio.to_thread(_close_offer, engine, offer_id, "declined", now)
        return AcceptOutcome(Outcome.INVALID.value, None,
                             outcome_text(Outcome.INVALID, settings.default_language))
    if claim.outcome is not None:
        return claim.outcome
    status = Outcome.REQUESTED
    if claim.books:
        assert scheduling is not None and claim.slot_ref and claim.entry_id
        try:
            booking = await scheduling.rebook(patient_id=claim.patient_id,
                                              entry_id=claim.entry_id, slot=claim.slot_ref,
                                              source="waitlist", now=now)
            booked = getattr(booking, "status", None) == "booked"
        except Exception as exc:  # an EHR or network error: the slot is not ours
            log.warning("waitlist_booking_failed", patient_id=claim.patient_id,
                        entry_id=claim.entry_id, exc_type=type(exc).__name__,
                        error=str(exc)[:200])
            booked = False
        if booked:
            status = Outcome.BOOKED
        else:
            await asyncio.to_thread(_undo, engine, claim, now)
            status = Outcome.TAKEN
    log.info("waitlist_offer_accepted", patient_id=claim.patient_id, status=status.value)
    count_waitlist_offer("taken" if status is Outcome.TAKEN else "accepted")
    if claim.others:
        await asyncio.to_thread(_tell, engine, settings, channels, claim.others, now)
    return AcceptOutcome(status.value, claim.start,
                         outcome_text(status, claim.language, when=claim.when))


def _local(moment: datetime, settings: Settings) -> datetime:
    """A time as staff read it: in the organisation's zone (ISO 8601 with its offset)."""
    try:
        return moment.astimezone(ZoneInfo(settings.timezone))
    except (ZoneInfoNotFoundError, ValueError):
        return moment


def _slot_for_update(conn: Connection, slot_id: int) -> Any:
    f = freed_slots
    query = select(f).where(f.c.id == slot_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).first()


def _patient_view(conn: Connection, config: OutreachConfig, entry_id: str | None,
                  patient_id: str, now: datetime) -> tuple[Recipient, Any]:
    """The patient as outreach sees them (language, zone, channels) and their appointment."""
    snap: Snapshot = load_snapshot(conn, config, [entry_id] if entry_id else [], now)
    entry = snap.entries.get(entry_id) if entry_id else None
    return snap.recipient(config, entry.patient_id if entry else patient_id), entry


def _claim(engine: Engine, settings: Settings, *, config: OutreachConfig,
           scheduling: Rebooker | None, offer_id: int, now: datetime) -> _Claim:
    o, f, w = waitlist_offers, freed_slots, waitlist_entries
    with write_lock(engine), engine.begin() as conn:
        head = conn.execute(select(o.c.slot_id).where(o.c.id == offer_id)).first()
        if head is None:
            return _Claim(AcceptOutcome(Outcome.INVALID.value, None, outcome_text(
                Outcome.INVALID, settings.default_language)))
        slot = _slot_for_update(conn, head.slot_id)  # the race is decided on this row
        query = select(o).where(o.c.id == offer_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        offer = conn.execute(query).one()
        wl = conn.execute(select(w).where(w.c.id == offer.waitlist_id)).first()
        entry_id = wl.entry_id if wl is not None else None
        recipient, _entry = _patient_view(conn, config, entry_id, offer.patient_id, now)
        language = text_language(recipient.language, settings.default_language)
        start = utc(slot.start) if slot is not None else None
        when = when_text(start, language, recipient.timezone) if start is not None else ""

        def final(outcome: Outcome, close: str | None = None) -> _Claim:
            if close is not None:
                conn.execute(update(o).where(o.c.id == offer_id,
                                             o.c.status.in_(("offered", "declined")))
                             .values(status=close, responded_at=now))
            return _Claim(AcceptOutcome(outcome.value, start,
                                        outcome_text(outcome, language, when=when)))

        if offer.status == "accepted":  # a second click: the first one's answer
            filled = slot is not None and slot.filled_by == offer.id
            if not filled:
                return final(Outcome.TAKEN)
            return final(Outcome.BOOKED if _books(settings, slot, scheduling)
                         else Outcome.REQUESTED)
        if offer.status in ("taken", "expired"):
            return final(Outcome(offer.status))
        if slot is None:
            return final(Outcome.INVALID)
        if (utc(offer.expires_at) <= now or slot.status == "expired"
                or start is None or start <= now):
            return final(Outcome.EXPIRED, "expired")
        won = slot.status in _LIVE_SLOT and conn.execute(
            update(f).where(f.c.id == slot.id, f.c.status.in_(_LIVE_SLOT))
            .values(status="filled", filled_by=offer.id, filled_at=now, updated_at=now)
        ).rowcount == 1
        if not won:
            return final(Outcome.TAKEN, "taken")
        others = conn.execute(
            select(o).where(o.c.slot_id == slot.id, o.c.id != offer.id,
                            o.c.status == "offered").order_by(o.c.id)).all()
        if others:
            conn.execute(update(o).where(o.c.id.in_([r.id for r in others]),
                                         o.c.status == "offered").values(status="taken"))
        conn.execute(update(o).where(o.c.id == offer.id)
                     .values(status="accepted", responded_at=now))
        if conn.execute(update(w).where(w.c.id == offer.waitlist_id, w.c.status == "active")
                        .values(status="booked", updated_at=now)).rowcount != 1:
            raise _NotWaiting  # rolls the whole claim back
        books = _books(settings, slot, scheduling) and bool(entry_id)
        if not books and entry_id:
            record_request(
                conn, settings, entry_id=entry_id, patient_id=offer.patient_id,
                action="reschedule", source="waitlist", event_id=None, touch_key=None,
                detail={"preferred": f"{_local(start, settings).isoformat()} (freed slot "
                                     "offered from the waitlist)"},
                now=now)
        return _Claim(
            offer_id=offer.id, slot_id=slot.id, slot_ref=slot.slot_ref, start=start,
            patient_id=offer.patient_id, entry_id=entry_id, waitlist_id=offer.waitlist_id,
            language=language, when=when, books=books,
            others=_taken_messages(conn, settings, config, offers=others, slot=slot, now=now))


def _taken_messages(conn: Connection, settings: Settings, config: OutreachConfig, *,
                    offers: Sequence[Any], slot: Any, now: datetime) -> list[_Message]:
    if not offers:
        return []
    w = waitlist_entries
    waitlist = {r.id: r for r in conn.execute(
        select(w.c.id, w.c.entry_id).where(w.c.id.in_([r.waitlist_id for r in offers])))}
    entry_ids = sorted({r.entry_id for r in waitlist.values() if r.entry_id})
    snap = load_snapshot(conn, config, entry_ids, now)
    start = utc(slot.start)
    out: list[_Message] = []
    for offer in offers:
        entry_id = waitlist[offer.waitlist_id].entry_id if offer.waitlist_id in waitlist else None
        entry = snap.entries.get(entry_id) if entry_id else None
        recipient = snap.recipient(config, entry.patient_id if entry else offer.patient_id)
        if in_quiet_hours(now, settings.outreach.quiet_window, recipient.timezone):
            continue  # not worth a message at night: the offer's page says it was taken
        chosen = choose_channel(offer.channel, recipient, ()) if offer.channel else "none"
        if isinstance(chosen, str):
            continue  # opted out since, or no address any more: nothing to say
        channel, address = chosen
        language = text_language(recipient.language, settings.default_language)
        service, _place = labels(entry.resource if entry else {}, location=slot.location or "")
        subject, body = taken_message(channel, language, settings.organization,
                                      service=service,
                                      when=when_text(start, language, recipient.timezone))
        out.append(_Message("taken", int(offer.id), offer.patient_id, entry_id, channel,
                            address, language, subject, body))
    return out


def _tell(engine: Engine, settings: Settings, channels: Mapping[str, Channel],
          messages: Sequence[_Message], now: datetime) -> None:
    for message in messages:
        _deliver(engine, settings, channels, message, now)


def _undo(engine: Engine, claim: _Claim, now: datetime) -> None:
    """The EHR refused the booking: the slot is gone, the patient waits on."""
    o, f, w = waitlist_offers, freed_slots, waitlist_entries
    with write_lock(engine), engine.begin() as conn:
        _slot_for_update(conn, claim.slot_id)
        conn.execute(update(f).where(f.c.id == claim.slot_id, f.c.filled_by == claim.offer_id)
                     .values(status="withdrawn", filled_by=None, filled_at=None,
                             updated_at=now))
        conn.execute(update(o).where(o.c.id == claim.offer_id).values(status="taken"))
        conn.execute(update(w).where(w.c.id == claim.waitlist_id, w.c.status == "booked")
                     .values(status="active", updated_at=now))
    log.info("waitlist_slot_withdrawn", patient_id=claim.patient_id, entry_id=claim.entry_id)


def _close_offer(engine: Engine, offer_id: int, status: str, now: datetime) -> None:
    o = waitlist_offers
    with write_lock(engine), engine.begin() as conn:
        conn.execute(update(o).where(o.c.id == offer_id, o.c.status.in_(("offered",
                                                                           "declined")))
                     .values(status=status, responded_at=now))


def decline(engine: Engine, *, offer_id: int, now: datetime) -> bool:
    """The patient turns the offer down; ``True`` when it was live. The slot goes to the next
    wave at the next round."""
    now = utc(now)
    o = waitlist_offers
    with write_lock(engine), engine.begin() as conn:
        done = conn.execute(
            update(o).where(o.c.id == offer_id, o.c.status == "offered", o.c.expires_at > now)
            .values(status="declined", responded_at=now)
        ).rowcount == 1
    if done:
        log.info("waitlist_offer_declined", count=1)
    return done


def offer_view(conn: Connection, offer_id: int) -> Mapping[str, Any] | None:
    """What the offer's page shows, or ``None`` for an unknown offer.

    ``offer_id``, ``status`` (the offer's: offered, accepted, declined, expired, taken),
    ``slot_status``, ``expires_at``, ``offered_at``, ``responded_at``, ``start``, ``end``
    (aware UTC), ``service`` and ``location`` (labels from the patient's own appointment;
    empty when unknown, never an internal reference), ``service_code`` and ``location_ref``
    (what the slot was matched on), ``patient_id``, ``entry_id`` (the appointment held now),
    ``waitlist_id``, ``channel``, ``language`` (the patient's, as a BCP 47 tag; empty when
    unknown) and ``timezone`` (the patient's own, or ``None``: use the settings' zone).
    """
    o, f, w, t = waitlist_offers, freed_slots, waitlist_entries, timeline_entries
    row = conn.execute(
        select(o.c.id, o.c.status, o.c.expires_at, o.c.offered_at, o.c.responded_at,
               o.c.patient_id, o.c.waitlist_id, o.c.channel, f.c.status.label("slot_status"),
               f.c.start, f.c.end, f.c.service, f.c.location, w.c.entry_id)
        .select_from(o.join(f, f.c.id == o.c.slot_id).outerjoin(w, w.c.id == o.c.waitlist_id))
        .where(o.c.id == offer_id)
    ).first()
    if row is None:
        return None
    resource: Mapping[str, Any] = {}
    holder = row.patient_id
    if row.entry_id:
        entry = conn.execute(select(t.c.patient_id, t.c.resource)
                             .where(t.c.id == row.entry_id)).first()
        if entry is not None:
            resource, holder = entry.resource or {}, entry.patient_id
    service, place = labels(resource, location=row.location or "")
    recipient, _ = _patient_view(conn, OutreachConfig(pathways=()), row.entry_id,
                                 row.patient_id, datetime.now(UTC))
    prefs = conn.execute(select(patient_preferences.c.timezone)
                         .where(patient_preferences.c.patient_id == holder)).first()
    return {
        "offer_id": int(row.id),
        "status": row.status,
        "slot_status": row.slot_status,
        "offered_at": utc(row.offered_at),
        "expires_at": utc(row.expires_at),
        "responded_at": utc(row.responded_at) if row.responded_at else None,
        "start": utc(row.start),
        "end": utc(row.end) if row.end else None,
        "service": service,
        "location": place,
        "service_code": row.service or "",
        "location_ref": row.location or "",
        "patient_id": row.patient_id,
        "entry_id": row.entry_id,
        "waitlist_id": int(row.waitlist_id),
        "channel": row.channel,
        "language": recipient.language,
        "timezone": prefs.timezone if prefs is not None and prefs.timezone else None,
    }

