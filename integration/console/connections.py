"""EHR connections: ``GET /console/connections`` (role ``viewer``; no patient data).

One row per ``[[connections]]`` entry and resource type, and per ``fhir_subscriptions`` row
(a row whose connection is no longer configured is shown too, marked so): the mode, the
Subscription's id, status and topic, the last event number (from the row's
:class:`subscriptions.tracking.TrackerState`: the highest number received without a gap, and
the highest announced), when the EHR last sent a notification and a heartbeat, whether it is
*silent* (nothing heard for more than twice the heartbeat period, the rule of the
``careloop_subscription_silence_seconds`` alert; backport subscriptions only, classic ones
have no heartbeat and polled ones are not pushed to), whether a catch-up is running (its
claim, ``catchup_claimed_at``, younger than the claim timeout), and the last error.

SMART access tokens stay in the memory of the FHIR client that asked for them; each new
token's expiry, scope and holder (``host:pid``) is recorded in ``fhir_tokens``
(:mod:`integration.fhir_tokens`), so the page shows when each connection's latest token
expires, whichever process (this server or a Celery worker) holds it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine, select

from integration import fhir_tokens
from integration.console.auth import Viewer, now_for, runtime_of
from integration.console.render import render
from integration.fhir_ingest import CLAIM_TIMEOUT
from integration.models import fhir_subscriptions
from integration.settings import Settings
from subscriptions.tracking import TrackerState

__all__ = ["ConnectionRow", "connection_rows", "router"]

router = APIRouter(include_in_schema=False, tags=["console"])

SILENT_FACTOR = 2
"""Silent: nothing heard for more than this many heartbeat periods (as the alert)."""


@dataclass(frozen=True)
class ConnectionRow:
    """One subscription (connection and resource type) as the page shows it."""

    connection: str
    resource_type: str
    configured: bool
    """The connection and resource type are in the settings (else: a leftover row)."""
    mode: str
    fhir_base: str
    heartbeat_s: int | None
    """The heartbeat period careloop asks for (backport); None when none applies."""
    stored: bool
    """A ``fhir_subscriptions`` row exists (``subscriptions ensure`` has run)."""
    subscription_id: str | None = None
    status: str | None = None
    topic: str | None = None
    contiguous: int | None = None
    """The highest event number received with nothing missing before it."""
    highest_known: int | None = None
    """The highest event number the EHR announced."""
    gap_since: datetime | None = None
    poll_since: str | None = None
    """Poll mode: the server time the next search starts from."""
    last_notification_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    silence_s: float | None = None
    """Seconds since the EHR last sent anything (a notification or a heartbeat)."""
    silent: bool = False
    catchup_since: datetime | None = None
    """A catch-up holds the row's claim since then (None: none running)."""
    last_error: str | None = None
    updated_at: datetime | None = None
    tracker_error: str | None = None
    """The stored tracker state could not be read (an older or damaged row)."""


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _from_row(row: Any, base: ConnectionRow, now: datetime) -> ConnectionRow:
    notified = _aware(row.last_notification_at)
    beat = _aware(row.last_heartbeat_at)
    heard = [t for t in (notified, beat) if t is not None]
    silence = max(0.0, (now - max(heard)).total_seconds()) if heard else None
    heartbeat = base.heartbeat_s if row.mode == "backport" else None
    silent = bool(base.configured and heartbeat and silence is not None
                  and silence > SILENT_FACTOR * heartbeat)
    contiguous = highest = None
    gap = None
    problem = None
    if row.tracker:
        try:
            state = TrackerState.from_json(row.tracker)
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"tracker state unreadable: {exc}"
        else:
            contiguous, highest, gap = state.contiguous, state.highest_known, state.gap_seen_at
    poll_since = None
    if isinstance(row.poll_cursor, dict) and row.poll_cursor.get("since"):
        poll_since = str(row.poll_cursor["since"])
    claimed = _aware(row.catchup_claimed_at)
    running = claimed if claimed is not None and claimed > now - CLAIM_TIMEOUT else None
    return ConnectionRow(
        connection=row.connection, resource_type=row.resource_type,
        configured=base.configured, mode=row.mode, fhir_base=base.fhir_base,
        heartbeat_s=heartbeat, stored=True, subscription_id=row.subscription_id,
        status=row.status, topic=row.topic, contiguous=contiguous, highest_known=highest,
        gap_since=gap if highest is not None and contiguous is not None
        and highest > contiguous else None,
        poll_since=poll_since, last_notification_at=notified, last_heartbeat_at=beat,
        silence_s=silence, silent=silent, catchup_since=running,
        last_error=row.last_error, updated_at=_aware(row.updated_at), tracker_error=problem,
    )


def connection_rows(engine: Engine, settings: Settings, now: datetime) -> list[ConnectionRow]:
    """Every configured (connection, resource type) and every stored subscription row, in
    the settings' order, leftovers last."""
    with engine.connect() as conn:
        stored = {(r.connection, r.resource_type): r
                  for r in conn.execute(select(fhir_subscriptions))}
    out: list[ConnectionRow] = []
    for c in settings.connections:
        for resource_type in c.resource_types:
            base = ConnectionRow(
                connection=c.name, resource_type=resource_type, configured=True, mode=c.mode,
                fhir_base=c.fhir_base, heartbeat_s=c.heartbeat_s if c.mode == "backport"
                else None, stored=False, topic=c.topics.get(resource_type))
            row = stored.pop((c.name, resource_type), None)
            out.append(_from_row(row, base, now) if row is not None else base)
    for (name, resource_type), row in sorted(stored.items()):
        configured = settings.connection(name)
        base = ConnectionRow(
            connection=name, resource_type=resource_type, configured=False, mode=row.mode,
            fhir_base=configured.fhir_base if configured is not None else "", heartbeat_s=None,
            stored=True)
        out.append(_from_row(row, base, now))
    return out


@router.get("/console/connections")
async def console_connections(request: Request, session: Viewer) -> Response:
    """The EHR connections and their subscriptions (table ``connections``), and the SMART
    token each connection last obtained, in any process (table ``tokens``)."""
    runtime = runtime_of(request)
    now = now_for(request)
    rows = await asyncio.to_thread(connection_rows, runtime.engine, runtime.settings, now)
    tokens = await asyncio.to_thread(fhir_tokens.read, runtime.engine)
    return render("connections.html", session=session, active="connections", rows=rows,
                  connections=runtime.settings.connections, tokens=tokens, now=now,
                  factor=SILENT_FACTOR, claim_minutes=int(CLAIM_TIMEOUT.total_seconds() // 60),
                  ago=lambda t: max(0.0, (now - t).total_seconds()),
                  left=lambda t: (t - now).total_seconds())
