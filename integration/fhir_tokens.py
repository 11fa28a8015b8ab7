"""Where the console learns when each EHR connection's SMART access token expires.

Tokens live in the memory of the FHIR client that asked for them (in ``careloop serve`` or any
Celery worker), and their value never leaves it. Each new token's expiry, scope, time and
holder (``host:pid``) is written to ``fhir_tokens``, one row per connection, last one wins, so
the connections page of any replica shows it. :func:`observer` is the ``on_token`` callback
that :func:`integration.fhir_ingest.recording_clients` gives the clients of each stage.

The write is one small upsert, made where the token arrives (once per token, every few minutes
per connection), outside SQLite's in-process write gate: the auth flow may run while its caller
holds the gate, and the gate is not re-entrant. SQLite's busy timeout orders it against the
other writers. A failed write is logged by the client and changes nothing else.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from adapters.fhir.smart import AccessToken
from integration.db import dialect_insert
from integration.models import fhir_tokens

__all__ = ["TokenRecord", "observer", "read", "record"]



@dataclass(frozen=True)
class TokenRecord:
    connection: str
    obtained_at: datetime
    expires_at: datetime
    scope: str
    holder: str


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


def record(engine: Engine, connection: str, token: AccessToken, *,
           now: datetime | None = None) -> None:
    """Upsert the connection's row for ``token`` (its expiry and scope, not its value)."""
    now = now or datetime.now(UTC)
    values = {"connection": connection, "obtained_at": now,
              "expires_at": datetime.fromtimestamp(token.expires_at, UTC),
              "scope": token.scope, "holder": _holder()}
    with engine.begin() as conn:
        stmt = dialect_insert(conn, fhir_tokens).values(**values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[fhir_tokens.c.connection],
            set_={k: v for k, v in values.items() if k != "connection"}))


def observer(engine: Engine, connection: str) -> Callable[[AccessToken], None]:
    """The ``on_token`` callback for a client of ``connection``: records each token's expiry
    in ``engine``'s database."""

    def on_token(token: AccessToken) -> None:
        record(engine, connection, token)

    return on_token


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def read(engine: Engine) -> dict[str, TokenRecord]:
    """Every connection's latest token record."""
    with engine.connect() as conn:
        rows = conn.execute(select(fhir_tokens)).all()
    return {r.connection: TokenRecord(r.connection, _aware(r.obtained_at),
                                      _aware(r.expires_at), r.scope, r.holder) for r in rows}
