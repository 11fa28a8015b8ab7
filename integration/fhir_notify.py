"""``POST /fhir/notify/{connection}``: the Subscription rest-hook endpoint.

The EHR authenticates with the channel secret careloop gave it (``Authorization: Bearer`` or
``X-Careloop-Secret``), compared in constant time; this is not an API client token, so the
route does not go through ``require_scope``. The raw body is committed to the inbox (source
``fhir``) through the runtime's group committer before the 2xx answer (invariant 1); the
processing (reads from the EHR, the timeline) happens later in :mod:`integration.fhir_ingest`.
Errors are OperationOutcomes.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from integration.bodies import BodyRefused, read_limited
from integration.fhir_state import read_secret
from integration.intake import StorageUnavailable
from integration.logs import get_logger
from integration.models import InboxStatus
from subscriptions import NotificationError, parse_notification, secret_matches

__all__ = ["FHIR_JSON", "notification_row", "operation_outcome", "router"]

log = get_logger("careloop.fhir.notify")

FHIR_JSON = "application/fhir+json"
router = APIRouter(tags=["fhir"])


def operation_outcome(status: int, code: str, text: str,
                      headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error" if status >= 400 else "information",
                       "code": code, "diagnostics": text}]}
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)




def notification_row(connection: str, body: bytes, *, now: datetime,
                     stale_after: timedelta) -> tuple[dict[str, Any], str | None]:
    """The inbox row for one notification body, and the parse error if it is unreadable
    (then the row is ``rejected``: kept for inspection, never processed)."""
    error: str | None = None
    subscription = ""
    kind = ""
    try:
        parsed = parse_notification(body)
        subscription, kind = parsed.subscription_id or "", parsed.type
    except NotificationError as exc:
        error = str(exc)
    status = InboxStatus.REJECTED if error else InboxStatus.RECEIVED
    row = {
        "source": "fhir",
        "peer": connection[:255],
        "sender": connection[:255],
        "dedup_key": f"fhir:{connection}:{hashlib.sha256(body).hexdigest()}"[:512],
        "message_type": "notification",
        "control_id": subscription[:199],
        "version": kind[:16],
        "raw": body,
        "status": status.value,
        "ack_code": "",
        "ack": None,
        "attempts": 0,
        "last_error": error[:2000] if error else None,
        "app_ack": None,
        "received_at": now,
        "next_attempt_at": now + stale_after if error is None else None,
    }
    return row, error


@router.post(
    "/fhir/notify/{connection}",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A Subscription notification Bundle (R4 backport, R4B or R5).",
            "content": {FHIR_JSON: {"schema": {"type": "object"}},
                        "application/json": {"schema": {"type": "object"}}},
        }
    },
    responses={
        200: {"description": "stored; processed later"},
        400: {"description": "stored for inspection, but not a notification careloop reads"},
        401: {"description": "missing or wrong channel secret; nothing stored"},
        404: {"description": "no such connection"},
        413: {"description": "the body is larger than the limit"},
        503: {"description": "could not be stored; resend later"},
    },
)
async def notify(connection: str, request: Request) -> Response:
    """Subscription rest-hook endpoint for the EHR connection ``connection``; verifies the
    channel secret, stores the notification, then answers."""
    runtime = request.app.state.runtime
    settings = runtime.settings
    if settings.connection(connection) is None:
        return operation_outcome(404, "not-found", f"no FHIR connection named {connection!r}")
    try:
        expected = await asyncio.to_thread(read_secret, runtime.engine, connection)
    except Exception as exc:
        log.error("fhir_secret_unavailable", connection=connection, exc_type=type(exc).__name__)
        return operation_outcome(503, "transient", "the notification could not be checked; "
                                 "resend later", {"Retry-After": "5"})
    if expected is None or not secret_matches(request.headers.items(), expected):
        log.warning("fhir_notify_unauthorized", connection=connection)
        return operation_outcome(401, "security", "missing or wrong notification secret",
                                 {"WWW-Authenticate": 'Bearer realm="careloop-fhir-notify"'})
    limit = settings.http_max_body_bytes
    try:
        body = await read_limited(request, limit)
    except BodyRefused as exc:
        return operation_outcome(exc.status, "too-costly" if exc.status == 413 else "invalid",
                                 exc.message)
    now = datetime.now(UTC)
    row, error = notification_row(connection, body, now=now,
                                  stale_after=timedelta(seconds=settings.stale_after_s))
    try:
        ((inbox_id, inserted),) = await runtime.committer.submit([row])
    except StorageUnavailable:
        log.error("fhir_notify_unavailable", connection=connection)
        return operation_outcome(503, "transient", "the notification could not be stored; "
                                 "resend later", {"Retry-After": "5"})
    log.info("fhir_notification_stored" if inserted else "fhir_notification_duplicate",
             connection=connection, inbox_id=inbox_id, status=row["status"])
    if error is not None:
        return operation_outcome(400, "invalid", error)
    return Response(status_code=200)
