"""A server killed with SIGKILL mid-stream loses none of the messages it acknowledged."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from adapters.mllp import AckMismatch, MLLPClient
from integration.db import create_db_engine
from integration.models import inbox
from tests.e2e.conftest import Serve, base_env
from tests.helpers import adt, msa

pytestmark = pytest.mark.slow


async def stream(host: str, port: int, prefix: str, acked: set[str], stop_after: float) -> None:
    """Send messages until the connection dies; record every control id acknowledged AA."""
    try:
        client = await MLLPClient.connect(host, port)
    except OSError:
        return
    deadline = time.monotonic() + stop_after
    i = 0
    try:
        while time.monotonic() < deadline:
            cid = f"{prefix}-{i}"
            ack = await client.send(adt(cid), cid.encode(), timeout=5)
            if msa(ack)[1] == "AA":
                acked.add(cid)
            i += 1
    except (AckMismatch, OSError):
        pass
    finally:
        await client.close()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sigkill_mid_stream_loses_nothing(
    db: str, request: pytest.FixtureRequest, serve_factory: type[Serve]
) -> None:
    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    server = serve_factory(base_env(url)).start()
    acked: set[str] = set()

    async def run() -> None:
        host, port = server.mllp
        senders = [
            asyncio.create_task(stream(host, port, f"c{n}", acked, 20)) for n in range(8)
        ]
        # Let traffic flow, then kill the server in the middle of it.
        while len(acked) < 300:  # noqa: ASYNC110 - polling a set filled by other tasks
            await asyncio.sleep(0.01)
        server.kill()
        await asyncio.gather(*senders)

    asyncio.run(run())
    assert len(acked) >= 300

    engine = create_db_engine(url)
    with engine.connect() as conn:
        stored = set(conn.execute(select(inbox.c.control_id)).scalars())
    assert acked <= stored, f"lost {len(acked - stored)} acknowledged messages"

    # Restarted, the server finishes processing what was stored before the crash.
    server.start()
    deadline = time.monotonic() + 30
    pending = None
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pending = conn.execute(
                select(inbox.c.id).where(inbox.c.status == "received")
            ).all()
        if not pending:
            break
        time.sleep(0.3)
    assert not pending, f"{len(pending)} rows still unprocessed after restart"
    engine.dispose()
