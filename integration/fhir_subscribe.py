"""``careloop subscriptions ensure``: create, repair, renew or reactivate the Subscriptions
configured for each ``[[connections]]`` entry, and remember them in ``fhir_subscriptions``.

Per connection and resource type: ``find_request`` (``Subscription?url=<endpoint>``), then
``plan_ensure`` and the actions, executed against the EHR. ``CatchUpFirst`` (a subscription in
``error`` or ``off``) runs a catch-up first, then plans again with that id caught up (the
reactivation). Running it again yields only ``Keep``. ``poll`` connections get a state row and
no Subscription. The connection's channel secret is made on first use (``fhir_secrets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from adapters.fhir import FHIRApi, FHIRRequest, FHIRResponse, bundle_resources
from integration.db import write_lock
from integration.fhir_ingest import ClientFactory, FhirIngest, recording_clients
from integration.fhir_state import (
    ensure_secret,
    ensure_subscription_row,
    read_subscription_row,
    update_subscription_row,
)
from integration.logs import get_logger
from integration.settings import Connection, Settings
from subscriptions import (
    Action,
    CatchUp,
    CatchUpFirst,
    Create,
    Delete,
    Keep,
    Reference,
    SubscriptionSpec,
    SubscriptionSpecError,
    TrackerState,
    Update,
    find_request,
    plan_ensure,
)

__all__ = ["EnsureLine", "ensure_subscriptions", "notify_endpoint", "spec_for"]

log = get_logger("careloop.fhir.subscribe")


@dataclass(frozen=True)
class EnsureLine:
    """What ``ensure`` did for one (connection, resource type)."""

    connection: str
    resource_type: str
    action: str
    """created | updated | deleted | kept | caught-up | poll | error"""
    subscription_id: str | None
    detail: str = ""

    def __str__(self) -> str:
        sub = f"Subscription/{self.subscription_id}" if self.subscription_id else "-"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.connection:<16} {self.resource_type:<18} {self.action:<9} {sub}{detail}"


def notify_endpoint(settings: Settings, connection: Connection) -> str:
    return f"{settings.base_url.rstrip('/')}/fhir/notify/{connection.name}"


def spec_for(settings: Settings, connection: Connection, resource_type: str,
             secret: str) -> SubscriptionSpec:
    backport = connection.mode == "backport"
    return SubscriptionSpec(
        resource_type=resource_type,
        endpoint=notify_endpoint(settings, connection),
        secret=secret,
        mode="backport" if backport else "classic",
        topic=connection.topics.get(resource_type) if backport else None,
        payload=connection.payload,
        heartbeat_s=(connection.heartbeat_s or None) if backport else None,
        reason=f"careloop: {resource_type} changes",
    )


def _new_id(response: FHIRResponse) -> str | None:
    body = response.body
    if isinstance(body, dict) and body.get("id"):
        return str(body["id"])
    location = response.location
    return Reference.parse(location).id if location else None


async def _found(api: FHIRApi, spec: SubscriptionSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for bundle in api.pages(find_request(spec)):
        out.extend(r for r in bundle_resources(bundle) if r.get("resourceType") == "Subscription")
    return out


async def _execute(api: FHIRApi, action: Action) -> tuple[str, str | None, str]:
    if isinstance(action, Create):
        response = await api.send(FHIRRequest.post(
            "Subscription", action.resource, headers={"Prefer": "return=representation"}))
        return "created", _new_id(response), action.reason
    if isinstance(action, Update):
        headers = [("Prefer", "return=representation")]
        if action.if_match:
            headers.append(("If-Match", f'W/"{action.if_match}"'))
        await api.send(FHIRRequest("PUT", f"Subscription/{action.subscription_id}",
                                   body=action.resource, headers=tuple(headers)))
        return "updated", action.subscription_id, ", ".join(action.reasons)
    if isinstance(action, Delete):
        await api.send(FHIRRequest("DELETE", f"Subscription/{action.subscription_id}"))
        return "deleted", action.subscription_id, action.reason
    if isinstance(action, Keep):
        return "kept", action.subscription_id, action.reason
    raise TypeError(f"unexpected action {action!r}")


def _remember(engine: Engine, connection: Connection, rtype: str, sub_id: str | None, *,
              topic: str | None, now: datetime) -> None:
    with write_lock(engine), engine.begin() as conn:
        row = ensure_subscription_row(conn, connection.name, rtype, mode=connection.mode,
                                      now=now)
        values: dict[str, Any] = {"mode": connection.mode, "topic": topic}
        if sub_id is not None and sub_id != row.subscription_id:
            values.update(subscription_id=sub_id,
                          tracker=TrackerState.new(sub_id, now=now).to_json(), status=None)
        update_subscription_row(conn, connection.name, rtype, values, now=now)


def _fixed(api: FHIRApi) -> ClientFactory:
    def factory(_connection: Connection) -> FHIRApi:
        return api
    return factory


async def ensure_subscriptions(
    engine: Engine,
    settings: Settings,
    *,
    client_factory: ClientFactory | None = None,
    now: datetime | None = None,
) -> list[EnsureLine]:
    """Ensure every configured Subscription; one line per action (errors included: the
    other connections and types still run)."""
    now = now or datetime.now(UTC)
    lines: list[EnsureLine] = []
    for connection in settings.connections:
        if connection.mode == "poll":
            for rtype in connection.resource_types:
                _remember(engine, connection, rtype, None, topic=None, now=now)
                lines.append(EnsureLine(connection.name, rtype, "poll", None,
                                        f"every {connection.poll_interval_s} s"))
            continue
        secret = ensure_secret(engine, connection.name, now=now)
        api = (client_factory or recording_clients(engine))(connection)
        ingest = FhirIngest(engine, settings, client_factory=_fixed(api))
        try:
            for rtype in connection.resource_types:
                lines += await _ensure_one(engine, settings, connection, rtype, secret, api,
                                           ingest, now)
        finally:
            close = getattr(api, "aclose", None)
            if close is not None:
                await close()
    return lines


async def _ensure_one(engine: Engine, settings: Settings, connection: Connection,  # noqa: PLR0917
                      rtype: str, secret: str, api: FHIRApi, ingest: FhirIngest,
                      now: datetime) -> list[EnsureLine]:
    lines: list[EnsureLine] = []
    try:
        spec = spec_for(settings, connection, rtype, secret)
        caught: set[str] = set()
        for _round in range(2):
            actions = plan_ensure(spec, await _found(api, spec), now=now, caught_up=caught)
            first = [a for a in actions if isinstance(a, CatchUpFirst)]
            if not first:
                break
            for catch in first:
                _remember(engine, connection, rtype, catch.subscription_id, topic=spec.topic,
                          now=now)
                with engine.connect() as conn:
                    row = read_subscription_row(conn, connection.name, rtype)
                state = (TrackerState.from_json(row.tracker) if row and row.tracker
                         else TrackerState.new(catch.subscription_id, now=now))
                decision = CatchUp("status-error", (), state.good_timestamp,
                                   state.highest_known)
                await ingest.catch_up(connection, rtype, decision)
                caught.add(catch.subscription_id)
                lines.append(EnsureLine(connection.name, rtype, "caught-up",
                                        catch.subscription_id, f"it was {catch.status}"))
        for step in actions:
            if isinstance(step, CatchUpFirst):
                continue
            done, sub_id, detail = await _execute(api, step)
            lines.append(EnsureLine(connection.name, rtype, done, sub_id, detail))
            if done != "deleted":
                _remember(engine, connection, rtype, sub_id, topic=spec.topic, now=now)
    except (SubscriptionSpecError, Exception) as exc:
        log.warning("fhir_ensure_failed", connection=connection.name,
                    exc_type=type(exc).__name__)
        lines.append(EnsureLine(connection.name, rtype, "error", None, str(exc)[:300]))
    return lines
