"""Persistence for FHIR in: per-connection notification secrets and per (connection, resource
type) subscription state rows (``fhir_secrets``, ``fhir_subscriptions``)."""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from integration.db import write_lock
from integration.models import fhir_secrets, fhir_subscriptions

__all__ = [
    "SubscriptionRow",
    "ensure_secret",
    "ensure_subscription_row",
    "find_by_subscription",
    "read_secret",
    "read_subscription_row",
    "update_subscription_row",
]


def read_secret(engine: Engine, connection: str) -> str | None:
    """The channel secret careloop gave ``connection``'s EHR; None before ``ensure``."""
    with engine.connect() as conn:
        value = conn.execute(
            select(fhir_secrets.c.secret).where(fhir_secrets.c.connection == connection)
        ).scalar_one_or_none()
    return str(value) if value is not None else None


def ensure_secret(engine: Engine, connection: str, *, now: datetime | None = None) -> str:
    """The connection's secret, made (43 URL-safe characters, 256 bits) the first time."""
    found = read_secret(engine, connection)
    if found is not None:
        return found
    secret = _secrets.token_urlsafe(32)
    with write_lock(engine), engine.begin() as conn:
        existing = conn.execute(
            select(fhir_secrets.c.secret).where(fhir_secrets.c.connection == connection)
        ).scalar_one_or_none()
        if existing is not None:
            return str(existing)
        conn.execute(insert(fhir_secrets).values(
            connection=connection, secret=secret, created_at=now or datetime.now(UTC)))
    return secret


@dataclass(frozen=True)
class SubscriptionRow:
    connection: str
    resource_type: str
    subscription_id: str | None
    mode: str
    topic: str | None
    status: str | None
    tracker: dict[str, Any] | None
    poll_cursor: dict[str, Any] | None
    catchup_claimed_at: datetime | None
    last_notification_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> SubscriptionRow:
        return cls(row.connection, row.resource_type, row.subscription_id, row.mode, row.topic,
                   row.status, row.tracker, row.poll_cursor, row.catchup_claimed_at,
                   row.last_notification_at)


def read_subscription_row(conn: Connection, connection: str,
                          resource_type: str) -> SubscriptionRow | None:
    row = conn.execute(select(fhir_subscriptions).where(
        fhir_subscriptions.c.connection == connection,
        fhir_subscriptions.c.resource_type == resource_type,
    )).first()
    return SubscriptionRow.from_row(row) if row is not None else None


def find_by_subscription(conn: Connection, connection: str, subscription_id: str,
                         *, for_update: bool = False) -> SubscriptionRow | None:
    """The state row of ``Subscription/subscription_id`` on ``connection``."""
    query = select(fhir_subscriptions).where(
        fhir_subscriptions.c.connection == connection,
        fhir_subscriptions.c.subscription_id == subscription_id,
    )
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    return SubscriptionRow.from_row(row) if row is not None else None


def ensure_subscription_row(conn: Connection, connection: str, resource_type: str, *,
                            mode: str, now: datetime) -> SubscriptionRow:
    found = read_subscription_row(conn, connection, resource_type)
    if found is not None:
        return found
    conn.execute(insert(fhir_subscriptions).values(
        connection=connection, resource_type=resource_type, mode=mode, updated_at=now))
    created = read_subscription_row(conn, connection, resource_type)
    assert created is not None
    return created


def update_subscription_row(conn: Connection, connection: str, resource_type: str,
                            values: Mapping[str, Any], *, now: datetime) -> None:
    conn.execute(update(fhir_subscriptions).where(
        fhir_subscriptions.c.connection == connection,
        fhir_subscriptions.c.resource_type == resource_type,
    ).values(**values, updated_at=now))
