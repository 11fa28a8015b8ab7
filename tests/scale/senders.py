"""Interface engines for the scale test: several senders over MLLP and HTTP, spread over the
``careloop serve`` replicas, that behave as an engine must.

* A message is sent, its acknowledgement awaited (MSA-2 must echo its MSH-10) and only then is
  it done. A message that gets no answer (connection refused or cut, timeout, an ``AR``/``CE``
  "not stored", HTTP 503) is **un-ACKed**: the sender resends it, to the other replica first,
  until some replica acknowledges it.
* Redeliveries: a fraction of the acknowledged messages is sent again, same bytes and MSH-10,
  to the *other* replica: half at once (racing the first copy's processing), half at the end
  of the phase. Each must be answered AA and must not be processed again.

Everything is recorded in a :class:`Ledger` per message, for the test's final checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from adapters.mllp import AckMismatch, MLLPClient
from tests.scale.cluster import HOST, Replica
from tests.scale.workload import Message

__all__ = ["Ledger", "Load", "Record"]

_GOOD = frozenset({"AA", "CA"})
_STORED = frozenset({"AA", "CA", "AE", "CE"})  # an answer that says the message is stored


class LinkError(Exception):
    """No usable answer: the message may or may not be stored; send it again."""


def _msa(ack: bytes) -> tuple[str, str]:
    text = ack.decode("latin-1").replace("\n", "\r")
    for line in text.split("\r"):
        segment = line.lstrip("\x0b")
        if segment.startswith("MSA"):
            fields = segment.split(segment[3])
            return (fields[1] if len(fields) > 1 else "",
                    fields[2] if len(fields) > 2 else "")
    return "", ""


@dataclass
class Record:
    """What happened to one message."""

    message: Message
    acks: list[tuple[str, str, str]] = field(default_factory=list)
    """(MSA-1, replica, transport) of every answer that said "stored", first send first."""
    unacked: int = 0
    """Sends that got no usable answer (and were resent)."""
    redeliveries: int = 0
    """Redeliveries that were answered."""

    @property
    def acked(self) -> bool:
        return bool(self.acks)


class Ledger:
    def __init__(self, messages: Sequence[Message]) -> None:
        self.records = [Record(m) for m in messages]
        self.codes: Counter[str] = Counter()
        self.failovers = 0
        self.first_acks = 0
        """Messages acknowledged so far (redeliveries not counted)."""

    def summary(self) -> dict[str, int]:
        return {
            "messages": len(self.records),
            "acked": sum(1 for r in self.records if r.acked),
            "unacked_sends": sum(r.unacked for r in self.records),
            "redeliveries": sum(r.redeliveries for r in self.records),
            "failovers": self.failovers,
            **{f"code_{k}": v for k, v in sorted(self.codes.items())},
        }


class _Link:
    """One connection to one replica, over MLLP or HTTP; reconnects lazily after an error."""

    def __init__(self, replica: Replica, transport: str, timeout: float) -> None:
        self.replica = replica
        self.transport = transport
        self.timeout = timeout
        self._mllp: MLLPClient | None = None
        self._http: httpx.AsyncClient | None = None

    async def send(self, message: Message) -> str:
        """MSA-1 of the answer; LinkError when there is none that can be trusted."""
        try:
            if self.transport == "mllp":
                if self._mllp is None:
                    self._mllp = await MLLPClient.connect(HOST, self.replica.mllp_port,
                                                          timeout=2.0)
                ack = await self._mllp.send(message.raw, message.control_id.encode(),
                                            timeout=self.timeout)
            else:
                if self._http is None:
                    self._http = httpx.AsyncClient(base_url=self.replica.http_url,
                                                   timeout=self.timeout)
                response = await self._http.post(
                    "/hl7v2", content=message.raw,
                    headers={"Content-Type": "application/hl7-v2"})
                if response.status_code == 503:
                    raise LinkError("503: not stored")
                ack = response.content
        except (OSError, TimeoutError, AckMismatch, httpx.HTTPError, LinkError) as exc:
            await self.close()
            raise LinkError(f"{type(exc).__name__}: {exc}") from None
        code, control = _msa(ack)
        if control != message.control_id:
            await self.close()
            raise LinkError(f"ACK for {control!r} while waiting for {message.control_id!r}")
        return code

    async def close(self) -> None:
        if self._mllp is not None:
            with contextlib.suppress(Exception):
                await self._mllp.close()
            self._mllp = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.aclose()
            self._http = None


class Load:
    """The senders. ``await load.send(indices)`` returns once every one of those messages is
    acknowledged (and the phase's deferred redeliveries are done)."""

    def __init__(self, ledger: Ledger, replicas: Sequence[Replica], *, mllp_per_replica: int = 3,
                 http_per_replica: int = 1, redeliver: float = 0.05, seed: int = 7,
                 ack_timeout: float = 30.0) -> None:
        if len(replicas) < 2:
            raise ValueError("redeliveries and failover need two replicas")
        self.ledger = ledger
        self.replicas = list(replicas)
        self.plan = [(home, transport)
                     for home in range(len(replicas))
                     for transport in ["mllp"] * mllp_per_replica + ["http"] * http_per_replica]
        self.redeliver = redeliver
        self.rng = random.Random(seed)
        self.ack_timeout = ack_timeout
        self.started_at = time.monotonic()

    async def send(self, indices: Sequence[int]) -> None:
        todo: deque[int] = deque(indices)
        later: deque[tuple[int, int]] = deque()  # (index, replica) deferred redeliveries
        await asyncio.gather(*(self._sender(home, transport, todo, later)
                               for home, transport in self.plan))
        await asyncio.gather(*(self._redeliverer(transport, later)
                               for _, transport in self.plan))

    async def _sender(self, home: int, transport: str, todo: deque[int],
                      later: deque[tuple[int, int]]) -> None:
        links = [_Link(r, transport, self.ack_timeout) for r in self.replicas]
        target = home
        last_home_try = time.monotonic()
        try:
            while todo:
                index = todo.popleft()
                if target != home and time.monotonic() - last_home_try > 3.0:
                    target, last_home_try = home, time.monotonic()  # back home when it is up
                target = await self._deliver(index, links, target)
                if self.rng.random() < self.redeliver:
                    other = (target + 1) % len(links)  # target answered: the other one redelivers
                    if self.rng.random() < 0.5:
                        await self._redeliver(index, links[other])
                    else:
                        later.append((index, other))
        finally:
            for link in links:
                await link.close()

    async def _deliver(self, index: int, links: list[_Link], target: int) -> int:
        """Send until some replica says "stored"; returns the replica that did."""
        record = self.ledger.records[index]
        backoff = 0.05
        while True:
            link = links[target]
            try:
                code = await link.send(record.message)
            except LinkError:
                code = ""
            self.ledger.codes[code or "none"] += 1
            if code in _STORED:
                record.acks.append((code, link.replica.name, link.transport))
                self.ledger.first_acks += 1
                return target
            record.unacked += 1
            self.ledger.failovers += 1
            target = (target + 1) % len(links)  # resend to the other replica
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)

    async def _redeliver(self, index: int, link: _Link) -> None:
        record = self.ledger.records[index]
        try:
            code = await link.send(record.message)
        except LinkError:
            return  # a redelivery that got no answer is only a lost duplicate
        self.ledger.codes[f"redelivery_{code}"] += 1
        if code in _STORED:
            record.redeliveries += 1
            record.acks.append((code, link.replica.name, link.transport))

    async def _redeliverer(self, transport: str, later: deque[tuple[int, int]]) -> None:
        links = [_Link(r, transport, self.ack_timeout) for r in self.replicas]
        try:
            while later:
                index, replica = later.popleft()
                await self._redeliver(index, links[replica])
        finally:
            for link in links:
                await link.close()
