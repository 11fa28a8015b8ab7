"""Alembic environment: runs careloop's migrations on the URL the caller configured."""

from __future__ import annotations

from alembic import context

from integration.db import create_db_engine
from integration.models import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set by integration.db.alembic_config"

engine = create_db_engine(url)
try:
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
