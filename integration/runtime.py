"""Wiring: one :class:`Runtime` holds the engine, the intake, the dispatcher and the MLLP
listener built from the settings, and starts and stops them in order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from adapters.mllp import MLLPServer, ServerLimits, server_ssl_context
from integration.appacks import deliver_app_acks
from integration.clients import ClientRegistry
from integration.conversion import ContextFactory
from integration.db import Checkpointer, create_db_engine
from integration.delivery import build_channels, delivery_for
from integration.fhir_ingest import FhirWorker
from integration.intake import GroupCommitter, IntakeService, Receipt
from integration.logs import get_logger
from integration.metrics import register_queue_collector, register_subscription_collector
from integration.models import fhir_subscriptions
from integration.oauth import TokenService
from integration.outreach.stage import OutreachStage
from integration.outreach.state import OutreachConfig
from integration.pipeline import (
    Dispatcher,
    InProcessDispatcher,
    due_ids,
    process_batch,
    queue_depth,
)
from integration.replies.stage import ReplyStage
from integration.scheduling import SchedulingService
from integration.settings import Settings
from integration.tasks import CeleryDispatcher, make_celery
from integration.waitlist import WaitlistStage
from integration.workpool import WorkPool
from integration.writeback import WritebackStage
from mappings.ack import AckCode, AckError, build_ack_for_unreadable
from mappings.er7 import ER7Error, split_messages

__all__ = ["Runtime"]

log = get_logger("careloop.runtime")


class Runtime:
    """Everything ``careloop serve`` runs, built from one :class:`Settings`."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        dispatcher: Dispatcher | None = None,
        with_mllp: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine or create_db_engine(
            settings.database_url, sqlite_autocheckpoint=False
        )
        self._checkpointer = (
            Checkpointer(self.engine) if self.engine.dialect.name == "sqlite" else None
        )
        self.clients = ClientRegistry(self.engine)
        self.tokens = TokenService(
            self.engine,
            self.clients,
            token_url=settings.base_url.rstrip("/") + "/oauth/token",
            ttl_s=settings.token_ttl_s,
        )
        self.contexts = ContextFactory(settings)
        self.work_pool: WorkPool | None = None
        self.fhir: FhirWorker | None = None
        """FHIR notifications, catch-up and polling in-process (no broker, connections set)."""
        self._swept = False
        self._inprocess: InProcessDispatcher | None = None
        self.channels = build_channels(settings)
        """Channel name → the class ``[channels.*]`` picks (the sender and replies use it)."""
        inprocess = not settings.broker_url and settings.inprocess_worker
        self.writeback: WritebackStage | None = None
        """The EHR write-back outbox's in-process loop (a connection with write_back)."""
        if inprocess and any(c.write_back for c in settings.connections):
            self.writeback = WritebackStage(self.engine, settings)
        self.delivery = delivery_for(
            settings, after_commit=self.writeback.poke if self.writeback is not None else None)
        self.replies: ReplyStage | None = None
        """Delivery receipts and replies, processed in-process (no broker)."""
        if inprocess:
            self.replies = ReplyStage(
                self.engine, settings, self.channels,
                after_run=self.writeback.poke if self.writeback is not None else None)
        self.scheduling = SchedulingService(self.engine, settings, notify=self._booked)
        """Free slots and rebooking in the EHR (the patient page, waitlist acceptances)."""
        self.waitlist: WaitlistStage | None = None
        """Freed slots offered to the waitlist, in-process (no broker)."""
        if inprocess:
            self.waitlist = WaitlistStage(self.engine, settings, self.channels,
                                          scheduling=self.scheduling)
        self.outreach: OutreachStage | None = None
        """The outreach stage's in-process loop (no broker and pathways configured)."""
        if settings.pathways and inprocess:
            self.outreach = OutreachStage(
                self.engine, OutreachConfig.from_settings(settings), channels=self.channels,
                delivery=self.delivery)
        if dispatcher is None:
            dispatcher = self._default_dispatcher()
        self.dispatcher = dispatcher
        self.committer = GroupCommitter(self.engine, after_commit=dispatcher.dispatch)
        self.intake = IntakeService(self.committer, stale_after_s=settings.stale_after_s)
        self.mllp: MLLPServer | None = None
        self.mllp_address: tuple[str, int] | None = None
        self._with_mllp = with_mllp
        self.started = False

    def _default_dispatcher(self) -> Dispatcher:
        s = self.settings
        if s.broker_url:
            return CeleryDispatcher(make_celery(s))
        if not s.inprocess_worker:
            return _NoDispatch()
        if s.work_processes:
            self.work_pool = WorkPool(s, processes=s.work_processes)
        if s.connections:
            self.fhir = FhirWorker(self.engine, s)
        self._inprocess = InProcessDispatcher(
            self.process,
            threads=s.worker_threads,
            sweep=self._sweep,
            sweep_interval_s=s.sweep_interval_s,
        )
        return self._inprocess

    def process(self, inbox_ids: list[int]) -> object:
        outcomes = process_batch(
            self.engine, inbox_ids, max_attempts=self.settings.max_attempts,
            contexts=self.contexts, run=self.work_pool,
        )
        deliver_app_acks(self.engine, self.settings)
        if self.fhir is not None:
            self.fhir.process(inbox_ids)  # the fhir rows; process_batch leaves them alone
        if self.outreach is not None:
            self.outreach.poke()  # new timeline changes: reconcile now, not at the next tick
        if self.waitlist is not None:
            self.waitlist.poke()  # a cancellation may have freed a slot
        return outcomes

    def _booked(self) -> None:
        """A booking committed: new reminders to plan, a Communication and a freed slot owed."""
        for stage in (self.outreach, self.writeback, self.waitlist):
            if stage is not None:
                stage.poke()

    def _sweep(self) -> list[int]:
        deliver_app_acks(self.engine, self.settings)
        first, self._swept = not self._swept, True
        if first:  # everything the previous run left, however much
            return due_ids(self.engine, include_unstarted=True, limit=1_000_000)
        return due_ids(self.engine)

    async def start(self) -> None:
        if self.started:
            return
        register_queue_collector(lambda: queue_depth(self.engine))
        if self.settings.connections:
            register_subscription_collector(self._subscription_silence)
        if self._checkpointer is not None:
            self._checkpointer.start()
        if self.fhir is not None:
            self.fhir.start()
        if self._inprocess is not None:
            self._inprocess.start()
        if self.outreach is not None:
            self.outreach.start()
        if self.writeback is not None:
            self.writeback.start()
        if self.replies is not None:
            self.replies.start()
        if self.waitlist is not None:
            self.waitlist.start()
        start = getattr(self.dispatcher, "start", None)
        if start is not None and self._inprocess is None:
            start()
        await self.committer.start()
        if self._with_mllp:
            await self._start_mllp()
        self.started = True

    async def _start_mllp(self) -> None:
        s = self.settings
        ssl_context = None
        if s.mllp_tls_cert and s.mllp_tls_key:
            ssl_context = server_ssl_context(
                str(s.mllp_tls_cert),
                str(s.mllp_tls_key),
                str(s.mllp_tls_client_ca) if s.mllp_tls_client_ca else None,
            )
        self.mllp = MLLPServer(
            self.handle_frame,
            limits=ServerLimits(
                max_frame_bytes=s.mllp_max_frame_bytes,
                idle_timeout_s=s.mllp_idle_timeout_s,
                frame_timeout_s=s.mllp_frame_timeout_s,
                max_connections=s.mllp_max_connections,
            ),
            ssl_context=ssl_context,
            on_oversize=self._oversize_reply,
            on_error=lambda exc, peer: log.error(
                "mllp_handler_error", peer=peer, exc_type=type(exc).__name__
            ),
            on_timeout=lambda peer, reason: log.info("mllp_timeout", peer=peer, reason=reason),
        )
        self.mllp_address = await self.mllp.start(s.mllp_host, s.mllp_port)
        log.info("mllp_listening", host=self.mllp_address[0], port=self.mllp_address[1],
                 tls=ssl_context is not None)

    async def stop(self) -> None:
        if self.mllp is not None:
            await self.mllp.close()
        await self.committer.stop()
        if self._inprocess is not None:
            await asyncio.to_thread(self._inprocess.stop)
        if self.fhir is not None:
            await asyncio.to_thread(self.fhir.stop)
        if self.outreach is not None:
            await asyncio.to_thread(self.outreach.stop)
        if self.replies is not None:
            await asyncio.to_thread(self.replies.stop)
        if self.waitlist is not None:
            await asyncio.to_thread(self.waitlist.stop)
        close = getattr(self.scheduling, "aclose", None)  # tests may put a stand-in there
        if close is not None:
            await close()
        if self.writeback is not None:
            await asyncio.to_thread(self.writeback.stop)
        if self.work_pool is not None:
            await asyncio.to_thread(self.work_pool.close)
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
        stop = getattr(self.dispatcher, "stop", None)
        if stop is not None and self._inprocess is None:
            stop()
        self.started = False

    def _subscription_silence(self) -> list[tuple[str, str, float | None, float]]:
        """Per subscription: seconds since the EHR was last heard, and the heartbeat asked."""
        s = fhir_subscriptions
        now = datetime.now(UTC)
        out: list[tuple[str, str, float | None, float]] = []
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.c.connection, s.c.resource_type, s.c.mode,
                                       s.c.last_notification_at, s.c.last_heartbeat_at))
            for r in rows:
                connection = self.settings.connection(r.connection)
                if connection is None or r.mode == "poll":
                    continue
                heard = [t if t.tzinfo else t.replace(tzinfo=UTC)
                         for t in (r.last_notification_at, r.last_heartbeat_at) if t is not None]
                age = (now - max(heard)).total_seconds() if heard else None
                # Classic (R4) subscriptions have no heartbeat: nothing to hold them to.
                heartbeat = float(connection.heartbeat_s) if r.mode == "backport" else 0.0
                out.append((r.connection, r.resource_type, age, heartbeat))
        return out

    def on_channel_event(self, event_id: int) -> None:
        """A webhook committed a channel event: process it soon (never raises)."""
        if self.replies is not None:
            self.replies.poke(event_id)
            return
        app = getattr(self.dispatcher, "app", None)
        if app is not None:
            try:
                app.send_task("careloop.replies.process", args=[[event_id]], queue="outreach")
            except Exception as exc:  # the beat tick picks it up
                log.warning("replies_enqueue_failed", exc_type=type(exc).__name__)

    async def receive_body(self, body: bytes, source: str, peer: str) -> list[Receipt]:
        """Split a body (an MLLP frame or an HTTP request) into messages and take them in."""
        if not body.strip():
            return [_unreadable("the input is empty: no HL7 message", "MSH", "100")]
        try:
            messages = split_messages(body)
        except ER7Error:
            # Not HL7 at all: kept whole as one rejected row for inspection, answered AR.
            messages = [body]
        return await self.intake.receive(messages, source, peer)

    async def handle_frame(self, payload: bytes, peer: str) -> bytes | None:
        receipts = await self.receive_body(payload, "mllp", peer)
        replies = [b for r in receipts if (b := r.ack_bytes()) is not None]
        return b"".join(replies) if replies else None

    def _oversize_reply(self, head: bytes, peer: str) -> bytes:
        limit = self.settings.mllp_max_frame_bytes
        log.warning("mllp_frame_too_large", peer=peer, limit=limit)
        err = AckError(f"the MLLP frame exceeds {limit} bytes; nothing was stored", "", "207")
        control = b""
        if head.startswith(b"MSH") and len(head) > 4:
            parts = head.split(b"\r")[0].split(head[3:4])
            control = parts[9] if len(parts) > 9 else b""
        return build_ack_for_unreadable(
            AckCode.AR, err, control_id="CLOVERSIZE",
            now=datetime.now(UTC), echo_control_id=control.decode("latin-1"),
        ).encode()


def _unreadable(text: str, location: str, code: str) -> Receipt:
    ack = build_ack_for_unreadable(
        AckCode.AR, AckError(text, location, code), control_id="CLREJECT", now=datetime.now(UTC)
    )
    return Receipt(AckCode.AR, ack, "utf-8")


class _NoDispatch:
    """Stores without processing (``CARELOOP_INPROCESS_WORKER=false`` and no broker):
    rows wait for a worker or ``careloop replay``."""

    def dispatch(self, inbox_ids: object) -> None:
        return None
