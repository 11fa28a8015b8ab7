"""The latest SMART access token of each EHR connection: when it expires (never its value)

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fhir_tokens",
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("obtained_at", Tz, nullable=False),
        sa.Column("expires_at", Tz, nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("connection", name=op.f("pk_fhir_tokens")),
    )


def downgrade() -> None:
    op.drop_table("fhir_tokens")
