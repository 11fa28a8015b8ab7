"""The same flow through Celery: a real Redis broker and real worker and beat processes."""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select

from integration.intake import assess
from integration.models import inbox
from integration.runtime import Runtime
from tests.e2e.conftest import CARELOOP, base_env
from tests.helpers import adt, settings_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def wait_processed(engine: Engine, ids: list[int], timeout: float = 40) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    statuses: dict[int, str] = {}
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            statuses = dict(
                conn.execute(select(inbox.c.id, inbox.c.status).where(inbox.c.id.in_(ids))).all()
            )
        if statuses and all(s != "received" for s in statuses.values()):
            return statuses
        time.sleep(0.2)
    return statuses


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([CARELOOP, *cmd], env=env, stdout=out, stderr=out, cwd=log.parent)


async def test_messages_processed_by_a_celery_worker(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Stored messages are enqueued after commit and processed by a separate worker process;
    a row whose task was lost is found by beat's sweep and processed too."""
    prefix = f"careloop-test-{uuid.uuid4().hex[:8]}:"
    env = base_env(pg_url) | {
        "CARELOOP_BROKER_URL": redis_url,
        "CARELOOP_BROKER_KEY_PREFIX": prefix,
    }
    worker = start(["worker", "--concurrency", "2"], env, tmp_path / "worker.log")
    beat = start(["beat", "--schedule", str(tmp_path / "beat-schedule")], env,
                 tmp_path / "beat.log")
    rt = Runtime(
        settings_for(pg_url, broker_url=redis_url, broker_key_prefix=prefix), with_mllp=False
    )
    try:
        await rt.start()
        receipts = []
        for i in range(20):
            receipts += await rt.receive_body(adt(f"Q{i}"), "mllp", "test")
        ids = [r.inbox_id for r in receipts if r.inbox_id is not None]
        assert len(ids) == 20

        # A row stored while the broker "lost" its task: only the sweep can find it.
        row = assess(adt("LOST"), "mllp", "test").row(
            datetime.now(UTC) - timedelta(minutes=5), timedelta(seconds=1)
        )
        with rt.engine.begin() as conn:
            lost = conn.execute(insert(inbox).values(row).returning(inbox.c.id)).scalar_one()

        statuses = wait_processed(rt.engine, [*ids, lost])
        logs = (tmp_path / "worker.log").read_text(errors="replace")[-2000:]
        assert statuses.get(lost) == "processed", logs
        assert all(statuses.get(i) == "processed" for i in ids), logs
    finally:
        await rt.stop()
        rt.engine.dispose()
        for proc in (worker, beat):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
