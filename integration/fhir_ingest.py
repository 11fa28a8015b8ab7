"""Processing of ``fhir`` inbox rows (stored by :mod:`integration.fhir_notify`), catch-up,
heartbeat checks and polling.

A notification needs reads from the EHR (id-only and empty payloads, referenced Patients,
catch-up), so it takes a path of its own, async, apart from the HL7 v2 work phase. Per row,
:class:`FhirIngest`:

1. parses the notification (``subscriptions.parse_notification``);
2. gets the resources: sent in full, or read (``resolve_flow``: ``_id`` reads in batches,
   identifier searches, a ``_lastUpdated`` search for empty payloads); and the Patients they
   reference, so identity can link them to patients known from HL7 v2 by identifier;
3. in one transaction: folds the notification into the subscription's
   :class:`~subscriptions.TrackerState` (``observe``), applies the resources to the timeline
   (``integration.timeline.apply_batch`` with FHIR ``SourceRef``s: ``meta.lastUpdated`` is
   the ordinal time, ``meta.versionId`` the version) and marks the inbox row processed
   (guarded by its status, so a duplicate task changes nothing);
4. when the tracker decides ``CatchUp`` (a gap past its grace, an ``error`` status, a counter
   reset) runs ``catch_up_flow`` under the subscription row's ``catchup_claimed_at`` claim (one
   catch-up per subscription at a time, across processes) and applies what it found.

:meth:`FhirIngest.tick` is the timer: ``check`` per subscription (gaps past their grace,
heartbeats overdue) and ``poll_flow`` per (connection, type) in ``poll`` mode at
``poll_interval_s``, the cursor stored with the changes.

Network errors leave the row ``received`` with a backoff (``next_attempt_at``), like the HL7
stage; after ``max_attempts`` it is ``failed`` and replayable.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection as DbConnection
from sqlalchemy import Engine, or_, select, update

from adapters.fhir import FHIRApi, FHIRClient, FHIRRequest, bundle_resources
from adapters.fhir.smart import AccessToken
from integration import fhir_tokens
from integration.db import write_lock
from integration.fhir_state import (
    SubscriptionRow,
    ensure_subscription_row,
    find_by_subscription,
    read_subscription_row,
    update_subscription_row,
)
from integration.identity import IdentityRules
from integration.logs import get_logger
from integration.metrics import PROCESSED
from integration.models import InboxStatus, fhir_subscriptions, inbox
from integration.settings import Connection, Settings
from integration.timeline import SourceRef, apply_batch
from integration.timeline.facts import patient_reference
from subscriptions import (
    CatchUp,
    Decision,
    Notification,
    NotificationError,
    PollCursor,
    Reference,
    ServerCapabilities,
    TrackerState,
    catch_up_flow,
    caught_up,
    check,
    observe,
    parse_instant,
    parse_notification,
    poll_flow,
    resolve_flow,
    run_flow,
)

__all__ = ["FhirIngest", "FhirOutcome", "FhirWorker", "fhir_ids_among", "fhir_source"]

log = get_logger("careloop.fhir.ingest")

JSON = dict[str, Any]
ClientFactory = Callable[[Connection], FHIRApi]
CLAIM_TIMEOUT = timedelta(minutes=10)
"""A catch-up claim older than this is taken as abandoned (its process died)."""


@dataclass(frozen=True)
class FhirOutcome:
    inbox_id: int
    status: str
    error: str | None = None
    resources: int = 0


class _Row(NamedTuple):
    id: int
    peer: str
    raw: bytes
    attempts: int
    received_at: datetime | None


class _LostRace(Exception):
    """Another worker finished the row meanwhile."""


def default_client(connection: Connection,
                   on_token: Callable[[AccessToken], None] | None = None) -> FHIRApi:
    """A :class:`FHIRClient` with SMART Backend Services for ``connection``; ``on_token`` is
    told of each access token it obtains."""
    if connection.private_key is None:
        raise ValueError(f"connection {connection.name!r} has no private_key: run "
                         "`careloop keys generate` and set it")
    return FHIRClient.connect(fhir_base=connection.fhir_base, client_id=connection.client_id,
                              private_key=connection.private_key, scopes=connection.scopes,
                              on_token=on_token)


def recording_clients(engine: Engine) -> ClientFactory:
    """The stages' client factory: :func:`default_client`, each token's expiry recorded in
    ``engine``'s database for the console (:mod:`integration.fhir_tokens`)."""

    def factory(connection: Connection) -> FHIRApi:
        return default_client(connection, fhir_tokens.observer(engine, connection.name))

    return factory


