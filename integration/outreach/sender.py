"""The due sweep and the sender: DESIGN invariant 4, checked again at the moment of sending.

1. **Claim** (one short transaction): due rows (``status = scheduled``, ``due_at <= now``) are
   taken ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (a guarded status update on SQLite) and marked
   ``sending``; ``attempts`` counts the claims.
2. **Check and send** (a second transaction): the claimed touches' entries are locked
   ``FOR SHARE`` (PostgreSQL), so no cancel or reschedule can commit until the sends are done,
   and each touch's entry is planned again against the current timeline, preferences and clock.
   The touch goes out only if its key is still in the plan, with the same channel, address and
   language, due now, outside quiet hours (in the patient's zone), within the caps, and not too
   late to be useful; otherwise it is cancelled or moved (back to ``scheduled``) with the reason.
   The message is rendered (Jinja2 + Babel) and handed to the channel with the touch key as its
   idempotency key, and the row is marked ``sent`` with the provider's reference.
   On SQLite the check and the sends run in a read transaction and the results are written
   afterwards under the one-writer gate, so a slow provider never holds up the ACK path; a
   cancellation that commits meanwhile is ordered after the send, as on PostgreSQL, where it
   waits for the ``FOR SHARE`` lock.
3. **Record** (same transaction on PostgreSQL): the final status, the text as sent
   (``touches.body``), and, through :attr:`Delivery.record`, the write-back Communication for
   every touch that was sent, failed or held back for good (:mod:`integration.writeback`).
4. **At most once.** A crash after the claim leaves the row ``sending``. After
   ``sending_timeout_s`` the sweep asks whether the key was delivered: a delivery receipt the
   provider sent for it (``channel_events.touch_key``) or the channel's own memory
   (:meth:`adapters.channels.Channel.lookup`): yes → ``sent``. No → ``scheduled`` again, to be
   checked afresh, only when the channel drops a repeated key (``idempotent``: the file channel,
   a provider that honours ``Idempotency-Key``); otherwise the outcome is unknown and the touch
   is ``failed`` rather than risk a second message.

Every message links to the patient page (``{base_url}/p/<signed token>``, see
:mod:`integration.portal.links`), except survey steps with their own ``survey_url``; a voice
call's key press comes back to ``{base_url}/channels/voice/inbound?key=<touch key>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, bindparam, select, update

from adapters.channels import Channel, ChannelError, OutgoingMessage, Receipt
from integration.db import write_lock
from integration.logs import get_logger
from integration.metrics import count_touch
from integration.models import channel_events, touches
from integration.outreach.pathways import Trigger
from integration.outreach.planner import Entry, Touch
from integration.outreach.policy import Recipient, in_quiet_hours, next_allowed
from integration.outreach.record import Recorder
from integration.outreach.state import OutreachConfig, Snapshot, StoredTouch, load_snapshot
from integration.outreach.templates import TemplateCatalog, TemplateProblem
from integration.portal.links import LinkSigner

__all__ = [
    "Delivery",
    "SweepResult",
    "claim_due",
    "message_values",
    "resolve_stale",
    "send_due",
]


@dataclass(frozen=True)
class Delivery:
    """What sending needs beyond the plan: where replies and links point, and the write-back."""

    base_url: str = ""
    links: LinkSigner | None = None
    record: Recorder | None = None
    after_commit: Callable[[], None] | None = None
    """Called after each batch's results are committed (the runtime wakes the write-back)."""

    def link(self, touch_id: int, now: datetime) -> str | None:
        return self.links.url("t", touch_id, now=now) if self.links is not None else None

    def voice_reply_url(self, key: str) -> str | None:
        if not self.base_url:
            return None
        return f"{self.base_url.rstrip('/')}/channels/voice/inbound?key={quote(key, safe='')}"


RECORDED = ("sent", "failed", "cancelled")
"""Final statuses the sender gives that are written back (a cancel here is a hold for good)."""

log = get_logger("careloop.outreach")


