"""Shared fixtures: real PostgreSQL and Redis (from CARELOOP_TEST_POSTGRES_URL and
CARELOOP_TEST_REDIS_URL), SQLite files under tmp_path, and the shared corpus.

A missing service skips its tests, unless CARELOOP_REQUIRE_SERVICES=1 (set by .ci/run), which
turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from integration.db import create_db_engine, upgrade

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("CARELOOP_CORPUS", REPO.parent / "shared" / "corpus"))
PG_URL = os.environ.get(
    "CARELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CARELOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE = os.environ.get("CARELOOP_REQUIRE_SERVICES") == "1"
TABLES = (
    "inbox", "mapped_resources", "audit_events", "api_clients",
    "timeline_changes", "entry_sources", "entry_keys", "timeline_entries",
    "patient_merges", "patient_identifiers", "patients",
    "touches", "patient_preferences", "outreach_cursors",
    "fhir_secrets", "fhir_subscriptions",
    "channel_events", "address_optouts", "patient_requests", "ehr_outbox",
    "bookings", "waitlist_entries", "freed_slots", "waitlist_offers", "portal_access",
    "console_users", "console_sessions", "sender_settings", "replay_jobs", "fhir_tokens",
)


def _missing(what: str, why: object) -> None:
    message = f"{what} is not reachable ({why})"
    if REQUIRE:
        pytest.fail(message + "; CARELOOP_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    try:
        engine = create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        _missing("PostgreSQL", exc)
    return PG_URL


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> Iterator[str]:
    """A migrated database for this test session, dropped at the end."""
    name = f"careloop_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_template: str) -> str:
    """The session's PostgreSQL database, emptied before each test."""
    engine = create_engine(pg_template)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
    except Exception:
        # A test broke the schema on purpose (storage-failure tests): build it again.
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        upgrade(pg_template)
    finally:
        engine.dispose()
    return pg_template


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'careloop.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on both databases."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_db_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        _missing("Redis", exc)
    return REDIS_URL