def fhir_source(connection: str, resource: JSON, *, fallback: datetime,
                deleted: bool = False) -> SourceRef:
    """Where one FHIR resource version came from: ``meta.lastUpdated`` is the ordinal time
    (the server's clock), ``meta.versionId`` the version."""
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    assert isinstance(meta, dict)
    version = str(meta.get("versionId") or "")
    updated = meta.get("lastUpdated")
    at = fallback
    if isinstance(updated, str) and updated:
        try:
            at = parse_instant(updated)
        except ValueError:
            at = fallback
    key = f"{resource.get('resourceType')}/{resource.get('id')}"
    if deleted:
        ref = f"{key}/_deleted@{at.astimezone(UTC).isoformat()}"
    elif version:
        ref = f"{key}/_history/{version}"
    else:
        ref = f"{key}@{updated or ''}"
    return SourceRef(system="fhir", connection=connection[:255], ref=ref[:512],
                     version=(version or ("deleted" if deleted else ""))[:64], ordinal=at,
                     deleted=deleted)


def fhir_ids_among(engine: Engine, inbox_ids: Sequence[int]) -> list[int]:
    """Which of ``inbox_ids`` are waiting ``fhir`` rows (for the Celery hand-over)."""
    if not inbox_ids:
        return []
    with engine.connect() as conn:
        return [r.id for r in conn.execute(select(inbox.c.id).where(
            inbox.c.id.in_(list(inbox_ids)), inbox.c.source == "fhir",
            inbox.c.status == InboxStatus.RECEIVED.value))]


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:500] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 5 * 2 ** max(0, attempts - 1)))


@dataclass
class _Found:
    """Resources to apply (the newest of each version) and deletes (type, id, time)."""

    resources: list[JSON]
    deletes: list[tuple[str, str, datetime]]

    def __len__(self) -> int:
        return len(self.resources) + len(self.deletes)


