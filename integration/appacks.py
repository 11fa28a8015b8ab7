"""Enhanced mode: delivering application acknowledgements back to the sender.

When MSH-16 asks for one, the processing stage builds the application ACK (AA, or AE with ERR)
and keeps it on the inbox row. MLLP is one-way per connection, so the application ACK travels as
a new message over a connection careloop opens to the sender's listener: ``ack_to`` in that
sender's rule (``[[hl7_senders]]`` or the console's Senders, :mod:`integration.senders`). Rows
whose sender has no ``ack_to`` keep their ACK on record (``careloop inbox show``) and are not
retried. Delivery runs with the sweep, so an unreachable listener only delays it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update

from adapters.mllp import AckMismatch, MLLPClient
from integration.db import write_lock
from integration.logs import get_logger
from integration.models import inbox
from integration.senders import SenderRegistry, namespace
from integration.settings import Settings

__all__ = ["deliver_app_acks"]

log = get_logger("careloop.appacks")
_delivering = threading.Lock()
_registries: weakref.WeakKeyDictionary[Engine, SenderRegistry] = weakref.WeakKeyDictionary()
_registries_guard = threading.Lock()


def _registry(engine: Engine, settings: Settings) -> SenderRegistry:
    """This process's sender rules for ``engine`` (the console's checked every few seconds:
    an ACK held back meanwhile goes with the next sweep)."""
    with _registries_guard:
        registry = _registries.get(engine)
        if registry is None or registry.settings is not settings:
            registry = _registries[engine] = SenderRegistry(settings, refresh_s=2.0)
    registry.refresh(engine)
    return registry


def deliver_app_acks(
    engine: Engine, settings: Settings, *, limit: int = 200, timeout: float = 5.0
) -> int:
    """Send pending application ACKs to their senders' ``ack_to``; returns how many went."""
    registry = _registry(engine, settings)
    if not any(r.rule.ack_to for r in registry.rules()):
        return 0
    # One delivery at a time in this process (the worker and the sweeper both call this).
    if not _delivering.acquire(blocking=False):
        return 0
    try:
        return _deliver(engine, registry, limit, timeout)
    finally:
        _delivering.release()


def _deliver(engine: Engine, registry: SenderRegistry, limit: int, timeout: float) -> int:
    with engine.connect() as conn:
        rows = conn.execute(
            select(inbox.c.id, inbox.c.sender, inbox.c.app_ack)
            .where(inbox.c.app_ack.is_not(None), inbox.c.app_ack_sent_at.is_(None))
            .order_by(inbox.c.id)
            .limit(limit)
        ).all()
    targets: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        application, _, facility = row.sender.partition("|")
        rule = registry.find(namespace(application), namespace(facility))
        if rule is not None and rule.ack_to:
            targets[rule.ack_to].append(row)
    sent: list[int] = []
    for target, batch in targets.items():
        sent += asyncio.run(_send(target, batch, timeout))
    if sent:
        with write_lock(engine), engine.begin() as conn:
            conn.execute(
                update(inbox).where(inbox.c.id.in_(sent)).values(app_ack_sent_at=datetime.now(UTC))
            )
        log.info("app_acks_sent", count=len(sent))
    return len(sent)


async def _send(target: str, rows: list[Any], timeout: float) -> list[int]:
    host, _, port = target.rpartition(":")
    try:
        client = await MLLPClient.connect(host, int(port), timeout=timeout)
    except (OSError, TimeoutError) as exc:
        log.warning("app_ack_target_unreachable", host=host, port=port,
                    exc_type=type(exc).__name__)
        return []
    sent: list[int] = []
    async with client:
        for row in rows:
            payload = row.app_ack.encode("utf-8")
            control = _control_id(row.app_ack)
            try:
                # The sender may answer our ACK with an accept ACK of its own, or say nothing:
                # both mean it was delivered; a closed connection means it was not.
                await client.send(payload, control, timeout=1.0)
            except AckMismatch as exc:
                if "closed" in str(exc):
                    break
            except OSError:
                break
            sent.append(row.id)
    return sent


def _control_id(ack: str) -> bytes:
    msh = ack.split("\r", 1)[0]
    fields = msh.split(msh[3]) if len(msh) > 3 else []
    return fields[9].encode() if len(fields) > 9 else b""
