"""Where the console learns when each EHR connection's SMART access token expires.

Tokens live in the memory of the FHIR client that asked for them (in ``careloop serve`` or any
Celery worker), and their value never leaves it. Each new token's expiry, scope, time and
holder (``host:pid``) is written to ``fhir_tokens``, one row per connection, last one wins, so
the connections page of any replica shows it. The process installs its engine once
(:func:`install`: the runtime and the Celery worker do); :func:`observer` is what
:func:`integration.fhir_ingest.default_client` hands to each client.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from adapters.fhir.smart import AccessToken
from integration.db import dialect_insert, write_lock
from integration.logs import get_logger
from integration.models import fhir_tokens

__all__ = ["TokenRecord", "install", "observer", "read", "record", "settle"]

_engine: Engine | None = None
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="careloop-fhir-tokens")
log = get_logger("careloop.fhir_tokens")


@dataclass(frozen=True)
class TokenRecord:
    connection: str
    obtained_at: datetime
    expires_at: datetime
    scope: str
    holder: str


def install(engine: Engine) -> None:
    """Record this process's tokens in ``engine``'s database from now on."""
    global _engine  # noqa: PLW0603 - one ledger per process, set at start
    _engine = engine


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


def record(engine: Engine, connection: str, token: AccessToken, *,
           now: datetime | None = None) -> None:
    """Upsert the connection's row for ``token`` (its expiry and scope, not its value)."""
    now = now or datetime.now(UTC)
    values = {"connection": connection, "obtained_at": now,
              "expires_at": datetime.fromtimestamp(token.expires_at, UTC),
              "scope": token.scope, "holder": _holder()}
    with write_lock(engine), engine.begin() as conn:
        stmt = dialect_insert(conn, fhir_tokens).values(**values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[fhir_tokens.c.connection],
            set_={k: v for k, v in values.items() if k != "connection"}))


def _record_quietly(engine: Engine, connection: str, token: AccessToken) -> None:
    try:
        record(engine, connection, token)
    except Exception:  # the page shows an older expiry, nothing worse
        log.warning("token_record_failed", connection=connection, exc_info=True)


def observer(connection: str) -> Callable[[AccessToken], None]:
    """The ``on_token`` callback for a client of ``connection``: records into the installed
    engine (nothing when none is installed, e.g. a one-off CLI command).

    The write happens on a background thread: the token is obtained inside an HTTP request's
    auth flow (often on the event loop, perhaps while the caller holds SQLite's write gate),
    which must neither wait on the database nor take the gate again."""

    def on_token(token: AccessToken) -> None:
        engine = _engine
        if engine is not None:
            _writer.submit(_record_quietly, engine, connection, token)

    return on_token


def settle(timeout: float = 10.0) -> None:
    """Wait until the writes handed to the background thread so far are done (for tests and
    an orderly stop)."""
    _writer.submit(lambda: None).result(timeout)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def read(engine: Engine) -> dict[str, TokenRecord]:
    """Every connection's latest token record."""
    with engine.connect() as conn:
        rows = conn.execute(select(fhir_tokens)).all()
    return {r.connection: TokenRecord(r.connection, _aware(r.obtained_at),
                                      _aware(r.expires_at), r.scope, r.holder) for r in rows}
