"""The Alembic chain builds exactly the schema the models describe, on both databases."""

from __future__ import annotations

import warnings

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from integration.models import metadata

EXPRESSION_INDEXES = {"ix_touches_channel_address_norm"}
"""Indexes on expressions, which Alembic cannot reflect or compare: checked by name."""


def _named(item: object) -> str:
    index = item[1] if isinstance(item, tuple) and len(item) > 1 else None
    return str(getattr(index, "name", ""))


def test_migrations_match_models(engine: Engine) -> None:
    """No difference between the upgraded database and ``integration.models``."""
    with engine.connect() as conn, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based")
        warnings.filterwarnings("ignore", "autogenerate skipping metadata-specified expression")
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert [d for d in diff if _named(d) not in EXPRESSION_INDEXES] == []


def test_expression_indexes_exist(engine: Engine) -> None:
    query = ("SELECT name FROM sqlite_master WHERE type = 'index'"
             if engine.dialect.name == "sqlite" else "SELECT indexname FROM pg_indexes")
    with engine.connect() as conn:
        names = {r[0] for r in conn.execute(text(query))}
    assert names >= EXPRESSION_INDEXES