@dataclass
class SweepResult:
    claimed: int = 0
    sent: int = 0
    cancelled: int = 0
    rescheduled: int = 0
    failed: int = 0
    recovered: int = 0

    def add(self, other: SweepResult) -> None:
        for name in ("claimed", "sent", "cancelled", "rescheduled", "failed", "recovered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def send_due(
    engine: Engine,
    config: OutreachConfig,
    channels: Mapping[str, Channel],
    catalog: TemplateCatalog,
    *,
    now: datetime | None = None,
    max_batches: int | None = None,
    delivery: Delivery | None = None,
) -> SweepResult:
    """Resolve stale ``sending`` rows, then claim, check and send due touches, batch by batch."""
    now = (now or datetime.now(UTC)).astimezone(UTC)  # stored times are UTC (SQLite too)
    delivery = delivery or Delivery()
    total = resolve_stale(engine, config, channels, now=now, delivery=delivery)
    batch = config.outreach.batch if engine.dialect.name == "postgresql" else min(
        config.outreach.batch, 100)
    batches = 0
    while max_batches is None or batches < max_batches:
        batches += 1
        ids = claim_due(engine, now=now, limit=batch)
        if not ids:
            break
        total.add(_send_claimed(engine, config, channels, catalog, ids, now, delivery))
        if delivery.after_commit is not None:
            delivery.after_commit()
        if len(ids) < batch:
            break
    if total.claimed or total.recovered:
        log.info("outreach_swept", count=total.claimed, status=(
            f"sent {total.sent}, cancelled {total.cancelled}, moved {total.rescheduled}, "
            f"failed {total.failed}, recovered {total.recovered}"))
    return total


