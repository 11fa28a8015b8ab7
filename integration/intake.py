"""Durable HL7 v2 intake: read the header, store with the group, then acknowledge.

The ACK path never waits on a full parse. For each message it:

1. decodes the bytes by MSH-18 and reads the MSH segment only (:func:`mappings.er7.read_header`);
2. runs cheap structural checks (segment ids, the segments a message family cannot do without),
   which decide between AA and AE in original mode;
3. hands the row to the :class:`GroupCommitter`, which commits every row that arrived while the
   previous commit was running in one transaction (messages from many connections share it);
4. answers once the commit returned. A second delivery of the same sender (MSH-3 + MSH-4) and
   MSH-10 hits the inbox's unique key, is acknowledged AA and is not processed again.

If the database cannot store the message, the answer is negative (AR in original mode, CE in
enhanced mode, HTTP 503) so the engine resends; nothing is half-stored because the transaction
is rolled back as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from integration.db import write_lock
from integration.logs import get_logger
from integration.metrics import ACK_LATENCY, DUPLICATES, MESSAGES
from integration.models import InboxStatus, inbox
from integration.routing import check_structure
from mappings.ack import (
    AckCode,
    AckError,
    application_ack_wanted,
    build_ack,
    build_ack_for_unreadable,
)
from mappings.er7 import ER7Error, Header, codec_for, decode, read_header

__all__ = [
    "Assessment",
    "GroupCommitter",
    "IntakeService",
    "Receipt",
    "StorageUnavailable",
    "assess",
]

log = get_logger("careloop.intake")

class StorageUnavailable(RuntimeError):
    """The inbox could not be written: the sender should retry later."""


@dataclass(slots=True)
class Assessment:
    """What intake knows about one message before storing it."""

    raw: bytes
    source: str
    peer: str
    header: Header | None
    codec: str
    error: AckError | None = None
    rejected: bool = False

    @property
    def dedup_key(self) -> str:
        if self.header is None:
            # Unreadable messages are kept for inspection, never matched as duplicates.
            return f"unreadable:{uuid.uuid4()}"
        h = self.header
        return f"hl7v2:{h.sending_application}|{h.sending_facility}|{h.control_id}"

    def row(self, now: datetime, stale_after: timedelta) -> dict[str, Any]:
        h = self.header
        if self.rejected:
            status, code = InboxStatus.REJECTED, AckCode.AR
        elif self.error is not None:
            status, code = InboxStatus.FAILED, AckCode.AE
        else:
            status, code = InboxStatus.RECEIVED, AckCode.AA
        return {
            "source": self.source,
            "peer": self.peer[:255],
            "sender": (f"{h.sending_application}|{h.sending_facility}" if h else "")[:255],
            "dedup_key": self.dedup_key[:512],
            "message_type": (h.message_type if h else "")[:32],
            "control_id": (h.control_id if h else "")[:199],
            "version": (h.version if h else "")[:16],
            "raw": self.raw,
            "status": status.value,
            "ack_code": code.value,
            "attempts": 0,
            "last_error": _error_text(self.error),
            "received_at": now,
            "next_attempt_at": now + stale_after if status is InboxStatus.RECEIVED else None,
        }


def _error_text(err: AckError | None) -> str | None:
    if err is None:
        return None
    return f"{err.location}: {err.text}" if err.location else err.text


def assess(raw: bytes, source: str, peer: str) -> Assessment:
    """Decode ``raw``, read its MSH and check its structure; never raises."""
    try:
        text = decode(raw)
        header = read_header(text)
    except ER7Error as exc:
        return Assessment(
            raw,
            source,
            peer,
            None,
            "utf-8",
            AckError(str(exc), exc.location, exc.code),
            rejected=True,
        )
    codec = (codec_for(header.charset) or "utf-8") if header.charset else "utf-8"
    version = header.version
    if version and not version.startswith("2"):
        err = AckError(f"MSH-12 version {version!r} is not HL7 v2", "MSH-12", "203")
        return Assessment(raw, source, peer, header, codec, err, rejected=True)
    return Assessment(raw, source, peer, header, codec, _structure_error(header, text))


def _structure_error(header: Header, text: str) -> AckError | None:
    problem = check_structure(header, text)
    if problem is None:
        return None
    return AckError(str(problem), problem.location, problem.code)


@dataclass(slots=True)
class Receipt:
    """The outcome of one message: its reply (None when MSH-15 asks for none)."""

    code: AckCode
    ack: str | None
    codec: str
    inbox_id: int | None = None
    duplicate: bool = False
    unavailable: bool = False
    """Not stored: the database could not be written (HTTP 503, the engine resends)."""

    def ack_bytes(self) -> bytes | None:
        if self.ack is None:
            return None
        return self.ack.encode(self.codec, errors="replace")


@dataclass(slots=True)
class _Pending:
    row: dict[str, Any]
    future: asyncio.Future[tuple[int | None, bool]]


@dataclass
class CommitStats:
    commits: int = 0
    rows: int = 0
    largest_batch: int = 0
    last_batch_sizes: list[int] = field(default_factory=list)


class GroupCommitter:
    """Commits rows from many concurrent callers in shared transactions.

    While one commit runs (in a dedicated thread, so the event loop keeps reading sockets),
    every row submitted joins the next batch. Under load, batches grow and the cost of a durable
    commit is shared; at low load, each row commits on its own at once.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        after_commit: Callable[[Sequence[int]], None] | None = None,
        max_batch: int = 500,
    ) -> None:
        self._engine = engine
        self._after_commit = after_commit
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
        self._insert = self._build_insert()
        self._conn: Connection | None = None
        self.stats = CommitStats()

    def _build_insert(self) -> Any:
        dialect = self._engine.dialect.name
        module: Any = postgresql if dialect == "postgresql" else sqlite
        return (
            module.insert(inbox)
            .on_conflict_do_nothing(index_elements=["dedup_key"])
            .returning(inbox.c.id, inbox.c.dedup_key)
        )

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            # Let queued rows commit first.
            deadline = time.monotonic() + 10
            while self._queue and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded drain
                await asyncio.sleep(0.01)
            self._task.cancel()
            with _suppress_cancel():
                await self._task
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drop_connection)
        self._executor.shutdown(wait=True)

    async def submit(self, rows: Sequence[dict[str, Any]]) -> list[tuple[int | None, bool]]:
        """Store ``rows``; returns (id, inserted) for each, in order. ``inserted`` is False for
        a duplicate. Raises :class:`StorageUnavailable` when the commit failed."""
        assert self._wakeup is not None, "GroupCommitter.start() was not awaited"
        loop = asyncio.get_running_loop()
        pendings = [_Pending(row, loop.create_future()) for row in rows]
        self._queue.extend(pendings)
        self._wakeup.set()
        return [await p.future for p in pendings]

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._commit, [p.row for p in batch]
                    )
                except Exception as exc:
                    log.error("inbox_commit_failed", exc_type=type(exc).__name__, count=len(batch))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(StorageUnavailable(str(exc).splitlines()[0]))
                    continue
                for p, result in zip(batch, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)

    def _connection(self) -> Connection:
        # The commit thread keeps one connection: no pool checkout or ping per batch.
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def _commit(self, rows: list[dict[str, Any]]) -> list[tuple[int | None, bool]]:
        unique: dict[str, dict[str, Any]] = {}
        for row in rows:
            unique.setdefault(row["dedup_key"], row)
        with write_lock(self._engine, urgent=True):
            conn = self._connection()
            try:
                with conn.begin():
                    result = conn.execute(self._insert, list(unique.values()))
                    inserted = {key: row_id for row_id, key in result}
            except Exception:
                # Start the next batch on a fresh connection (the server may have gone away).
                self._drop_connection()
                raise
        self.stats.commits += 1
        self.stats.rows += len(inserted)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        out: list[tuple[int | None, bool]] = []
        claimed: set[str] = set()
        new_ids: list[int] = []
        for row in rows:
            key = row["dedup_key"]
            row_id = inserted.get(key)
            if row_id is not None and key not in claimed:
                claimed.add(key)
                out.append((row_id, True))
                if row["status"] == InboxStatus.RECEIVED:
                    new_ids.append(row_id)
            else:
                out.append((row_id, False))
        if new_ids and self._after_commit is not None:
            try:
                self._after_commit(new_ids)
            except Exception as exc:  # the sweeper will pick the rows up
                log.warning("dispatch_failed", exc_type=type(exc).__name__, count=len(new_ids))
        return out


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        return exc_type is asyncio.CancelledError


