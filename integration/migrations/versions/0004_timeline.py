"""patients, identifiers and merges; timeline entries, their keys, sources and changes

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("merged_into", sa.String(32), nullable=True),
        sa.Column("merged_at", Tz, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
    )
    op.create_index("ix_patients_merged_into", "patients", ["merged_into"])
    op.create_table(
        "patient_identifiers",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("system", sa.String(512), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("patient_id", sa.String(32), nullable=True),
        sa.Column("created_at", Tz, nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["patients.id"],
            name=op.f("fk_patient_identifiers_patient_id_patients"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_identifiers")),
        sa.UniqueConstraint("system", "value", name="uq_patient_identifiers_system_value"),
    )
    op.create_index(
        "ix_patient_identifiers_patient_id", "patient_identifiers", ["patient_id"]
    )
    op.create_table(
        "patient_merges",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("survivor_id", sa.String(32), nullable=False),
        sa.Column("replaced_id", sa.String(32), nullable=False),
        sa.Column("at", Tz, nullable=False),
        sa.Column("source_system", sa.String(16), nullable=False),
        sa.Column("source_ref", sa.String(512), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_merges")),
        sa.UniqueConstraint("replaced_id", name=op.f("uq_patient_merges_replaced_id")),
    )
    op.create_index("ix_patient_merges_survivor_id", "patient_merges", ["survivor_id"])
    op.create_table(
        "timeline_entries",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("patient_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("time", Tz, nullable=False),
        sa.Column("end_time", Tz, nullable=True),
        sa.Column("summary", sa.String(255), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.Column("ordinal", sa.String(160), nullable=False),
        sa.Column("first_seen", Tz, nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["patients.id"],
            name=op.f("fk_timeline_entries_patient_id_patients"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_timeline_entries")),
    )
    op.create_index(
        "ix_timeline_entries_patient_time", "timeline_entries", ["patient_id", "time", "id"]
    )
    op.create_table(
        "entry_keys",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("system", sa.String(512), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["timeline_entries.id"],
            name=op.f("fk_entry_keys_entry_id_timeline_entries"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entry_keys")),
        sa.UniqueConstraint("resource_type", "system", "value", name="uq_entry_keys_key"),
    )
    op.create_index("ix_entry_keys_entry_id", "entry_keys", ["entry_id"])
    op.create_table(
        "entry_sources",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=False),
        sa.Column("system", sa.String(16), nullable=False),
        sa.Column("connection", sa.String(255), nullable=False),
        sa.Column("ref", sa.String(512), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("ordinal", sa.String(160), nullable=False),
        sa.Column("received_at", Tz, nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["timeline_entries.id"],
            name=op.f("fk_entry_sources_entry_id_timeline_entries"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entry_sources")),
        sa.UniqueConstraint("entry_id", "system", "ref", name="uq_entry_sources_entry_ref"),
    )
    op.create_table(
        "timeline_changes",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=False),
        sa.Column("patient_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_timeline_changes")),
    )


def downgrade() -> None:
    op.drop_table("timeline_changes")
    op.drop_table("entry_sources")
    op.drop_index("ix_entry_keys_entry_id", table_name="entry_keys")
    op.drop_table("entry_keys")
    op.drop_index("ix_timeline_entries_patient_time", table_name="timeline_entries")
    op.drop_table("timeline_entries")
    op.drop_index("ix_patient_merges_survivor_id", table_name="patient_merges")
    op.drop_table("patient_merges")
    op.drop_index("ix_patient_identifiers_patient_id", table_name="patient_identifiers")
    op.drop_table("patient_identifiers")
    op.drop_index("ix_patients_merged_into", table_name="patients")
    op.drop_table("patients")
