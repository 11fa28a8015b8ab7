"""Channels and the closed loop: channel events, opt-outs, patient requests, the EHR outbox

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PatientId = sa.String(32)


def upgrade() -> None:
    with op.batch_alter_table("touches") as batch:
        batch.add_column(sa.Column("body", sa.Text(), nullable=True))
        batch.add_column(sa.Column("delivery", sa.String(16), nullable=True))
    op.create_index("ix_touches_address", "touches", ["address", "sent_at"])
    op.create_index("ix_touches_channel_address_norm", "touches", [
        "channel", sa.text("replace(replace(replace(replace(replace(replace(lower(trim(address)),"
                           "' ',''),'-',''),'.',''),'(',''),')',''),'/','')")])
    op.create_table(
        "channel_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("provider_id", sa.String(255), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("touch_key", sa.String(255), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("received_at", Tz, nullable=False),
        sa.Column("processed_at", Tz, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_events")),
        sa.UniqueConstraint("channel", "kind", "provider_id",
                            name="uq_channel_events_channel_kind_provider_id"),
    )
    op.create_index("ix_channel_events_status", "channel_events", ["status", "id"])
    op.create_table(
        "address_optouts",
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("at", Tz, nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("channel", "address", name=op.f("pk_address_optouts")),
    )
    op.create_table(
        "patient_requests",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=False),
        sa.Column("patient_id", PatientId, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("touch_key", sa.String(255), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_requests")),
        sa.UniqueConstraint("event_id", "action", name="uq_patient_requests_event_id"),
    )
    op.create_index("ix_patient_requests_entry_id", "patient_requests", ["entry_id", "action"])
    op.create_table(
        "ehr_outbox",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("target", sa.String(512), nullable=True),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", Tz, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("ehr_ref", sa.String(512), nullable=True),
        sa.Column("touch_id", sa.BigInteger(), nullable=True),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ehr_outbox")),
        sa.UniqueConstraint("key", name=op.f("uq_ehr_outbox_key")),
    )
    op.create_index("ix_ehr_outbox_status_next", "ehr_outbox", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_ehr_outbox_status_next", table_name="ehr_outbox")
    op.drop_table("ehr_outbox")
    op.drop_index("ix_patient_requests_entry_id", table_name="patient_requests")
    op.drop_table("patient_requests")
    op.drop_table("address_optouts")
    op.drop_index("ix_channel_events_status", table_name="channel_events")
    op.drop_table("channel_events")
    op.drop_index("ix_touches_channel_address_norm", table_name="touches")
    op.drop_index("ix_touches_address", table_name="touches")
    with op.batch_alter_table("touches") as batch:
        batch.drop_column("delivery")
        batch.drop_column("body")
