"""Engines and schema upgrades for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

__all__ = ["Checkpointer", "create_db_engine", "dialect_insert", "ping", "upgrade", "write_lock"]

MIGRATIONS = Path(__file__).with_name("migrations")


class _WriteGate:
    """A lock with two classes of writer: the ACK path (``urgent``) goes before background
    stages, which wait while an urgent writer holds or wants the lock, but never for longer
    than ``max_background_wait_s``: past that, the next turn is theirs, so a saturated intake
    delays processing without starving it."""

    def __init__(self, max_background_wait_s: float = 0.05) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._urgent_waiting = 0
        self._background_since: list[float] = []
        self._max_wait = max_background_wait_s

    def _background_overdue(self, now: float) -> bool:
        return bool(self._background_since) and now - min(self._background_since) > self._max_wait

    @contextlib.contextmanager
    def hold(self, urgent: bool) -> Iterator[None]:
        with self._cond:
            if urgent:
                self._urgent_waiting += 1
                while self._held or self._background_overdue(time.monotonic()):
                    self._cond.wait(self._max_wait)
                self._urgent_waiting -= 1
            else:
                since = time.monotonic()
                self._background_since.append(since)
                while self._held or (
                    self._urgent_waiting and time.monotonic() - since <= self._max_wait
                ):
                    self._cond.wait(self._max_wait)
                self._background_since.remove(since)
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


_SQLITE_WRITE_GATES: dict[str, _WriteGate] = {}
_GATES_GUARD = threading.Lock()


def write_lock(engine: Engine, *, urgent: bool = False) -> AbstractContextManager[None]:
    """Serialise this process's writes to one SQLite file (a no-op on PostgreSQL).

    SQLite has one writer at a time. Writers in other processes wait in SQLite's busy handler,
    which sleeps in steps of up to 100 ms; writers in this process (the group committer and the
    worker threads) take turns here instead, so an ACK never waits on those sleeps, and the
    ACK path (``urgent``) goes first whenever it is waiting.
    """
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    key = str(engine.url)
    with _GATES_GUARD:
        gate = _SQLITE_WRITE_GATES.setdefault(key, _WriteGate())
    return gate.hold(urgent)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    # WAL lets readers work beside the one writer; synchronous=FULL makes a commit durable on
    # disk before it returns, which is what an ACK promises.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _compact_json(value: Any) -> str:
    # FHIR resources are stored as JSON: no padding after separators (about 10% smaller).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


def create_db_engine(
    url: str, *, pool_size: int = 5, sqlite_autocheckpoint: bool = True
) -> Engine:
    """An engine for ``url``; creates the SQLite file's folder when needed.

    ``sqlite_autocheckpoint=False`` leaves WAL checkpoints to a :class:`Checkpointer` thread:
    otherwise the commit that crosses SQLite's threshold copies the WAL into the database
    inside the write lock, and the ACKs waiting behind it see tens of milliseconds.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            json_serializer=_compact_json,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        if not sqlite_autocheckpoint:
            event.listen(engine, "connect", _no_autocheckpoint)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        pool_pre_ping=True,
        json_serializer=_compact_json,
    )


class Checkpointer:
    """Runs SQLite WAL checkpoints in the background, outside the write lock.

    PASSIVE checkpoints copy what they can without blocking writers; when the log has grown
    past ``truncate_pages`` a TRUNCATE checkpoint (under the write lock, between commits) keeps
    the WAL file from growing without bound.
    """

    def __init__(
        self, engine: Engine, *, interval_s: float = 1.0, truncate_pages: int = 50_000
    ) -> None:
        self._engine = engine
        self._interval = interval_s
        self._truncate_pages = truncate_pages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with contextlib.suppress(Exception):
            self.checkpoint("TRUNCATE")

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        raw = self._engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(f"PRAGMA wal_checkpoint({mode})")
            busy, log_pages, done = cur.fetchone() or (0, 0, 0)
            cur.close()
            return int(busy), int(log_pages), int(done)
        finally:
            raw.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                _busy, log_pages, _done = self.checkpoint("PASSIVE")
                if log_pages > self._truncate_pages:
                    with write_lock(self._engine):
                        self.checkpoint("TRUNCATE")
            except Exception as exc:
                _ = exc


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


_UPGRADE_LOCK = 7_402_311_905  # arbitrary, careloop's own advisory lock key


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent).

    On PostgreSQL an advisory lock makes replicas that start together upgrade one at a time.
    """
    if make_url(url).get_backend_name() != "postgresql":
        command.upgrade(alembic_config(url), revision)
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _UPGRADE_LOCK})
            try:
                command.upgrade(alembic_config(url), revision)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _UPGRADE_LOCK})
    finally:
        engine.dispose()


def ping(engine: Engine) -> None:
    """Raise when the database cannot answer a trivial query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def dialect_insert(conn: Connection, table: Any) -> Any:
    """An INSERT with ``on_conflict_do_nothing``/``on_conflict_do_update``: PostgreSQL's and
    SQLite's share that shape, so callers write one statement for both."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
