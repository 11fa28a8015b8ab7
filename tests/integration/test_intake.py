"""Intake: store with the group, then acknowledge; duplicates; storage failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Engine, func, select

from integration.models import inbox
from integration.runtime import Runtime
from mappings.ack import AckCode
from tests.helpers import adt, err, msa, settings_for


@pytest.fixture
async def runtime(db_url: str) -> AsyncIterator[Runtime]:
    rt = Runtime(settings_for(db_url, inprocess_worker=False), with_mllp=False)
    await rt.start()
    yield rt
    await rt.stop()
    rt.engine.dispose()


def count(engine: Engine, **where: str) -> int:
    query = select(func.count()).select_from(inbox)
    for key, value in where.items():
        query = query.where(inbox.c[key] == value)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


class TestIntake:
    async def test_stored_then_acknowledged(self, runtime: Runtime) -> None:
        """A good message is stored (status received) and answered AA with MSA-2 = MSH-10."""
        [receipt] = await runtime.receive_body(adt("A1"), "mllp", "peer")
        assert receipt.code is AckCode.AA
        assert msa(receipt.ack or "")[1:3] == ["AA", "A1"]
        with runtime.engine.connect() as conn:
            row = conn.execute(select(inbox)).one()
        assert row.status == "received"
        assert bytes(row.raw) == adt("A1")
        assert row.sender == "EPIC|MAIN"
        assert row.message_type == "ADT^A01"
        assert row.ack == receipt.ack

    async def test_duplicate_stored_once(self, runtime: Runtime) -> None:
        """The same sender and MSH-10 again is answered AA and not stored twice."""
        first = await runtime.receive_body(adt("D1"), "mllp", "p")
        second = await runtime.receive_body(adt("D1"), "http", "p")
        assert second[0].code is AckCode.AA and second[0].duplicate
        assert first[0].inbox_id is not None
        assert count(runtime.engine) == 1

    async def test_same_control_id_other_sender_is_new(self, runtime: Runtime) -> None:
        await runtime.receive_body(adt("S1", sender="EPIC"), "mllp", "p")
        await runtime.receive_body(adt("S1", sender="CERNER"), "mllp", "p")
        assert count(runtime.engine) == 2

    async def test_duplicates_inside_one_group(self, runtime: Runtime) -> None:
        """Concurrent deliveries of one message in the same group commit store it once."""
        results = await asyncio.gather(
            *(runtime.receive_body(adt("G1"), "mllp", str(i)) for i in range(10))
        )
        assert all(r[0].code is AckCode.AA for r in results)
        assert sum(1 for r in results if not r[0].duplicate) == 1
        assert count(runtime.engine) == 1

    async def test_many_concurrent_messages_share_commits(self, runtime: Runtime) -> None:
        """Messages from many callers are grouped into fewer transactions, none lost."""
        results = await asyncio.gather(
            *(runtime.receive_body(adt(f"M{i}"), "mllp", "p") for i in range(200))
        )
        assert all(r[0].code is AckCode.AA for r in results)
        assert count(runtime.engine) == 200
        assert runtime.committer.stats.commits < 200

    async def test_missing_required_segment_is_ae_and_stored_failed(
        self, runtime: Runtime
    ) -> None:
        """An ADT without PID is stored as failed (replayable) and answered AE with ERR."""
        [receipt] = await runtime.receive_body(adt("E1", pid=False), "mllp", "p")
        assert receipt.code is AckCode.AE
        fields = err(receipt.ack or "")
        assert fields[2] == "PID"
        assert fields[3].startswith("100^")
        assert count(runtime.engine, status="failed") == 1

    async def test_unreadable_is_ar_and_kept(self, runtime: Runtime) -> None:
        """Garbage is answered AR with ERR and kept as a rejected row for inspection."""
        [receipt] = await runtime.receive_body(b"\x00\x01garbage", "mllp", "p")
        assert receipt.code is AckCode.AR
        assert "MSH" in err(receipt.ack or "")[8]
        assert count(runtime.engine, status="rejected") == 1

    async def test_empty_body_is_ar(self, runtime: Runtime) -> None:
        [receipt] = await runtime.receive_body(b" \r\n", "http", "p")
        assert receipt.code is AckCode.AR
        assert count(runtime.engine) == 0

    async def test_enhanced_mode_answers_commit_accept(self, runtime: Runtime) -> None:
        """MSH-15/16 valued: the answer is CA once stored; a content error still gets CA and
        the error travels in the application ACK."""
        [ok] = await runtime.receive_body(adt("H1", extra_msh="|||AL|AL"), "mllp", "p")
        assert ok.code is AckCode.CA
        [bad] = await runtime.receive_body(
            adt("H2", extra_msh="|||AL|AL", pid=False), "mllp", "p"
        )
        assert bad.code is AckCode.CA

    async def test_unsupported_version_is_commit_reject(self, runtime: Runtime) -> None:
        msg = adt("V1", extra_msh="|||AL|AL").replace(b"|2.5.1|", b"|3.0|")
        [receipt] = await runtime.receive_body(msg, "mllp", "p")
        assert receipt.code is AckCode.CR
        assert err(receipt.ack or "")[3].startswith("203^")

    async def test_batch_gives_one_ack_per_message(self, runtime: Runtime) -> None:
        body = b"BHS|^~\\&|X\r" + adt("B1") + adt("B2") + b"BTS|2\r"
        receipts = await runtime.receive_body(body, "http", "p")
        assert [msa(r.ack or "")[2] for r in receipts] == ["B1", "B2"]


class TestStorageFailure:
    async def test_database_down_gives_negative_ack_and_nothing_half_stored(
        self, sqlite_url: str, tmp_path: object
    ) -> None:
        """When the commit fails, the sender gets AR (original) or CE (enhanced) and no row
        is left behind."""
        rt = Runtime(settings_for(sqlite_url, inprocess_worker=False), with_mllp=False)
        await rt.start()
        try:
            with rt.engine.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE inbox RENAME TO inbox_gone")
            [original] = await rt.receive_body(adt("F1"), "mllp", "p")
            [enhanced] = await rt.receive_body(adt("F2", extra_msh="|||AL|NE"), "mllp", "p")
        finally:
            await rt.stop()
            rt.engine.dispose()
        assert original.code is AckCode.AR and original.unavailable
        assert err(original.ack or "")[3].startswith("207^")
        assert enhanced.code is AckCode.CE
