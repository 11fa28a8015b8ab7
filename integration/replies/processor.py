"""Processing stored channel events: delivery receipts and patients' replies.

The webhooks (:mod:`integration.replies.webhooks`) only store; this stage claims ``pending``
``channel_events`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a guarded update on SQLite) and
handles each in one transaction:

* **status** (a delivery receipt): the touch named by the callback's ``key`` (else the one whose
  ``provider_ref`` is the message or call sid) gets the provider's status in ``delivery``
  (queued, sent, delivered, undelivered, failed; for calls completed, busy, no-answer...). A
  receipt older than the one stored (they arrive out of order) changes nothing. A failure
  records the provider's error code in the touch's ``reason``; the touch stays ``sent``.
* **inbound SMS**: :func:`~integration.replies.keywords.classify` the whole text, match it to a
  touch (:func:`~integration.replies.matching.match_reply`) and apply the effect
  (:mod:`integration.replies.effects`): STOP opts the number out of SMS (confirmed once: only
  when newly opted out), START opts it back in, HELP answers with the organisation's contact,
  C / X / R record a confirm / cancel / reschedule request for the matched touch's entry.
  Unknown senders, numbers shared by several patients and texts that are not keywords get a
  helpful answer, never a guess. When the sender is a known patient the reply itself is owed
  to the EHR as a Communication (:func:`integration.writeback.enqueue_reply`).
* **inbound voice** (a key pressed in a call's ``<Gather>``): the touch is named by the
  action URL's ``key``; 1 confirms, 2 asks to cancel, 3 repeats. The voice webhook processes
  its event at once (:func:`process_event_now`) and answers with TwiML.

The event is marked ``processed`` with a short ``result`` (ids and words, never the text or
the number). After the commit the SMS answer is sent through the channel with the key
``reply:<event id>`` (at most once: the key is the channel's idempotency key); a channel error
is logged and noted in ``result`` ("answer not sent"), and the effects are not applied again.
An unexpected error rolls the event back; it is retried up to :data:`MAX_ATTEMPTS` times and
then marked ``failed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from adapters.channels import Channel, ChannelError, OutgoingMessage
from adapters.twilio import parse_status
from integration.db import write_lock
from integration.logs import get_logger
from integration.metrics import count_reply
from integration.models import address_optouts, channel_events, touches
from integration.portal.links import LinkSigner, load_secret
from integration.replies.effects import opt_in, opt_out, record_request
from integration.replies.keywords import ALSO_OPT_IN, Intent, Reply, classify, classify_digits
from integration.replies.matching import Match, MatchedTouch, match_reply, touch_by_key
from integration.replies.texts import Answer, Spoken, answer_language, sms_text, voice_text
from integration.settings import Settings
from integration.writeback import enqueue_reply

__all__ = [
    "KINDS",
    "MAX_ATTEMPTS",
    "Outcome",
    "ProcessResult",
    "pending_count",
    "process_event_now",
    "process_events",
]

log = get_logger("careloop.replies")

MAX_ATTEMPTS = 5
_RECENT = timedelta(hours=1)
"""A "did not understand" kind of answer goes to a number at most once in this time, so an
auto-responder on the other side cannot start a loop."""
_FAILED_DELIVERY = frozenset({"failed", "undelivered", "busy", "no-answer", "canceled"})
_RANK = {
    "accepted": 0, "scheduled": 0, "queued": 1, "initiated": 1, "sending": 2, "ringing": 2,
    "sent": 3, "in-progress": 3, "answered": 3,
    "delivered": 4, "undelivered": 4, "failed": 4, "completed": 4, "busy": 4, "no-answer": 4,
    "canceled": 4, "read": 5,
}
"""How far along a message or call is: a receipt never moves a touch back."""


@dataclass
class ProcessResult:
    processed: int = 0
    failed: int = 0

    def add(self, other: ProcessResult) -> None:
        self.processed += other.processed
        self.failed += other.failed


@dataclass(frozen=True)
class Outcome:
    """What processing one event did and what to answer."""

    event_id: int
    channel: str
    kind: str
    result: str
    """Short, no PHI: stored in ``channel_events.result``."""
    language: str = "en"
    answer: str | None = None
    """SMS: the text to send back (``None``: nothing to send)."""
    say: str | None = None
    """Voice: what the call says now."""
    gather: bool = False
    """Voice: after saying ``say``, wait for another key press (repeat, not understood)."""
    intent: Intent | None = None
    patient_id: str | None = None
    entry_id: str | None = None
    touch_key: str | None = None
    address: str = field(default="", repr=False)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _params(payload: object) -> dict[str, str]:
    if not isinstance(payload, Mapping):
        return {}
    out: dict[str, str] = {}
    for k, v in payload.items():
        if isinstance(v, list):
            out[str(k)] = str(v[-1]) if v else ""
        elif v is not None:
            out[str(k)] = str(v)
    return out


# --------------------------------------------------------------------------------- status


def _status(conn: Connection, row: Any, now: datetime) -> Outcome:
    base = {"event_id": int(row.id), "channel": row.channel, "kind": row.kind}
    try:
        event = parse_status(_params(row.payload))
    except ValueError:
        return Outcome(**base, result="not a status callback")
    t = touches
    query = select(t.c.id, t.c.delivery, t.c.reason, t.c.key)
    if row.touch_key:
        query = query.where(t.c.key == row.touch_key)
    else:
        query = query.where(t.c.provider_ref == event.provider_id)
    touch = conn.execute(query.order_by(t.c.id).limit(1)).first()
    status = event.status.strip().lower()[:16]
    if touch is None:
        return Outcome(**base, result=f"delivery {status}: no touch")
    if _RANK.get(status, 3) < _RANK.get(touch.delivery or "", -1):
        return Outcome(**base, result=f"delivery {status} older than {touch.delivery}, "
                       f"touch {touch.id}", touch_key=touch.key)
    values: dict[str, Any] = {"delivery": status, "updated_at": now}
    if status in _FAILED_DELIVERY:
        code = f": error {event.error_code}" if event.error_code else ""
        values["reason"] = f"delivery {status}{code}"[:255]
    conn.execute(update(t).where(t.c.id == touch.id).values(**values))
    return Outcome(**base, result=f"delivery {status} touch {touch.id}", touch_key=touch.key)


# ------------------------------------------------------------------------------ SMS inbound


def _answer_language(reply: Reply, match: Match, settings: Settings) -> str:
    if reply.language == "es":
        return "es"
    if match.touch is not None and match.touch.language:
        return answer_language(match.touch.language, settings.default_language)
    return answer_language(settings.default_language)


def _opted_out(conn: Connection, channel: str, address: str) -> bool:
    o = address_optouts
    return conn.execute(
        select(o.c.channel).where(o.c.channel == channel, o.c.address == address)
    ).first() is not None


def _answered_recently(conn: Connection, row: Any, result: str, now: datetime) -> bool:
    ce = channel_events
    return conn.execute(
        select(ce.c.id).where(
            ce.c.channel == row.channel, ce.c.kind == "inbound", ce.c.address == row.address,
            ce.c.status == "processed", ce.c.result == result, ce.c.id != row.id,
            ce.c.processed_at >= now - _RECENT,
        ).limit(1)
    ).first() is not None


def _touch_link(settings: Settings, touch: MatchedTouch | None, now: datetime) -> str:
    """The patient page of the touch (where a new time can be asked for), if links work."""
    if touch is None:
        return ""
    portal = settings.channels.portal
    try:
        signer = LinkSigner(load_secret(portal.secret, settings.keys_dir), settings.base_url,
                            portal.link_ttl)
        return signer.url("t", touch.id, now=now)
    except (OSError, ValueError) as exc:
        log.warning("portal_link_unavailable", exc_type=type(exc).__name__)
        return ""


_REQUEST_ANSWER = {Intent.CONFIRM: Answer.CONFIRMED, Intent.CANCEL: Answer.CANCEL_RECEIVED,
                   Intent.RESCHEDULE: Answer.RESCHEDULE_RECEIVED}
_NO_MATCH = {"unknown": (Answer.UNKNOWN_SENDER, "unknown sender"),
             "ambiguous": (Answer.AMBIGUOUS, "ambiguous"),
             "nothing_open": (Answer.NOTHING_OPEN, "nothing open")}


def _sms(conn: Connection, settings: Settings, row: Any, now: datetime) -> Outcome:
    params = _params(row.payload)
    text = params.get("Body", "")
    reply = classify(text)
    match = match_reply(conn, row.channel, row.address, now=now)
    intent = reply.intent
    if (intent is Intent.CONFIRM and reply.keyword in ALSO_OPT_IN
            and _opted_out(conn, row.channel, row.address)):
        intent = Intent.OPT_IN  # Twilio takes YES from an opted-out number as an opt-in
    language = _answer_language(reply, match, settings)
    org = settings.organization
    touch = match.touch
    answer: Answer | None = None
    link = ""
    if intent is Intent.OPT_OUT:
        newly = opt_out(conn, row.channel, row.address, event_id=int(row.id), now=now)
        answer, result = (Answer.OPTED_OUT, "opt-out") if newly else (None, "opt-out (again)")
    elif intent is Intent.OPT_IN:
        removed = opt_in(conn, row.channel, row.address, now=now)
        answer, result = Answer.OPTED_IN, "opt-in" if removed else "opt-in (was not out)"
    elif intent is Intent.HELP:
        answer, result = Answer.HELP, "help"
    elif intent in _REQUEST_ANSWER and touch is not None:
        action = intent.value
        request_id = record_request(
            conn, settings, entry_id=touch.entry_id, patient_id=touch.patient_id,
            action=action, source=row.channel, event_id=int(row.id), touch_key=touch.key,
            detail=None, now=now)
        answer = _REQUEST_ANSWER[intent]
        result = f"{action} entry {touch.entry_id}" + ("" if request_id else " (again)")
        if intent is Intent.RESCHEDULE:
            link = _touch_link(settings, touch, now)
    elif intent in _REQUEST_ANSWER:
        answer, result = _NO_MATCH[match.kind]
    else:  # free text: kept for the care team (the reply Communication), answered kindly
        answer, result = (_NO_MATCH[match.kind] if match.kind in ("unknown", "ambiguous")
                          else (Answer.NOT_UNDERSTOOD, "not understood"))
    if (answer in (Answer.NOT_UNDERSTOOD, Answer.UNKNOWN_SENDER, Answer.AMBIGUOUS,
                   Answer.NOTHING_OPEN) and _answered_recently(conn, row, result, now)):
        answer, result = None, f"{result} (answered recently)"
    if match.patient_id:
        enqueue_reply(conn, settings, event_id=int(row.id), channel=row.channel,
                      patient_id=match.patient_id,
                      entry_id=touch.entry_id if touch is not None else None,
                      touch_key=touch.key if touch is not None else None, text=text,
                      received_at=_utc(row.received_at), now=now)
    return Outcome(
        event_id=int(row.id), channel=row.channel, kind=row.kind, result=result,
        language=language,
        answer=sms_text(answer, language, org, link=link) if answer is not None else None,
        intent=intent, patient_id=match.patient_id,
        entry_id=touch.entry_id if touch is not None else None,
        touch_key=touch.key if touch is not None else None, address=row.address,
    )


# ---------------------------------------------------------------------------- voice inbound


def _voice(conn: Connection, settings: Settings, row: Any, now: datetime) -> Outcome:
    params = _params(row.payload)
    digits = params.get("Digits", "").strip()
    intent = classify_digits(digits)
    org = settings.organization
    base = {"event_id": int(row.id), "channel": row.channel, "kind": row.kind,
            "intent": intent, "address": row.address}
    touch = touch_by_key(conn, row.touch_key) if row.touch_key else None
    if touch is None:
        language = answer_language(settings.default_language)
        return Outcome(**base, result="no touch", language=language,
                       say=voice_text(Spoken.NOTHING_OPEN, language, org))
    language = answer_language(touch.language, settings.default_language)
    known = {**base, "language": language, "patient_id": touch.patient_id,
             "entry_id": touch.entry_id, "touch_key": touch.key}
    if intent is Intent.REPEAT:
        say = touch.body or voice_text(Spoken.OPTIONS, language, org)
        return Outcome(**known, result=f"repeat touch {touch.id}", say=say, gather=True)
    if digits:
        enqueue_reply(conn, settings, event_id=int(row.id), channel=row.channel,
                      patient_id=touch.patient_id, entry_id=touch.entry_id,
                      touch_key=touch.key, text=f"Key pressed: {digits}",
                      received_at=_utc(row.received_at), now=now)
    if intent is Intent.UNKNOWN:
        return Outcome(**known, result="not understood", gather=True,
                       say=voice_text(Spoken.OPTIONS, language, org))
    if not touch.is_open(now):
        return Outcome(**known, result=f"nothing open, touch {touch.id}",
                       say=voice_text(Spoken.NOTHING_OPEN, language, org))
    action = intent.value
    request_id = record_request(
        conn, settings, entry_id=touch.entry_id, patient_id=touch.patient_id, action=action,
        source=row.channel, event_id=int(row.id), touch_key=touch.key, detail=None, now=now)
    spoken = Spoken.CONFIRMED if intent is Intent.CONFIRM else Spoken.CANCEL_RECEIVED
    return Outcome(**known, result=f"{action} entry {touch.entry_id}"
                   + ("" if request_id else " (again)"),
                   say=voice_text(spoken, language, org))


def _handle(conn: Connection, settings: Settings, row: Any, now: datetime) -> Outcome:
    if row.kind == "status":
        return _status(conn, row, now)
    if row.kind == "inbound" and row.channel == "voice":
        return _voice(conn, settings, row, now)
    if row.kind == "inbound":
        return _sms(conn, settings, row, now)
    return Outcome(event_id=int(row.id), channel=row.channel, kind=row.kind,
                   result=f"not handled here ({row.kind})")


# ------------------------------------------------------------------------------- the stage


KINDS = ("status", "inbound")
"""The events this stage handles (``portal`` events belong to the patient page)."""


def _claim_query(conn: Connection, event_id: int) -> Any:
    ce = channel_events
    query = select(ce).where(ce.c.id == event_id, ce.c.status == "pending",
                             ce.c.kind.in_(KINDS))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return query


def _process_one(engine: Engine, settings: Settings, event_id: int,
                 now: datetime) -> Outcome | None:
    """Handle one pending event in one transaction; ``None`` when it is not pending (done,
    or another worker holds it)."""
    ce = channel_events
    with write_lock(engine), engine.begin() as conn:
        row = conn.execute(_claim_query(conn, event_id)).first()
        if row is None:
            return None
        outcome = _handle(conn, settings, row, now)
        conn.execute(
            update(ce).where(ce.c.id == event_id, ce.c.status == "pending")
            .values(status="processed", result=outcome.result[:255],
                    attempts=ce.c.attempts + 1, processed_at=now,
                    # a reply matched to its touch keeps the key (outcomes count it there)
                    touch_key=func.coalesce(ce.c.touch_key, outcome.touch_key))
        )
    if outcome.kind == "inbound":
        count_reply(outcome.channel, outcome.intent)
    return outcome


def _failed(engine: Engine, event_id: int, exc: BaseException, now: datetime) -> bool:
    """Count a failed attempt; ``True`` when the event is given up (``failed``)."""
    ce = channel_events
    with write_lock(engine), engine.begin() as conn:
        row = conn.execute(select(ce.c.attempts).where(ce.c.id == event_id,
                                                       ce.c.status == "pending")).first()
        if row is None:
            return False
        attempts = int(row.attempts or 0) + 1
        give_up = attempts >= MAX_ATTEMPTS
        conn.execute(
            update(ce).where(ce.c.id == event_id, ce.c.status == "pending")
            .values(attempts=attempts, status="failed" if give_up else "pending",
                    result=f"error: {type(exc).__name__}"[:255],
                    processed_at=now if give_up else None)
        )
    return give_up


def _send_answer(engine: Engine, channels: Mapping[str, Channel], outcome: Outcome) -> None:
    if outcome.answer is None or outcome.kind != "inbound" or outcome.channel == "voice":
        return
    channel = channels.get(outcome.channel)
    problem = None
    if channel is None:
        problem = "no channel"
    else:
        message = OutgoingMessage(
            key=f"reply:{outcome.event_id}", channel=outcome.channel, address=outcome.address,
            language=outcome.language, subject="", body=outcome.answer)
        try:
            channel.send(message)
        except ChannelError as exc:
            problem = "channel error"
            log.warning("reply_answer_not_sent", source=outcome.channel,
                        status=outcome.result[:40], exc_type=type(exc).__name__,
                        error_code="retryable" if exc.retryable else "permanent")
    if problem is None:
        return
    ce = channel_events
    with write_lock(engine), engine.begin() as conn:
        conn.execute(update(ce).where(ce.c.id == outcome.event_id)
                     .values(result=f"{outcome.result}; answer not sent ({problem})"[:255]))


def _run(engine: Engine, settings: Settings, channels: Mapping[str, Channel], event_id: int,
         *, now: datetime, result: ProcessResult) -> Outcome | None:
    try:
        outcome = _process_one(engine, settings, event_id, now)
    except Exception as exc:
        gave_up = _failed(engine, event_id, exc, now)
        log.error("channel_event_failed", event_id=event_id, exc_type=type(exc).__name__,
                  status="failed" if gave_up else "retry")
        if gave_up:
            result.failed += 1
        return None
    if outcome is None:
        return None
    result.processed += 1
    log.info("channel_event_processed", event_id=event_id, source=outcome.channel,
             status=outcome.result[:60], patient_id=outcome.patient_id,
             entry_id=outcome.entry_id)
    _send_answer(engine, channels, outcome)
    return outcome


def process_events(
    engine: Engine,
    settings: Settings,
    channels: Mapping[str, Channel],
    *,
    now: datetime | None = None,
    limit: int = 200,
    ids: Sequence[int] | None = None,
) -> ProcessResult:
    """Process up to ``limit`` pending events (only ``ids`` when given), oldest first."""
    now = _utc(now or datetime.now(UTC))
    ce = channel_events
    query = select(ce.c.id).where(ce.c.status == "pending", ce.c.kind.in_(KINDS))
    if ids is not None:
        if not ids:
            return ProcessResult()
        query = query.where(ce.c.id.in_(list(ids)))
    with engine.connect() as conn:
        pending = [int(r.id) for r in conn.execute(query.order_by(ce.c.id).limit(limit))]
    result = ProcessResult()
    for event_id in pending:
        _run(engine, settings, channels, event_id, now=now, result=result)
    return result


def process_event_now(
    engine: Engine,
    settings: Settings,
    channels: Mapping[str, Channel],
    event_id: int,
    *,
    now: datetime | None = None,
) -> Outcome:
    """Process one event at once (the voice webhook answers with the result). An event that
    was processed already (a redelivered webhook) is worked out again without effects: its
    transaction is rolled back, and nothing is sent. ``LookupError`` when there is no such
    event."""
    now = _utc(now or datetime.now(UTC))
    outcome = _run(engine, settings, channels, event_id, now=now, result=ProcessResult())
    if outcome is not None:
        return outcome
    ce = channel_events
    with write_lock(engine), engine.connect() as conn:
        tx = conn.begin()
        try:
            row = conn.execute(select(ce).where(ce.c.id == event_id)).first()
            if row is None:
                raise LookupError(f"no channel event {event_id}")
            return _handle(conn, settings, row, now)
        finally:
            tx.rollback()


def pending_count(engine: Engine) -> int:
    """How many events wait (for metrics and tests)."""
    ce = channel_events
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(ce).where(
            ce.c.status == "pending", ce.c.kind.in_(KINDS))).scalar_one())
