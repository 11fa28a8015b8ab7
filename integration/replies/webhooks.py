"""Provider webhooks: ``POST /channels/{channel}/status`` and ``/channels/{channel}/inbound``.

For ``sms`` and ``voice`` when that channel's provider is ``twilio`` (404 otherwise):

1. the form body is read with a size limit (413);
2. ``X-Twilio-Signature`` is verified against the public URL Twilio called
   (``base_url`` + path + query) and the form parameters, with that channel's auth token:
   missing or wrong → 403, nothing stored;
3. one ``channel_events`` row is committed (``INSERT ... ON CONFLICT DO NOTHING`` on the
   provider's id: ``I-Twilio-Idempotency-Token`` when Twilio sends it, else the message or call
   sid, ``sid:status`` for receipts and ``sid:digits`` for key presses), so a redelivered
   webhook is answered 200 again and stores nothing new; 503 when it cannot be stored;
4. the answer: SMS and receipts get an empty ``<Response/>`` (the SMS answer is sent later
   through the channel by :mod:`integration.replies.processor`, after its effects are
   committed); a key press is processed at once and answered with TwiML in the touch's
   language: the acknowledgement, the message again (3), or the options again.

The runtime is ``request.app.state.runtime``: ``settings``, ``engine``, and optionally
``channels`` (``Mapping[str, Channel]``) and ``on_channel_event(event_id)``, called after an
SMS or receipt is stored to wake the processor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from adapters.twilio import (
    gather_twiml,
    message_twiml,
    parse_inbound,
    parse_status,
    say_twiml,
    verify_signature,
)
from integration.bodies import BodyRefused, read_limited
from integration.db import write_lock
from integration.logs import get_logger
from integration.models import channel_events
from integration.outreach.policy import normal_address
from integration.replies.processor import Outcome, process_event_now
from integration.replies.texts import Spoken, answer_language, voice_text
from integration.settings import Settings

__all__ = ["MAX_WEBHOOK_BYTES", "TWIML", "event_row", "router", "store_event"]

log = get_logger("careloop.replies")

router = APIRouter(tags=["channels"])
TWIML = "application/xml"
MAX_WEBHOOK_BYTES = 64 * 1024
"""Twilio's webhooks are a few kilobytes (an SMS body is at most 1,600 characters)."""
_CHANNELS = ("sms", "voice")


