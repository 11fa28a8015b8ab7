"""FHIR in: per-connection notification secrets and subscription state

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fhir_secrets",
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("secret", sa.String(512), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("connection", name=op.f("pk_fhir_secrets")),
    )
    op.create_table(
        "fhir_subscriptions",
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("subscription_id", sa.String(255), nullable=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("topic", sa.String(512), nullable=True),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("tracker", sa.JSON(), nullable=True),
        sa.Column("poll_cursor", sa.JSON(), nullable=True),
        sa.Column("last_notification_at", Tz, nullable=True),
        sa.Column("last_heartbeat_at", Tz, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("catchup_claimed_at", Tz, nullable=True),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("connection", "resource_type", name=op.f("pk_fhir_subscriptions")),
    )
    op.create_index("ix_fhir_subscriptions_subscription_id", "fhir_subscriptions",
                    ["subscription_id"])


def downgrade() -> None:
    op.drop_index("ix_fhir_subscriptions_subscription_id", table_name="fhir_subscriptions")
    op.drop_table("fhir_subscriptions")
    op.drop_table("fhir_secrets")