class FhirIngest:
    """Processes ``fhir`` inbox rows and runs the timers; one :class:`FHIRApi` per
    connection, built lazily (call :meth:`aclose` at the end, on the same event loop)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        client_factory: ClientFactory | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.settings = settings
        self._factory = client_factory or recording_clients(engine)
        self._clock = clock
        self._clients: dict[str, FHIRApi] = {}
        self._capabilities: dict[str, ServerCapabilities] = {}
        self._identity = IdentityRules(settings.authoritative_identifier_systems)
        self._last_ensure = time.monotonic()

    def client(self, connection: Connection) -> FHIRApi:
        api = self._clients.get(connection.name)
        if api is None:
            api = self._clients[connection.name] = self._factory(connection)
        return api

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for api in clients:
            close = getattr(api, "aclose", None)
            if close is not None:
                await close()

    # --- rows ----------------------------------------------------------------------------

    def _claim(self, inbox_ids: Sequence[int]) -> list[_Row]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(inbox.c.id, inbox.c.peer, inbox.c.raw, inbox.c.attempts,
                       inbox.c.received_at)
                .where(inbox.c.id.in_(list(inbox_ids)), inbox.c.source == "fhir",
                       inbox.c.status == InboxStatus.RECEIVED.value)
                .order_by(inbox.c.id))
            return [_Row(r.id, r.peer, bytes(r.raw), r.attempts, r.received_at) for r in rows]

    async def process(self, inbox_ids: Sequence[int]) -> list[FhirOutcome]:
        """Process the ``fhir`` rows among ``inbox_ids`` (others are left alone), in order."""
        if not inbox_ids:
            return []
        rows = await asyncio.to_thread(self._claim, inbox_ids)
        outcomes = []
        for row in rows:
            outcome = await self._process_row(row)
            if outcome is not None:
                outcomes.append(outcome)
                PROCESSED.labels(stage="fhir", outcome=outcome.status).inc()
                log.info("fhir_notification_processed", inbox_id=row.id, status=outcome.status,
                         connection=row.peer)
        return outcomes

    async def _process_row(self, row: _Row) -> FhirOutcome | None:
        now = self._clock()
        attempts = row.attempts + 1
        connection = self.settings.connection(row.peer)
        try:
            notification = parse_notification(row.raw)
            if connection is None:
                raise NotificationError(f"no FHIR connection named {row.peer!r} any more")
        except NotificationError as exc:
            await asyncio.to_thread(self._finish, row.id, attempts, now, str(exc), failed=True)
            return FhirOutcome(row.id, InboxStatus.FAILED.value, str(exc))
        sub_id = notification.subscription_id or ""
        try:
            sub = await asyncio.to_thread(self._subscription, connection.name, sub_id)
            rtype = sub.resource_type if sub else self._type_for(connection, notification.topic)
            found = await self._resources(connection, notification, rtype, now)
            decision = await asyncio.to_thread(
                self._commit_row, row, attempts, connection, notification, sub, found, now)
        except _LostRace:
            return None
        except Exception as exc:  # network, server or database: retry with backoff
            error = _describe(exc)
            log.warning("fhir_processing_error", inbox_id=row.id, attempts=attempts,
                        exc_type=type(exc).__name__, connection=connection.name)
            failed = attempts >= self.settings.max_attempts
            await asyncio.to_thread(self._finish, row.id, attempts, now, error, failed=failed)
            status = InboxStatus.FAILED if failed else InboxStatus.RECEIVED
            return FhirOutcome(row.id, status.value, error)
        if isinstance(decision, CatchUp) and sub is not None:
            await self.catch_up(connection, sub.resource_type, decision)
        return FhirOutcome(row.id, InboxStatus.PROCESSED.value, None, len(found))

    def _subscription(self, connection: str, sub_id: str) -> SubscriptionRow | None:
        if not sub_id:
            return None
        with self.engine.connect() as conn:
            return find_by_subscription(conn, connection, sub_id)

    @staticmethod
    def _type_for(connection: Connection, topic: str | None) -> str | None:
        for rtype, url in connection.topics.items():
            if url == topic:
                return rtype
        return connection.resource_types[0] if len(connection.resource_types) == 1 else None

    async def _resources(self, connection: Connection, notification: Notification,
                         rtype: str | None, now: datetime) -> _Found:
        events = list(notification.events)
        if not events:
            return _Found([], [])
        api = self.client(connection)
        topic_types = {url: t for t, url in connection.topics.items()}
        resolved = await run_flow(resolve_flow(
            events, topic=notification.topic, topic_types=topic_types,
            default_types=[rtype] if rtype else list(connection.resource_types)), api)
        stamps = {e.focus.key: e.timestamp for e in events if e.focus is not None}
        deletes = [(ref.resource_type or "", ref.id or "", _when(stamps.get(ref.key), now))
                   for ref in resolved.deleted if ref.resource_type and ref.id]
        resources = list(resolved.resources)
        resources += await self._patients(api, resources)
        return _Found(resources, deletes)

    @staticmethod
    async def _patients(api: FHIRApi, resources: Iterable[JSON]) -> list[JSON]:
        """The Patients ``resources`` refer to, read in batches (identity links them to
        patients known from HL7 v2 by identifier)."""
        have = {str(r.get("id")) for r in resources if r.get("resourceType") == "Patient"}
        wanted: list[str] = []
        for res in resources:
            ref = patient_reference(res)
            if ref:
                pid = Reference.parse(ref).id
                if pid and pid not in have and pid not in wanted:
                    wanted.append(pid)
        found: list[JSON] = []
        for start in range(0, len(wanted), 50):
            chunk = wanted[start:start + 50]
            request = FHIRRequest.get("Patient", {"_id": ",".join(chunk),
                                                  "_count": str(len(chunk))})
            async for bundle in api.pages(request):
                found.extend(r for r in bundle_resources(bundle)
                             if r.get("resourceType") == "Patient")
        return found

    def _apply(self, conn: DbConnection, connection: str, found: _Found, now: datetime,
               received_at: datetime | None = None) -> None:
        batch: list[tuple[list[JSON], SourceRef]] = []
        newest: dict[tuple[str, str], JSON] = {}
        for res in found.resources:
            if res.get("resourceType") and res.get("id"):
                newest[(str(res["resourceType"]), str(res["id"]))] = res
        for res in newest.values():
            src = fhir_source(connection, res, fallback=now)
            batch.append(([res], replace(src, received_at=received_at)))
        for rtype, rid, at in found.deletes:
            stub: JSON = {"resourceType": rtype, "id": rid}
            src = fhir_source(connection, stub, fallback=at, deleted=True)
            batch.append(([stub], src))
        if batch:
            apply_batch(conn, batch, now, self._identity)

    def _commit_row(self, row: _Row, attempts: int, connection: Connection,  # noqa: PLR0917
                    notification: Notification, sub: SubscriptionRow | None, found: _Found,
                    now: datetime) -> Decision:
        decision: Decision = None
        with write_lock(self.engine), self.engine.begin() as conn:
            if sub is not None:
                fresh = find_by_subscription(conn, connection.name, sub.subscription_id or "",
                                             for_update=True)
                if fresh is not None:
                    state = (TrackerState.from_json(fresh.tracker) if fresh.tracker
                             else TrackerState.new(fresh.subscription_id or "", now=now))
                    state, decision = observe(state, notification, now=now)
                    values: dict[str, Any] = {"tracker": state.to_json(),
                                              "status": state.status or fresh.status,
                                              "last_notification_at": now}
                    if notification.type == "heartbeat":
                        values["last_heartbeat_at"] = now
                    update_subscription_row(conn, fresh.connection, fresh.resource_type,
                                            values, now=now)
            self._apply(conn, connection.name, found, now, row.received_at)
            result = conn.execute(update(inbox).where(
                inbox.c.id == row.id, inbox.c.status == InboxStatus.RECEIVED.value,
            ).values(status=InboxStatus.PROCESSED.value, attempts=attempts, last_error=None,
                     processed_at=now, next_attempt_at=None))
            if result.rowcount != 1:
                raise _LostRace
        return decision

    def _finish(self, inbox_id: int, attempts: int, now: datetime, error: str, *,
                failed: bool) -> None:
        values: dict[str, Any] = {"attempts": attempts, "last_error": error}
        if failed:
            values.update(status=InboxStatus.FAILED.value, processed_at=now,
                          next_attempt_at=None)
        else:
            values.update(next_attempt_at=now + _backoff(attempts))
        with write_lock(self.engine), self.engine.begin() as conn:
            conn.execute(update(inbox).where(
                inbox.c.id == inbox_id, inbox.c.status == InboxStatus.RECEIVED.value,
            ).values(**values))

    # --- catch-up ------------------------------------------------------------------------

    def _claim_catch_up(self, connection: str, rtype: str, now: datetime) -> bool:
        with write_lock(self.engine), self.engine.begin() as conn:
            result = conn.execute(update(fhir_subscriptions).where(
                fhir_subscriptions.c.connection == connection,
                fhir_subscriptions.c.resource_type == rtype,
                or_(fhir_subscriptions.c.catchup_claimed_at.is_(None),
                    fhir_subscriptions.c.catchup_claimed_at < now - CLAIM_TIMEOUT),
            ).values(catchup_claimed_at=now))
            return result.rowcount == 1

    async def capabilities(self, connection: Connection) -> ServerCapabilities:
        caps = self._capabilities.get(connection.name)
        if caps is None:
            response = await self.client(connection).send(FHIRRequest.get("metadata"))
            caps = ServerCapabilities.from_capability_statement(response.resource)
            self._capabilities[connection.name] = caps
        return caps

    async def catch_up(self, connection: Connection, rtype: str, decision: CatchUp) -> bool:
        """Recover what ``decision`` says is missing for (connection, type); False when
        another catch-up holds the claim or there is no subscription to catch up."""
        now = self._clock()
        if not await asyncio.to_thread(self._claim_catch_up, connection.name, rtype, now):
            return False
        started = time.perf_counter()
        try:
            with self.engine.connect() as conn:
                sub = read_subscription_row(conn, connection.name, rtype)
            if sub is None or not sub.subscription_id:
                await asyncio.to_thread(self._release, connection.name, rtype, now, None)
                return False
            log.info("fhir_catch_up_started", connection=connection.name, reason=decision.reason)
            api = self.client(connection)
            caps = await self.capabilities(connection)
            result = await run_flow(catch_up_flow(
                decision, subscription_id=sub.subscription_id, resource_types=[rtype],
                capabilities=caps), api)
            resources = list(result.resources)
            deletes = [(c.resource_type, c.id, _when(c.last_updated, now))
                       for c in result.changes if c.deleted]
            if result.events:
                resolved = await run_flow(resolve_flow(
                    result.events, topic=sub.topic,
                    topic_types={url: t for t, url in connection.topics.items()},
                    default_types=[rtype]), api)
                resources += resolved.resources
                deletes += [(r.resource_type or "", r.id or "", now) for r in resolved.deleted
                            if r.resource_type and r.id]
            resources += await self._patients(api, resources)
            found = _Found(resources, deletes)
            await asyncio.to_thread(self._commit_catch_up, connection, rtype, found, result.through,
                                    result.good_timestamp)
            log.info("fhir_caught_up", connection=connection.name, reason=decision.reason,
                     method=result.method, count=len(found),
                     elapsed_ms=round((time.perf_counter() - started) * 1000, 1))
            return True
        except Exception as exc:
            log.warning("fhir_catch_up_failed", connection=connection.name,
                        exc_type=type(exc).__name__, reason=decision.reason)
            await asyncio.to_thread(self._release, connection.name, rtype, now, _describe(exc))
            return False

    def _commit_catch_up(self, connection: Connection, rtype: str, found: _Found, through: int,
                         good: str | None) -> None:
        now = self._clock()
        with write_lock(self.engine), self.engine.begin() as conn:
            sub = read_subscription_row(conn, connection.name, rtype)
            self._apply(conn, connection.name, found, now)
            if sub is None:
                return
            state = (TrackerState.from_json(sub.tracker) if sub.tracker
                     else TrackerState.new(sub.subscription_id or "", now=now))
            state = caught_up(state, through=through, at=now, good_timestamp=good)
            update_subscription_row(conn, connection.name, rtype, {
                "tracker": state.to_json(), "catchup_claimed_at": None, "last_error": None,
            }, now=now)

    def _release(self, connection: str, rtype: str, now: datetime, error: str | None) -> None:
        with write_lock(self.engine), self.engine.begin() as conn:
            values: dict[str, Any] = {"catchup_claimed_at": None}
            if error is not None:
                values["last_error"] = error
            update_subscription_row(conn, connection, rtype, values, now=now)

    # --- timers --------------------------------------------------------------------------

    async def _renew_if_due(self) -> None:
        """Every ``subscription_renew_s``, what ``careloop subscriptions ensure`` does: renew a
        Subscription before its ``end``, repair or re-create a changed or vanished one, and
        reactivate one in ``error``/``off`` once caught up. Idempotent, so every process that
        runs the timer may do it."""
        interval = self.settings.subscription_renew_s
        if not interval or time.monotonic() - self._last_ensure < interval:
            return
        self._last_ensure = time.monotonic()
        from integration.fhir_subscribe import ensure_subscriptions  # noqa: PLC0415 - cycle

        try:
            for line in await ensure_subscriptions(self.engine, self.settings):
                log.info("fhir_subscription_ensured", connection=line.connection,
                         status=line.action)
        except Exception as exc:
            log.warning("fhir_renew_failed", exc_type=type(exc).__name__, error=str(exc)[:200])

    async def tick(self) -> int:
        """One round of the timers: heartbeat/gap checks (catch-up when due) and polls that
        are due. Returns how many catch-ups and polls ran."""
        ran = 0
        await self._renew_if_due()
        for connection in self.settings.connections:
            for rtype in connection.resource_types:
                try:
                    if connection.mode == "poll":
                        ran += await self._poll_if_due(connection, rtype)
                    else:
                        ran += await self._check(connection, rtype)
                except Exception as exc:
                    log.warning("fhir_timer_failed", connection=connection.name,
                                exc_type=type(exc).__name__, error=str(exc)[:200])
        return ran

    async def _check(self, connection: Connection, rtype: str) -> int:
        now = self._clock()
        with self.engine.connect() as conn:
            sub = read_subscription_row(conn, connection.name, rtype)
        if sub is None or not sub.subscription_id or not sub.tracker:
            return 0
        heartbeat = (connection.heartbeat_s if connection.mode == "backport"
                     else connection.poll_interval_s / 2)
        before = TrackerState.from_json(sub.tracker)
        state, decision = check(before, now=now, heartbeat_s=heartbeat or None)
        if state != before:
            def save() -> None:
                with write_lock(self.engine), self.engine.begin() as c:
                    update_subscription_row(c, connection.name, rtype,
                                            {"tracker": state.to_json()}, now=now)
            await asyncio.to_thread(save)
        if isinstance(decision, CatchUp):
            return int(await self.catch_up(connection, rtype, decision))
        return 0

    async def _poll_if_due(self, connection: Connection, rtype: str) -> int:
        """Due when the last poll (``last_notification_at``, in the database, so that any
        process's timer may run it) is ``poll_interval_s`` old."""
        now = self._clock()
        with self.engine.connect() as conn:
            sub = read_subscription_row(conn, connection.name, rtype)
        last = sub.last_notification_at if sub is not None else None
        if last is not None:
            last = last if last.tzinfo else last.replace(tzinfo=UTC)
            if now - last < timedelta(seconds=connection.poll_interval_s):
                return 0
        await self.poll(connection, rtype)
        return 1

    async def poll(self, connection: Connection, rtype: str) -> int:
        """One poll of (connection, type); the new cursor is stored with the changes.
        Returns the number of changes applied."""
        with self.engine.connect() as conn:
            sub = read_subscription_row(conn, connection.name, rtype)
        cursor = (PollCursor.from_json(sub.poll_cursor) if sub and sub.poll_cursor
                  else PollCursor(rtype))
        api = self.client(connection)
        result = await run_flow(poll_flow(cursor), api)
        now = self._clock()
        resources = [c.resource for c in result.changes if c.resource is not None]
        deletes = [(c.resource_type, c.id, _when(c.last_updated, now))
                   for c in result.changes if c.deleted]
        resources += await self._patients(api, resources)
        found = _Found(resources, deletes)

        def commit() -> None:
            with write_lock(self.engine), self.engine.begin() as conn:
                ensure_subscription_row(conn, connection.name, rtype, mode="poll", now=now)
                self._apply(conn, connection.name, found, now)
                update_subscription_row(conn, connection.name, rtype, {
                    "poll_cursor": result.cursor.to_json(), "last_error": None,
                    "last_notification_at": now}, now=now)

        await asyncio.to_thread(commit)
        if found:
            log.info("fhir_polled", connection=connection.name, count=len(found))
        return len(found)


def _when(stamp: str | None, fallback: datetime) -> datetime:
    if not stamp:
        return fallback
    try:
        return parse_instant(stamp)
    except ValueError:
        return fallback


class FhirWorker:
    """Runs a :class:`FhirIngest` on an event loop of its own, in a thread of its own (the
    in-process mode of ``careloop serve``): worker threads hand it ids with :meth:`process`,
    and a timer runs :meth:`FhirIngest.tick` every ``tick_s`` seconds."""

    def __init__(self, engine: Engine, settings: Settings, *,
                 client_factory: ClientFactory | None = None, tick_s: float = 5.0) -> None:
        self.ingest = FhirIngest(engine, settings, client_factory=client_factory)
        self._tick_s = tick_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fhir-ingest", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._stopping = asyncio.Event()
        timer = loop.create_task(self._timer())
        self._ready.set()
        try:
            loop.run_until_complete(self._stopping.wait())
            timer.cancel()
            loop.run_until_complete(asyncio.gather(timer, return_exceptions=True))
            loop.run_until_complete(self.ingest.aclose())
        finally:
            loop.close()

    async def _timer(self) -> None:
        assert self._stopping is not None
        while not self._stopping.is_set():
            try:
                await self.ingest.tick()
            except Exception as exc:
                log.warning("fhir_timer_failed", exc_type=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._tick_s)

    def process(self, inbox_ids: Sequence[int], timeout: float = 300.0) -> list[FhirOutcome]:
        """Process the ``fhir`` rows among ``inbox_ids`` (blocks the calling thread)."""
        if self._loop is None or not inbox_ids:
            return []
        future = asyncio.run_coroutine_threadsafe(self.ingest.process(inbox_ids), self._loop)
        return future.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._thread is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        self._thread = None
