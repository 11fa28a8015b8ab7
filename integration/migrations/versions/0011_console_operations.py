"""The console's operations: PHI access and OpenID Connect subjects for people, sender settings
kept in the database, replay jobs

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("console_users") as batch:
        batch.add_column(sa.Column("phi", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("oidc_subject", sa.String(512), nullable=True))
        batch.create_unique_constraint(op.f("uq_console_users_oidc_subject"), ["oidc_subject"])
    # Admins made before PHI access existed could see everything the console showed.
    op.execute("UPDATE console_users SET phi = true WHERE role = 'admin'")
    op.create_table(
        "sender_settings",
        sa.Column("application", sa.String(227), nullable=False),
        sa.Column("facility", sa.String(227), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=True),
        sa.Column("identifier_systems", sa.JSON(), nullable=True),
        sa.Column("ack_to", sa.String(255), nullable=True),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("application", "facility", name=op.f("pk_sender_settings")),
    )
    op.create_table(
        "replay_jobs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("inbox_ids", sa.JSON(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replay_jobs")),
    )


def downgrade() -> None:
    op.drop_table("replay_jobs")
    op.drop_table("sender_settings")
    with op.batch_alter_table("console_users") as batch:
        batch.drop_constraint(op.f("uq_console_users_oidc_subject"), type_="unique")
        batch.drop_column("oidc_subject")
        batch.drop_column("phi")