def claim_due(engine: Engine, *, now: datetime, limit: int) -> list[int]:
    """Mark up to ``limit`` due touches ``sending`` and return their ids (committed)."""
    now = now.astimezone(UTC)
    t = touches
    with write_lock(engine), engine.begin() as conn:
        query = (
            select(t.c.id)
            .where(t.c.status == "scheduled", t.c.due_at <= now)
            .order_by(t.c.due_at, t.c.id)
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        ids = [r.id for r in conn.execute(query)]
        if not ids:
            return []
        claimed = conn.execute(
            update(t)
            .where(t.c.id.in_(ids), t.c.status == "scheduled")
            .values(status="sending", attempts=t.c.attempts + 1, updated_at=now)
            .returning(t.c.id)
        )
        return sorted(r.id for r in claimed)


_FINISH = (
    update(touches)
    .where(touches.c.id == bindparam("t_id"), touches.c.status == "sending")
    .values(
        status=bindparam("v_status"),
        reason=bindparam("v_reason"),
        due_at=bindparam("v_due_at"),
        channel=bindparam("v_channel"),
        address=bindparam("v_address"),
        language=bindparam("v_language"),
        sent_at=bindparam("v_sent_at"),
        provider_ref=bindparam("v_provider_ref"),
        body=bindparam("v_body"),
        updated_at=bindparam("v_updated_at"),
    )
)


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def _finish(row: StoredTouch, now: datetime, status: str, reason: str | None = None,
            **values: Any) -> dict[str, Any]:
    return {
        "t_id": row.id,
        "v_status": status,
        "v_reason": reason[:255] if reason else None,
        "v_due_at": _utc(values.get("due_at", row.due_at)),
        "v_channel": values.get("channel", row.channel),
        "v_address": values.get("address", row.address),
        "v_language": values.get("language", row.language),
        "v_sent_at": _utc(values.get("sent_at")),
        "v_provider_ref": values.get("provider_ref"),
        "v_body": values.get("body"),
        "v_updated_at": now,
    }


def _send_claimed(  # noqa: PLR0917
    engine: Engine,
    config: OutreachConfig,
    channels: Mapping[str, Channel],
    catalog: TemplateCatalog,
    ids: list[int],
    now: datetime,
    delivery: Delivery,
) -> SweepResult:
    result = SweepResult(claimed=len(ids))
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            updates = _check_and_send(conn, config, channels, catalog, ids, now, delivery, result)
            _record(conn, updates, delivery, now)
    else:
        # SQLite: check and send in a read transaction (WAL readers never block the writer),
        # then record under the one-writer gate.
        with engine.connect() as conn:
            updates = _check_and_send(conn, config, channels, catalog, ids, now, delivery,
                                      result)
            conn.rollback()
        with write_lock(engine), engine.begin() as conn:
            _record(conn, updates, delivery, now)
    _count(updates)
    return result


def _count(updates: list[dict[str, Any]]) -> None:
    """Prometheus, after the commit: touches by pathway, channel and final status."""
    for u in updates:
        if u["v_status"] in RECORDED:
            count_touch(u["pathway"], u["v_channel"], u["v_status"])


def _check_and_send(  # noqa: PLR0917
    conn: Connection,
    config: OutreachConfig,
    channels: Mapping[str, Channel],
    catalog: TemplateCatalog,
    ids: list[int],
    now: datetime,
    delivery: Delivery,
    result: SweepResult,
) -> list[dict[str, Any]]:
    rows = [StoredTouch.from_row(r) for r in conn.execute(
        select(touches).where(touches.c.id.in_(ids), touches.c.status == "sending")
        .order_by(touches.c.due_at, touches.c.id)
    )]
    snap = load_snapshot(conn, config, {r.entry_id for r in rows}, now, lock=True)
    return [{**_one(config, snap, channels, catalog, row, now, result, delivery),
             "pathway": row.pathway} for row in rows]


def _record(conn: Connection, updates: list[dict[str, Any]], delivery: Delivery,
            now: datetime) -> None:
    if not updates:
        return
    conn.execute(_FINISH, updates)
    if delivery.record is not None:
        final = [u["t_id"] for u in updates if u["v_status"] in RECORDED]
        if final:
            delivery.record(conn, final, now)


def _one(  # noqa: PLR0917
    config: OutreachConfig,
    snap: Snapshot,
    channels: Mapping[str, Channel],
    catalog: TemplateCatalog,
    row: StoredTouch,
    now: datetime,
    result: SweepResult,
    delivery: Delivery | None = None,
) -> dict[str, Any]:
    delivery = delivery or Delivery()
    verdict = check(config, snap, row, now)
    if isinstance(verdict, _Hold):
        if verdict.status == "cancelled":
            result.cancelled += 1
        else:
            result.rescheduled += 1
        log.info("outreach_touch_held", entry_id=row.entry_id, status=verdict.status,
                 reason=verdict.reason)
        return _finish(row, now, verdict.status, verdict.reason, **verdict.values)
    touch = verdict
    entry = snap.entries[row.entry_id]
    recipient = snap.recipient(config, entry.patient_id)
    channel = channels.get(touch.channel)
    if channel is None:
        result.failed += 1
        return _finish(row, now, "failed", f"no {touch.channel} channel configured")
    try:
        rendered = catalog.render(
            touch.template, touch.channel, touch.language, recipient.timezone,
            message_values(config, snap, entry, touch, recipient,
                           link=delivery.link(row.id, now)),
        )
    except TemplateProblem as exc:
        result.failed += 1
        return _finish(row, now, "failed", f"template: {exc}")
    message = OutgoingMessage(
        key=row.key, channel=touch.channel, address=touch.address, language=rendered.language,
        subject=rendered.parts.get("subject", ""), body=rendered.body,
        html=rendered.parts.get("html"),
        reply_url=delivery.voice_reply_url(row.key) if touch.channel == "voice" else None,
    )
    try:
        receipt = channel.send(message)
    except ChannelError as exc:
        if exc.maybe_sent and not getattr(channel, "idempotent", False):
            # The provider may have taken it (a timeout after the request went out) and would
            # not drop a repeat: at most once means not trying again.
            result.failed += 1
            return _finish(row, now, "failed", f"channel: {exc} (outcome unknown; not "
                           "repeated)", body=rendered.body)
        if exc.retryable and row.attempts < config.outreach.max_attempts:
            result.rescheduled += 1
            retry_at = now + timedelta(seconds=min(3600, 30 * 2 ** max(0, row.attempts - 1)))
            return _finish(row, now, "scheduled", f"channel: {exc}", due_at=retry_at)
        result.failed += 1
        return _finish(row, now, "failed", f"channel: {exc}")
    result.sent += 1
    return _sent(row, receipt, now, rendered.body)


def _sent(row: StoredTouch, receipt: Receipt, now: datetime, body: str) -> dict[str, Any]:
    reason = "delivered before (the channel knew the key)" if receipt.duplicate else None
    return _finish(row, now, "sent", reason, sent_at=now, provider_ref=receipt.provider_ref,
                   body=body)


@dataclass(frozen=True)
class _Hold:
    status: str  # cancelled | scheduled
    reason: str
    values: Mapping[str, Any]


def check(config: OutreachConfig, snap: Snapshot, row: StoredTouch, now: datetime) -> Touch | _Hold:
    """Invariant 4 at send time: the touch as it may go out now, or why it may not."""
    entry = snap.entries.get(row.entry_id)
    if entry is None:
        return _Hold("cancelled", "the entry is no longer on the timeline", {})
    planned = snap.plan(config, row.entry_id, now, sending=row.key)
    touch = next((t for t in planned.touches if t.key == row.key), None)
    if touch is None:
        why = next((s.reason for s in planned.skips if s.key == row.key), "no longer planned")
        return _Hold("cancelled", f"at send time: {why}", {})
    if (touch.channel, touch.address, touch.language) != (row.channel, row.address,
                                                          row.language):
        return _Hold("scheduled", "at send time: the channel, address or language changed",
                     {"channel": touch.channel, "address": touch.address,
                      "language": touch.language, "due_at": max(touch.due_at, now)})
    if touch.due_at > now:
        return _Hold("scheduled", "at send time: its time moved", {"due_at": touch.due_at})
    out = config.outreach
    pathway = config.by_name[touch.pathway]
    before_moment = pathway.steps[touch.step].at < timedelta(0)
    recipient = snap.recipient(config, entry.patient_id)
    due = max(touch.due_at, row.due_at or touch.due_at)  # the stored time may be later (moved)
    if now - due > out.max_lateness:
        return _Hold("cancelled", f"too late: due {due.isoformat()}", {})
    if before_moment and now > touch.moment - out.min_notice:
        return _Hold("cancelled", "too late: too close to the moment it is about", {})
    if in_quiet_hours(now, out.quiet_window, recipient.timezone):
        allowed = next_allowed(now, out.quiet_window, recipient.timezone)
        if (before_moment or pathway.on is Trigger.APPOINTMENT) and (
            allowed > touch.moment - out.min_notice
        ):
            return _Hold("cancelled", "quiet hours at send time; the next allowed time is too "
                         "close to the moment", {})
        return _Hold("scheduled", "quiet hours at send time", {"due_at": allowed})
    return touch


def resolve_stale(
    engine: Engine, config: OutreachConfig, channels: Mapping[str, Channel], *, now: datetime,
    delivery: Delivery | None = None,
) -> SweepResult:
    """Touches left ``sending`` (a crash between claim and record): sent if the provider sent a
    receipt for the key or the channel knows it; else back to ``scheduled`` (checked again
    before any send) when the channel drops repeated keys, ``failed`` when it would not (at most
    once) or after ``max_attempts`` claims."""
    result = SweepResult()
    now = now.astimezone(UTC)
    cutoff = now - timedelta(seconds=config.outreach.sending_timeout_s)
    t = touches
    with write_lock(engine), engine.begin() as conn:
        query = (
            select(t).where(t.c.status == "sending", t.c.updated_at < cutoff)
            .order_by(t.c.id).limit(config.outreach.batch)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = [StoredTouch.from_row(r) for r in conn.execute(query)]
        receipts = _receipts(conn, [r.key for r in rows])
        updates = []
        for row in rows:
            channel = channels.get(row.channel)
            receipt = receipts.get(row.key) or (
                channel.lookup(row.key) if channel is not None else None)
            if receipt is not None:
                updates.append(_finish(row, now, "sent", "recorded after an interrupted send",
                                       sent_at=receipt.at, provider_ref=receipt.provider_ref))
            elif row.attempts >= config.outreach.max_attempts:
                updates.append(_finish(row, now, "failed", "interrupted sends; gave up"))
            elif channel is not None and not getattr(channel, "idempotent", False):
                updates.append(_finish(row, now, "failed", "interrupted send: the outcome is "
                                       "unknown and the provider would not drop a repeat, so "
                                       "it is not sent again"))
            else:
                updates.append(_finish(row, now, "scheduled", "retried after an interrupted "
                                       "send"))
            result.recovered += 1
        _record(conn, updates, delivery or Delivery(), now)
    return result


def _receipts(conn: Connection, keys: list[str]) -> dict[str, Receipt]:
    """Delivery receipts the provider sent for these touch keys (status callbacks)."""
    if not keys:
        return {}
    e = channel_events
    found: dict[str, Receipt] = {}
    for r in conn.execute(
        select(e.c.touch_key, e.c.provider_id, e.c.received_at)
        .where(e.c.kind == "status", e.c.touch_key.in_(keys)).order_by(e.c.id)
    ):
        if r.touch_key not in found:
            at = r.received_at if r.received_at.tzinfo else r.received_at.replace(tzinfo=UTC)
            found[r.touch_key] = Receipt(r.touch_key, r.provider_id.split(":")[0], at,
                                         duplicate=True)
    return found


def _display(concept: object) -> str:
    if isinstance(concept, list):
        concept = concept[0] if concept else None
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return ""


def _location(resource: Mapping[str, Any]) -> str:
    for participant in resource.get("participant") or []:
        actor = (participant or {}).get("actor") or {}
        if str(actor.get("reference", "")).startswith("Location/") and actor.get("display"):
            return str(actor["display"])
    for loc in resource.get("location") or []:
        ref = (loc or {}).get("location") or {}
        if ref.get("display"):
            return str(ref["display"])
    return ""


def _activity(resource: Mapping[str, Any], key: str) -> str:
    marker = key.rsplit("|activity:", 1)
    if len(marker) != 2:
        return ""
    try:
        index = int(marker[1].split(":")[0])
        detail = (resource.get("activity") or [])[index].get("detail") or {}
    except (ValueError, IndexError, AttributeError):
        return ""
    return _display(detail.get("code")) or str(detail.get("description") or "")


def message_values(
    config: OutreachConfig, snap: Snapshot, entry: Entry, touch: Touch, recipient: Recipient,
    *, link: str | None = None,
) -> dict[str, Any]:
    """What a template is given (see :func:`integration.outreach.templates.sample_values`):
    coded displays from the entry, never notes. ``link``: the touch's patient-page link (the
    organisation's portal link when there is none)."""
    res = entry.resource
    org = config.organization
    pathway = config.by_name[touch.pathway]
    link = link or org.link
    if pathway.survey_url:
        link = pathway.survey_url.replace("{entry}", entry.id).replace(
            "{patient}", entry.patient_id)
    medication = _display(res.get("medicationCodeableConcept")) or str(
        (res.get("medicationReference") or {}).get("display") or "")
    return {
        "patient": {"given_name": recipient.given_name},
        "organization": {"name": org.name, "phone": org.phone, "link": org.link},
        "entry": {"kind": entry.kind, "status": entry.status,
                  "summary": snap.summaries.get(entry.id, ""), "time": entry.time,
                  "end": entry.end},
        "moment": touch.moment,
        "service": _display(res.get("serviceType")) or _display(res.get("appointmentType"))
        or _display(res.get("reasonCode")) or _display(res.get("type")) or "",
        "location": _location(res) or org.name,
        "medication": medication,
        "activity": _activity(res, touch.key),
        "link": link,
    }
