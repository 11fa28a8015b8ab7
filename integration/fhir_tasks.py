"""Celery tasks for FHIR in (``CARELOOP_BROKER_URL`` set): ``careloop.fhir.process`` on queue
``fhir`` (notification rows, handed over by ``careloop.process``, which sees every new inbox
id) and ``careloop.fhir.tick`` on the beat (heartbeat and gap checks, catch-up, polling)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from integration.fhir_ingest import FhirIngest, fhir_ids_among
from integration.logs import get_logger
from integration.settings import Settings

__all__ = ["TICK_S", "fhir_schedule", "register_fhir_tasks"]

log = get_logger("careloop.fhir.tasks")

TICK_S = 5.0
Forward = Callable[[Engine, Sequence[int]], None]


def fhir_schedule(settings: Settings) -> dict[str, Any]:
    """The beat entry for the FHIR timers (none without connections)."""
    if not settings.connections:
        return {}
    return {"fhir-tick": {"task": "careloop.fhir.tick", "schedule": TICK_S}}


async def _process(engine: Engine, settings: Settings, ids: list[int]) -> int:
    ingest = FhirIngest(engine, settings)
    try:
        return len(await ingest.process(ids))
    finally:
        await ingest.aclose()


async def _tick(engine: Engine, settings: Settings) -> int:
    ingest = FhirIngest(engine, settings)
    try:
        return await ingest.tick()
    finally:
        await ingest.aclose()


def register_fhir_tasks(app: Celery, settings: Settings,
                        engine: Callable[[], Engine]) -> Forward:
    """Register the tasks on ``app``; returns ``forward(engine, ids)``, which sends the
    ``fhir`` rows among ``ids`` to ``careloop.fhir.process``."""

    @app.task(name="careloop.fhir.process", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def fhir_process(inbox_ids: list[int]) -> int:
        return asyncio.run(_process(engine(), settings, [int(i) for i in inbox_ids]))

    @app.task(name="careloop.fhir.tick", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def fhir_tick() -> int:
        return asyncio.run(_tick(engine(), settings))

    def forward(db: Engine, inbox_ids: Sequence[int]) -> None:
        if not settings.connections:
            return
        ids = fhir_ids_among(db, inbox_ids)
        if ids:
            fhir_process.apply_async(args=[ids], queue="fhir")

    return forward
