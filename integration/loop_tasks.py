"""Celery tasks of the closed loop: ``careloop.writeback.flush`` (queue ``writeback``) and
``careloop.replies.process`` and ``careloop.waitlist.tick`` (queue ``outreach``: freed slots
from cancellations, then a round of offers), with their beat entries, and the daily
``careloop.retention.purge`` (queue ``outreach``, scheduled only when ``[retention]`` sets a
period).

A worker keeps one :class:`~integration.writeback.WritebackStage` per process (its FHIR clients
and SMART tokens live on the stage's own event loop) and builds the channels once. Beat ticks
both every few seconds; the sender and the webhooks also ask for them at once after a commit,
so the tick only bounds the delay when a task was lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from adapters.channels import Channel
from integration.delivery import build_channels
from integration.replies.processor import process_events
from integration.retention import purge
from integration.settings import Settings
from integration.waitlist import consume_cancellations, offer_round
from integration.writeback import WritebackStage

__all__ = ["LOOP_TICK_S", "RETENTION_PURGE_S", "WAITLIST_TICK_S", "loop_schedule",
           "register_loop_tasks"]

LOOP_TICK_S = 5.0
WAITLIST_TICK_S = 10.0
RETENTION_PURGE_S = 24 * 3600.0
"""``careloop.retention.purge`` runs daily (only when a ``[retention]`` period is set)."""


def loop_schedule(settings: Settings) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "replies-process": {"task": "careloop.replies.process", "schedule": LOOP_TICK_S,
                            "options": {"queue": "outreach", "expires": LOOP_TICK_S * 5}},
        "waitlist-tick": {"task": "careloop.waitlist.tick", "schedule": WAITLIST_TICK_S,
                          "options": {"queue": "outreach", "expires": WAITLIST_TICK_S * 3}},
    }
    if any(c.write_back for c in settings.connections):
        schedule["writeback-flush"] = {
            "task": "careloop.writeback.flush", "schedule": LOOP_TICK_S,
            "options": {"queue": "writeback", "expires": LOOP_TICK_S * 5}}
    if settings.retention.any_set():
        schedule["retention-purge"] = {
            "task": "careloop.retention.purge", "schedule": RETENTION_PURGE_S,
            "options": {"queue": "outreach", "expires": RETENTION_PURGE_S / 2}}
    return schedule


def register_loop_tasks(app: Celery, settings: Settings, engine: Callable[[], Engine]) -> None:
    stages: list[WritebackStage] = []
    channels: list[dict[str, Channel]] = []

    def stage() -> WritebackStage:
        if not stages or stages[0].engine is not engine():
            stages[:] = [WritebackStage(engine(), settings)]
        return stages[0]

    def chans() -> dict[str, Channel]:
        if not channels:
            channels.append(build_channels(settings))
        return channels[0]

    @app.task(name="careloop.writeback.flush", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def writeback_flush() -> int:
        if not any(c.write_back for c in settings.connections):
            return 0
        return stage().run_once().written

    @app.task(name="careloop.replies.process", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def replies_process(ids: list[int] | None = None) -> int:
        result = process_events(engine(), settings, chans(),
                                ids=[int(i) for i in ids] if ids else None)
        if result.processed and any(c.write_back for c in settings.connections):
            app.send_task("careloop.writeback.flush", queue="writeback")
        return result.processed

    @app.task(name="careloop.waitlist.tick", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def waitlist_tick() -> int:
        consume_cancellations(engine(), settings)
        return offer_round(engine(), settings, chans()).offered

    @app.task(name="careloop.retention.purge", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def retention_purge() -> int:
        if not settings.retention.any_set():
            return 0
        return sum(purge(engine(), settings).values())
