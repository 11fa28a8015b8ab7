"""Database tables (SQLAlchemy 2 Core metadata; Alembic migrations in ``migrations/``).

The database is the source of truth for all work: a row's ``status`` says what remains to be
done, and a Celery task or the in-process worker only carries its id.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

__all__ = [
    "InboxStatus",
    "api_clients",
    "audit_events",
    "inbox",
    "mapped_resources",
    "metadata",
]

# Stable constraint names, so that migrations can refer to them on every database.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class InboxStatus(StrEnum):
    RECEIVED = "received"
    """Stored and acknowledged; waiting for the processing stage."""
    PROCESSED = "processed"
    FAILED = "failed"
    """Processing found a problem in the content; kept for inspection and replay."""
    REJECTED = "rejected"
    """Unreadable (no usable MSH): answered AR/CR, kept for inspection only."""


inbox = Table(
    "inbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("source", String(16), nullable=False, doc="mllp | http | fhir"),
    Column("peer", String(255), nullable=False, default="", doc="remote address or client id"),
    Column("sender", String(255), nullable=False, default="", doc="MSH-3|MSH-4 as sent"),
    Column("dedup_key", String(512), nullable=False, unique=True),
    Column("message_type", String(32), nullable=False, default=""),
    Column("control_id", String(199), nullable=False, default=""),
    Column("version", String(16), nullable=False, default=""),
    Column("raw", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("ack_code", String(2), nullable=False, default=""),
    Column("ack", Text, nullable=True, doc="the acknowledgement sent, ER7"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("app_ack", Text, nullable=True, doc="enhanced mode: the application ACK, once built"),
    Column("warnings", JSON, nullable=True, doc="fields the mapping could not read"),
    Column("app_ack_sent_at", DateTime(timezone=True), nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Index("ix_inbox_status_next", "status", "next_attempt_at"),
    Index("ix_inbox_received_at", "received_at"),
    Index("ix_inbox_control_id", "control_id"),
    Index(
        "ix_inbox_app_ack_pending",
        "id",
        sqlite_where=text("app_ack IS NOT NULL AND app_ack_sent_at IS NULL"),
        postgresql_where=text("app_ack IS NOT NULL AND app_ack_sent_at IS NULL"),
    ),
)

mapped_resources = Table(
    "mapped_resources",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "inbox_id",
        BigId,
        ForeignKey("inbox.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("resource", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("inbox_id", "resource_type", "resource_id"),
    Index("ix_mapped_resources_resource", "resource_type", "resource_id"),
)
"""FHIR R4 resources each processed inbox row became, for the timeline stage to consume."""

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target_type", String(64), nullable=False, default=""),
    Column("target_id", String(255), nullable=False, default=""),
    Column("detail", JSON, nullable=True),
    Index("ix_audit_events_at", "at"),
)

api_clients = Table(
    "api_clients",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("client_id", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("secret_hash", String(128), nullable=False),
    Column("scopes", String(1024), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
