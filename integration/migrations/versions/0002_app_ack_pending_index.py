"""index for application ACKs waiting to be delivered

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_WHERE = sa.text("app_ack IS NOT NULL AND app_ack_sent_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_inbox_app_ack_pending", "inbox", ["id"],
        sqlite_where=_WHERE, postgresql_where=_WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_inbox_app_ack_pending", table_name="inbox")