class IntakeService:
    """Turns raw HL7 v2 bytes into stored inbox rows and acknowledgements."""

    def __init__(
        self,
        committer: GroupCommitter,
        *,
        stale_after_s: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._committer = committer
        self._stale_after = timedelta(seconds=stale_after_s)
        self._clock = clock
        self._counter = 0
        self._lock = threading.Lock()

    def _ack_control_id(self) -> str:
        with self._lock:
            self._counter += 1
            n = self._counter
        return f"CL{int(time.time() * 1000):x}{n:06d}"[:20]

    async def receive(self, messages: Sequence[bytes], source: str, peer: str) -> list[Receipt]:
        """Store each message and build its reply. Raises nothing: a storage failure becomes
        a negative acknowledgement (see :attr:`Receipt.code`)."""
        started = time.perf_counter()
        now = self._clock()
        assessed = [assess(raw, source, peer) for raw in messages]
        rows = [a.row(now, self._stale_after) for a in assessed]
        planned = [self._reply(a, now, duplicate=False) for a in assessed]
        for a, row, receipt in zip(assessed, rows, planned, strict=True):
            row["ack"] = receipt.ack
            row["ack_code"] = receipt.code.value
            row["app_ack"] = self._early_application_ack(a, now)
        try:
            stored = await self._committer.submit(rows)
        except StorageUnavailable as exc:
            log.error("inbox_unavailable", source=source, peer=peer, error=str(exc)[:200])
            receipts = [self._unavailable(a, now) for a in assessed]
        else:
            receipts = []
            for a, receipt, (row_id, inserted) in zip(assessed, planned, stored, strict=True):
                if inserted:
                    receipt.inbox_id = row_id
                    self._log_stored(a, receipt)
                else:
                    _child(DUPLICATES, source).inc()
                    log.info("message_duplicate", source=source, control_id=_cid(a),
                             message_type=_mtype(a))
                    receipts.append(self._reply(a, now, duplicate=True))
                    continue
                receipts.append(receipt)
        elapsed = time.perf_counter() - started
        latency = _child(ACK_LATENCY, source)
        for r, a in zip(receipts, assessed, strict=True):
            _child(MESSAGES, source, _mtype(a), r.code.value).inc()
            latency.observe(elapsed)
        return receipts

    @staticmethod
    def _log_stored(a: Assessment, r: Receipt) -> None:
        if a.header is None:
            assert a.error is not None
            log.info("message_rejected", source=a.source, inbox_id=r.inbox_id,
                     error_code=a.error.code, location=a.error.location)
        else:
            log.info("message_stored", source=a.source, inbox_id=r.inbox_id,
                     control_id=a.header.control_id, message_type=a.header.message_type,
                     ack_code=r.code.value)

    def _reply(self, a: Assessment, now: datetime, *, duplicate: bool) -> Receipt:
        """The acknowledgement for a stored message (or a duplicate of one)."""
        h = a.header
        cid = self._ack_control_id()
        if h is None:
            assert a.error is not None
            ack = build_ack_for_unreadable(AckCode.AR, a.error, control_id=cid, now=now)
            return Receipt(AckCode.AR, ack, "utf-8")
        errors: tuple[AckError, ...] = (a.error,) if a.error and not duplicate else ()
        if h.enhanced_mode:
            code = AckCode.CR if a.rejected and not duplicate else AckCode.CA
            if code is AckCode.CA:
                errors = ()  # content errors travel in the application ACK
            # MSH-15 (NE, ER, SU) is deliberately not honoured on the wire: MLLP and HTTP are
            # request/response, and a sender left without an answer times out and resends.
        elif duplicate:
            code = AckCode.AA
        elif a.rejected:
            code = AckCode.AR
        elif a.error is not None:
            code = AckCode.AE
        else:
            code = AckCode.AA
        ack = build_ack(h, code, control_id=cid, now=now, errors=errors)
        return Receipt(code, ack, a.codec, duplicate=duplicate)

    def _early_application_ack(self, a: Assessment, now: datetime) -> str | None:
        """Enhanced mode, content error found at intake: the row is failed at once, so its
        application ACK (AE) is built now rather than by the processing stage."""
        h = a.header
        if h is None or a.error is None or a.rejected:
            return None
        if not application_ack_wanted(h, ok=False):
            return None
        return build_ack(
            h, AckCode.AE, control_id=self._ack_control_id(), now=now, errors=(a.error,)
        )

    def _unavailable(self, a: Assessment, now: datetime) -> Receipt:
        err = AckError(
            "the message could not be stored; nothing was kept: resend it later",
            code="207",
        )
        cid = self._ack_control_id()
        h = a.header
        if h is None:
            ack = build_ack_for_unreadable(AckCode.AR, err, control_id=cid, now=now)
            return Receipt(AckCode.AR, ack, "utf-8", unavailable=True)
        code = AckCode.CE if h.enhanced_mode else AckCode.AR
        ack = build_ack(h, code, control_id=cid, now=now, errors=(err,))
        return Receipt(code, ack, a.codec, unavailable=True)


_CHILDREN: dict[tuple[object, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the lookup costs more than the increment."""
    key = (id(metric), *labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


def _mtype(a: Assessment) -> str:
    return a.header.message_type if a.header else "unreadable"


def _cid(a: Assessment) -> str:
    return a.header.control_id if a.header else ""
