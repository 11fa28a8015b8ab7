"""Prometheus metrics (served at ``/metrics``). Labels carry types and codes, never PHI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ACK_LATENCY", "DUPLICATES", "MESSAGES", "PROCESSED", "register_queue_collector"]

MESSAGES = Counter(
    "careloop_messages_total",
    "HL7 v2 messages received, by source, message type and acknowledgement code.",
    ["source", "message_type", "ack_code"],
)
DUPLICATES = Counter(
    "careloop_duplicates_total",
    "Redelivered messages (same sender and MSH-10) acknowledged without processing.",
    ["source"],
)
ACK_LATENCY = Histogram(
    "careloop_ack_latency_seconds",
    "Time from a message being read to its acknowledgement being ready (includes the commit).",
    ["source"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PROCESSED = Counter(
    "careloop_processed_total",
    "Inbox rows that left the processing stage, by outcome.",
    ["stage", "outcome"],
)


class _QueueCollector(Collector):
    def __init__(self, depth: Callable[[], dict[str, tuple[int, float]]]) -> None:
        self._depth = depth

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "careloop_queue_depth", "Rows waiting in each stage.", labels=["stage"]
        )
        age = GaugeMetricFamily(
            "careloop_queue_oldest_age_seconds",
            "Age of the oldest row waiting in each stage.",
            labels=["stage"],
        )
        try:
            values = self._depth()
        except Exception:  # a scrape must not fail because the database is briefly away
            values = {}
        for stage, (count, oldest) in values.items():
            depth.add_metric([stage], count)
            age.add_metric([stage], oldest)
        yield depth
        yield age


_registered: list[_QueueCollector] = []


def register_queue_collector(depth: Callable[[], dict[str, tuple[int, float]]]) -> None:
    """Report queue depth from ``depth()`` on each scrape (re-registering replaces it)."""
    for old in _registered:
        REGISTRY.unregister(old)
    _registered.clear()
    collector = _QueueCollector(depth)
    REGISTRY.register(collector)
    _registered.append(collector)
