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

SMART access tokens are cached in memory only, by the FHIR client of each stage that talks to
the EHR (FHIR ingestion, write-back, scheduling), never in the database. The page shows the
expiry of the tokens *this* process holds; with Celery workers, or before this process has
called the EHR, it says "not held by this process" rather than guess.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine, select

from adapters.fhir.smart import AccessToken
from integration.console.auth import Viewer, now_for, runtime_of
from integration.console.render import render
from integration.fhir_ingest import CLAIM_TIMEOUT
from integration.models import fhir_subscriptions
from integration.runtime import Runtime
from integration.settings import Settings
from subscriptions.tracking import TrackerState

__all__ = ["ConnectionRow", "TokenInfo", "connection_rows", "held_tokens", "router"]

router = APIRouter(include_in_schema=False, tags=["console"])

SILENT_FACTOR = 2
"""Silent: nothing heard for more than this many heartbeat periods (as the alert)."""


@dataclass(frozen=True)
class TokenInfo:
    """A SMART access token this process holds for a connection (the value is never read)."""

    expires_at: datetime
    holders: tuple[str, ...]
    """The stages holding one (``fhir``, ``writeback``, ``scheduling``)."""


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


def token_holders(runtime: Runtime) -> list[tuple[str, Any]]:
    """The objects of this process that keep a FHIR client per connection, by stage name."""
    fhir = getattr(runtime, "fhir", None)
    return [("fhir", getattr(fhir, "ingest", None)),
            ("writeback", getattr(runtime, "writeback", None)),
            ("scheduling", getattr(runtime, "scheduling", None))]


def held_tokens(holders: list[tuple[str, Any]]) -> dict[str, TokenInfo]:
    """Per connection name: the latest expiry of the SMART tokens the ``holders`` cache.

    Each holder keeps its clients in ``_clients`` (connection name, or (loop id, name), to a
    client or (loop, client)); a client's ``auth`` is a
    :class:`adapters.fhir.smart.SmartBackendAuth` whose ``token`` is the cached
    :class:`adapters.fhir.smart.AccessToken`, if any. Only the expiry is read."""
    found: dict[str, TokenInfo] = {}
    for stage, holder in holders:
        clients = getattr(holder, "_clients", None)
        if not isinstance(clients, dict):
            continue
        for key, value in list(clients.items()):
            api = value[1] if isinstance(value, tuple) else value
            name = key[1] if isinstance(key, tuple) else key
            token = getattr(getattr(api, "auth", None), "token", None)
            if not isinstance(name, str) or not isinstance(token, AccessToken):
                continue
            expires = datetime.fromtimestamp(token.expires_at, UTC)
            known = found.get(name)
            if known is None:
                found[name] = TokenInfo(expires, (stage,))
            else:
                holders_now = (*known.holders, stage) if stage not in known.holders else (
                    known.holders)
                found[name] = TokenInfo(max(known.expires_at, expires), holders_now)
    return found


@router.get("/console/connections")
async def console_connections(request: Request, session: Viewer) -> Response:
    """The EHR connections and their subscriptions (table ``connections``), and the SMART
    token each connection has in this process (table ``tokens``)."""
    runtime = runtime_of(request)
    now = now_for(request)
    rows = await asyncio.to_thread(connection_rows, runtime.engine, runtime.settings, now)
    tokens = held_tokens(token_holders(runtime))
    return render("connections.html", session=session, active="connections", rows=rows,
                  connections=runtime.settings.connections, tokens=tokens, now=now,
                  factor=SILENT_FACTOR, claim_minutes=int(CLAIM_TIMEOUT.total_seconds() // 60),
                  ago=lambda t: max(0.0, (now - t).total_seconds()),
                  left=lambda t: (t - now).total_seconds())
