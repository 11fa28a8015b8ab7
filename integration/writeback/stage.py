"""The write-back stage as one unit: an event loop of its own, in a thread of its own.

``careloop serve`` without a broker starts it (:meth:`WritebackStage.start`): it flushes every
``interval_s`` seconds, and soon after :meth:`poke` (something was put in the outbox). With
Celery, a worker keeps one stage per process and its task calls :meth:`run_once`. Either way
the database decides who writes what (claims), so several runners are safe.

The FHIR clients (one per connection, with their SMART tokens) live on the stage's loop and are
closed by :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from adapters.fhir import FHIRApi
from integration.fhir_ingest import recording_clients
from integration.logs import get_logger
from integration.settings import Connection, Settings
from integration.writeback.flusher import FlushResult, flush

__all__ = ["LANES", "WritebackStage"]

LANES = 3
"""Flushes in flight at once on the stage's loop."""

log = get_logger("careloop.writeback")


class WritebackStage:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        client_factory: Callable[[Connection], FHIRApi] | None = None,
        interval_s: float = 2.0,
        limit: int = 300,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self._factory = client_factory or recording_clients(engine)
        self._interval = interval_s
        self._limit = limit
        self._clients: dict[str, FHIRApi] = {}
        self._batch_support: dict[str, bool] = {}
        self._guard = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._running: asyncio.Lock | None = None
        self._timer: asyncio.Task[None] | None = None

    # -- the loop -------------------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._thread is None:
                self._ready.clear()
                self._thread = threading.Thread(target=self._run, name="writeback",
                                                daemon=True)
                self._thread.start()
                self._ready.wait(10)
        assert self._loop is not None
        return self._loop

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._running = asyncio.Lock()
        self._ready.set()
        try:
            loop.run_until_complete(self._closed.wait())
            if self._timer is not None:
                self._timer.cancel()
                loop.run_until_complete(asyncio.gather(self._timer, return_exceptions=True))
            loop.run_until_complete(self._aclose())
        finally:
            if self._loop is loop:  # a stop that timed out may have been followed by a start
                self._loop = None
            loop.close()

    def _client(self, connection: Connection) -> FHIRApi:
        api = self._clients.get(connection.name)
        if api is None:
            api = self._clients[connection.name] = self._factory(connection)
        return api

    async def _aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for api in clients:
            close = getattr(api, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    async def _flush(self, now: datetime | None) -> FlushResult:
        assert self._running is not None
        async with self._running:
            return await flush(self.engine, self.settings, self._client, now=now,
                               limit=self._limit, batch_support=self._batch_support)

    async def _tick(self) -> None:
        assert self._wake is not None and self._closed is not None
        while not self._closed.is_set():
            self._wake.clear()
            try:
                assert self._running is not None
                async with self._running:
                    # Two lanes drain at once, so the EHR always has the next batch waiting
                    # while careloop records the last one (claims never overlap).
                    await asyncio.gather(*(self._lane() for _ in range(LANES)))
            except Exception as exc:  # the database decides; the next tick tries again
                log.warning("writeback_failed", exc_type=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)

    async def _lane(self) -> None:
        size = max(1, self._limit // LANES)
        while True:  # drain: a full claim means more may be due
            result = await flush(self.engine, self.settings, self._client, limit=size,
                                 batch_support=self._batch_support)
            if result.claimed < size:
                return

    # -- the API -------------------------------------------------------------------------------
    def start(self) -> None:
        """Flush every ``interval_s`` (and on :meth:`poke`) until :meth:`stop`."""
        loop = self._ensure_loop()

        def begin() -> None:
            if self._timer is None:
                self._timer = loop.create_task(self._tick())

        loop.call_soon_threadsafe(begin)

    def poke(self) -> None:
        """Rows were put in the outbox: flush soon rather than at the next tick."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def run_once(self, now: datetime | None = None, timeout: float = 300.0) -> FlushResult:
        """One flush (up to ``limit`` rows), from any thread; blocks until done."""
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(self._flush(now), loop)
        return future.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the timer, close the FHIR clients and the loop."""
        with self._guard:
            loop, closed, thread = self._loop, self._closed, self._thread
            if loop is None or closed is None or thread is None:
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(closed.set)
            thread.join(timeout)
            self._thread = None
            self._timer = None
