"""outreach: touches, patient preferences, the timeline-changes cursor

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "touches",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("pathway", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=False),
        sa.Column("patient_id", sa.String(32), nullable=False),
        sa.Column("due_at", Tz, nullable=True),
        sa.Column("moment", Tz, nullable=True),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("language", sa.String(35), nullable=False),
        sa.Column("template", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_at", Tz, nullable=True),
        sa.Column("provider_ref", sa.String(255), nullable=True),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_touches")),
        sa.UniqueConstraint("key", name=op.f("uq_touches_key")),
    )
    op.create_index("ix_touches_status_due", "touches", ["status", "due_at"])
    op.create_index("ix_touches_entry_id", "touches", ["entry_id"])
    op.create_index("ix_touches_patient_id", "touches", ["patient_id", "due_at"])
    op.create_table(
        "patient_preferences",
        sa.Column("patient_id", sa.String(32), nullable=False),
        sa.Column("preferred_channel", sa.String(16), nullable=True),
        sa.Column("language", sa.String(35), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=True),
        sa.Column("opted_out", sa.JSON(), nullable=True),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("pk_patient_preferences")),
    )
    op.create_table(
        "outreach_cursors",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("held_since", Tz, nullable=True),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_outreach_cursors")),
    )


def downgrade() -> None:
    op.drop_table("outreach_cursors")
    op.drop_table("patient_preferences")
    op.drop_index("ix_touches_patient_id", table_name="touches")
    op.drop_index("ix_touches_entry_id", table_name="touches")
    op.drop_index("ix_touches_status_due", table_name="touches")
    op.drop_table("touches")
