"""A throwaway PostgreSQL database for a benchmark: created fresh, migrated, dropped."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from integration.db import upgrade

__all__ = ["create_database", "drop_database"]


def create_database(server: str, name: str) -> str:
    """Drop ``name`` if it exists, create it, apply the migrations; returns its URL."""
    drop_database(server, name)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def drop_database(server: str, name: str) -> None:
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
