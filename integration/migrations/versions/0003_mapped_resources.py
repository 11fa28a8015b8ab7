"""mapped FHIR resources per inbox row, and mapping warnings

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "mapped_resources",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("inbox_id", BigId, nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["inbox_id"], ["inbox.id"],
            name=op.f("fk_mapped_resources_inbox_id_inbox"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mapped_resources")),
        sa.UniqueConstraint(
            "inbox_id", "resource_type", "resource_id",
            name=op.f("uq_mapped_resources_inbox_id"),
        ),
    )
    op.create_index(
        "ix_mapped_resources_resource", "mapped_resources", ["resource_type", "resource_id"]
    )
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("warnings")
    op.drop_index("ix_mapped_resources_resource", table_name="mapped_resources")
    op.drop_table("mapped_resources")
