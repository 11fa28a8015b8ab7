"""The Alembic chain builds exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from integration.models import metadata


def test_migrations_match_models(engine: Engine) -> None:
    """No difference between the upgraded database and ``integration.models``."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
