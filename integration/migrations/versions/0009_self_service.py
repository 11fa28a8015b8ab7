"""Self-service: bookings, the waitlist and its offers, patient-page access

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PatientId = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "bookings",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("patient_id", PatientId, nullable=False),
        sa.Column("old_entry_id", sa.String(32), nullable=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("slot_ref", sa.String(512), nullable=False),
        sa.Column("start", Tz, nullable=False),
        sa.Column("end", Tz, nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("method", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("new_appointment_ref", sa.String(512), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", Tz, nullable=False),
        sa.Column("finished_at", Tz, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bookings")),
    )
    op.create_index("ix_bookings_patient_id", "bookings", ["patient_id", "started_at"])
    op.create_index("ix_bookings_started_at", "bookings", ["started_at"])
    op.create_table(
        "waitlist_entries",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("patient_id", PatientId, nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=True),
        sa.Column("connection", sa.String(64), nullable=True),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("location", sa.String(255), nullable=False),
        sa.Column("earliest", Tz, nullable=True),
        sa.Column("latest", Tz, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_waitlist_entries")),
    )
    op.create_index("ix_waitlist_entries_status", "waitlist_entries",
                    ["status", "service", "created_at"])
    op.create_index("ix_waitlist_entries_patient_id", "waitlist_entries", ["patient_id"])
    op.create_table(
        "freed_slots",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("connection", sa.String(64), nullable=True),
        sa.Column("slot_ref", sa.String(512), nullable=True),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("location", sa.String(255), nullable=False),
        sa.Column("start", Tz, nullable=False),
        sa.Column("end", Tz, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("freed_at", Tz, nullable=False),
        sa.Column("filled_at", Tz, nullable=True),
        sa.Column("filled_by", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_freed_slots")),
        sa.UniqueConstraint("key", name=op.f("uq_freed_slots_key")),
    )
    op.create_index("ix_freed_slots_status", "freed_slots", ["status", "start"])
    op.create_table(
        "waitlist_offers",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("slot_id", sa.BigInteger(), nullable=False),
        sa.Column("waitlist_id", sa.BigInteger(), nullable=False),
        sa.Column("patient_id", PatientId, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("offered_at", Tz, nullable=False),
        sa.Column("expires_at", Tz, nullable=False),
        sa.Column("responded_at", Tz, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_waitlist_offers")),
        sa.UniqueConstraint("slot_id", "waitlist_id", name="uq_waitlist_offers_slot_id"),
    )
    op.create_index("ix_waitlist_offers_status", "waitlist_offers", ["status", "expires_at"])
    op.create_table(
        "portal_access",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("patient_id", PatientId, nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_at", Tz, nullable=True),
        sa.Column("verified_at", Tz, nullable=True),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_portal_access")),
    )
    op.create_index("ix_touches_sent_at", "touches", ["sent_at"])
    # The outcome report's period filter for touches never sent (skipped, held back).
    op.create_index("ix_touches_unsent_updated_at", "touches", ["updated_at"],
                    sqlite_where=sa.text("sent_at IS NULL"),
                    postgresql_where=sa.text("sent_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_touches_unsent_updated_at", table_name="touches")
    op.drop_index("ix_touches_sent_at", table_name="touches")
    op.drop_table("portal_access")
    op.drop_index("ix_waitlist_offers_status", table_name="waitlist_offers")
    op.drop_table("waitlist_offers")
    op.drop_index("ix_freed_slots_status", table_name="freed_slots")
    op.drop_table("freed_slots")
    op.drop_index("ix_waitlist_entries_patient_id", table_name="waitlist_entries")
    op.drop_index("ix_waitlist_entries_status", table_name="waitlist_entries")
    op.drop_table("waitlist_entries")
    op.drop_index("ix_bookings_started_at", table_name="bookings")
    op.drop_index("ix_bookings_patient_id", table_name="bookings")
    op.drop_table("bookings")