class _Problem(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> Response:
        return JSONResponse({"code": self.code, "message": self.message},
                            status_code=self.status, headers=self.headers)


async def _read_limited(request: Request, limit: int) -> bytes:
    try:
        return await read_limited(request, limit)
    except BodyRefused as exc:
        raise _Problem(exc.status, exc.code, exc.message) from None


def _form(body: bytes) -> dict[str, list[str]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Problem(400, "bad_request", "the body is not UTF-8 form data") from None
    return parse_qs(text, keep_blank_values=True)


def public_url(settings: Settings, request: Request) -> str:
    """The URL Twilio called, as configured there: careloop's public ``base_url``, the path,
    and the query exactly as received."""
    url = settings.base_url.rstrip("/") + request.url.path
    return f"{url}?{request.url.query}" if request.url.query else url


def event_row(
    channel: str,
    kind: str,
    params: Mapping[str, list[str]],
    *,
    touch_key: str | None,
    idempotency_token: str | None,
    now: datetime,
) -> dict[str, Any]:
    """The ``channel_events`` row for one webhook (``ValueError`` when it is not Twilio's)."""
    flat = {k: v[-1] if v else "" for k, v in params.items()}
    if kind == "status":
        status = parse_status(flat)
        provider_id = f"{status.provider_id}:{status.status}"
        address = flat.get("To", "")
    else:
        inbound = parse_inbound(flat)
        provider_id = inbound.provider_id
        if inbound.kind == "voice":
            # One call posts a key press per <Gather>: "3" (repeat) then "1" (confirm).
            provider_id = f"{provider_id}:{inbound.text}"
        address = inbound.from_address
    payload: dict[str, Any] = {k: v[0] if len(v) == 1 else list(v) for k, v in params.items()}
    return {
        "channel": channel, "kind": kind,
        "provider_id": (idempotency_token or provider_id)[:255],
        "address": normal_address(channel, address)[:320],
        "touch_key": touch_key[:255] if touch_key else None,
        "payload": payload, "status": "pending", "result": None, "attempts": 0,
        "received_at": now, "processed_at": None,
    }


def store_event(engine: Engine, row: Mapping[str, Any]) -> tuple[int, bool]:
    """Commit the row unless the provider's id is stored already: ``(id, inserted)``."""
    ce = channel_events
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    with write_lock(engine, urgent=True), engine.begin() as conn:
        inserted = conn.execute(
            dialect.insert(ce).values(**row)
            .on_conflict_do_nothing(index_elements=["channel", "kind", "provider_id"])
            .returning(ce.c.id)
        ).scalar()
        if inserted is not None:
            return int(inserted), True
        existing = conn.execute(
            select(ce.c.id).where(ce.c.channel == row["channel"], ce.c.kind == row["kind"],
                                  ce.c.provider_id == row["provider_id"])
        ).scalar_one()
        return int(existing), False


async def _receive(channel: str, kind: str, request: Request) -> tuple[Any, int, bool, str]:
    runtime = request.app.state.runtime
    settings: Settings = runtime.settings
    if channel not in _CHANNELS:
        raise _Problem(404, "not_found", f"no webhooks for channel {channel!r}")
    config = getattr(settings.channels, channel)
    if config.provider != "twilio":
        raise _Problem(404, "not_found", f"channel {channel!r} has no provider webhooks")
    body = await _read_limited(request, min(settings.http_max_body_bytes, MAX_WEBHOOK_BYTES))
    params = _form(body)
    url = public_url(settings, request)
    signature = request.headers.get("x-twilio-signature", "")
    if not verify_signature(config.token, url, params, signature):
        log.warning("channel_webhook_forbidden", source=channel, path=request.url.path)
        raise _Problem(403, "forbidden", "missing or wrong X-Twilio-Signature")
    touch_key = request.query_params.get("key") or None
    token = request.headers.get("i-twilio-idempotency-token") or None
    try:
        row = event_row(channel, kind, params, touch_key=touch_key, idempotency_token=token,
                        now=datetime.now(UTC))
    except ValueError as exc:
        raise _Problem(400, "bad_request", str(exc)) from None
    try:
        event_id, inserted = await asyncio.to_thread(store_event, runtime.engine, row)
    except SQLAlchemyError as exc:
        log.error("channel_webhook_unavailable", source=channel, exc_type=type(exc).__name__)
        raise _Problem(503, "unavailable", "the event could not be stored; resend later",
                       {"Retry-After": "5"}) from None
    log.info("channel_event_stored" if inserted else "channel_event_duplicate",
             source=channel, status=kind, event_id=event_id)
    return runtime, event_id, inserted, url


def _poke(runtime: Any, event_id: int) -> None:
    notify = getattr(runtime, "on_channel_event", None)
    if callable(notify):
        try:
            notify(event_id)
        except Exception as exc:  # waking the processor is a nicety: the loop finds the row
            log.warning("channel_event_poke_failed", exc_type=type(exc).__name__)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "stored (or stored before); TwiML answer",
          "content": {TWIML: {"schema": {"type": "string"}}}},
    400: {"description": "not a Twilio webhook"},
    403: {"description": "missing or wrong X-Twilio-Signature; nothing stored"},
    404: {"description": "no such channel, or its provider has no webhooks"},
    413: {"description": "the body is larger than the limit"},
    503: {"description": "could not be stored; resend later"},
}
_FORM_BODY = {"requestBody": {"required": True, "content": {
    "application/x-www-form-urlencoded": {"schema": {"type": "object"}}}}}


@router.post("/channels/{channel}/status", responses=_RESPONSES, openapi_extra=_FORM_BODY)
async def status_callback(channel: str, request: Request) -> Response:
    """A delivery receipt (Twilio status callback) for a message or a call; the ``key``
    query parameter names the touch."""
    try:
        runtime, event_id, inserted, _url = await _receive(channel, "status", request)
    except _Problem as problem:
        return problem.response()
    if inserted:
        _poke(runtime, event_id)
    return Response(message_twiml(None), media_type=TWIML)


@router.post("/channels/{channel}/inbound", responses=_RESPONSES, openapi_extra=_FORM_BODY)
async def inbound(channel: str, request: Request) -> Response:
    """An SMS reply, or a key pressed in a call (``<Gather>`` action, ``key`` = the touch)."""
    try:
        runtime, event_id, inserted, url = await _receive(channel, "inbound", request)
    except _Problem as problem:
        return problem.response()
    if channel != "voice":
        if inserted:
            _poke(runtime, event_id)
        return Response(message_twiml(None), media_type=TWIML)
    settings: Settings = runtime.settings
    channels = getattr(runtime, "channels", None) or {}
    try:
        outcome = await asyncio.to_thread(process_event_now, runtime.engine, settings,
                                          channels, event_id)
    except Exception as exc:  # the event stays pending: the processor applies it later
        log.error("voice_answer_failed", event_id=event_id, exc_type=type(exc).__name__)
        language = answer_language(settings.default_language)
        text = voice_text(Spoken.TROUBLE, language, settings.organization)
        return Response(say_twiml(text, language), media_type=TWIML)
    return Response(voice_twiml(outcome, url), media_type=TWIML)


def voice_twiml(outcome: Outcome, action_url: str) -> str:
    """The TwiML answer to a key press: say the outcome, and gather again when asked to."""
    text = outcome.say or ""
    if outcome.gather:
        return gather_twiml(text, outcome.language, action_url)
    return say_twiml(text, outcome.language)
