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


# --- outcomes (issue 11): what outreach sent and what patients did -------------------------
# Labels come from small fixed sets (and pathway names from the configuration); anything else
# is reported as "other", so that no caller can put an address, a name or an id in a label.

TOUCHES = Counter(
    "careloop_touches_total",
    "Touches that reached a final state, by pathway, channel and status.",
    ["pathway", "channel", "status"],
)
REPLIES = Counter(
    "careloop_replies_total",
    "Patient replies and patient-page actions, by channel and what they meant.",
    ["channel", "intent"],
)
PATIENT_REQUESTS = Counter(
    "careloop_patient_requests_total",
    "Requests patients made (confirm, cancel, reschedule, survey), by action and source.",
    ["action", "source"],
)
BOOKINGS = Counter(
    "careloop_bookings_total",
    "Slot bookings that finished, by source (portal | waitlist) and status.",
    ["source", "status"],
)
WAITLIST_OFFERS = Counter(
    "careloop_waitlist_offers_total",
    "Waitlist offers made (offered) and answered or ended, by status.",
    ["status"],
)

OTHER = "other"
CHANNEL_LABELS = frozenset({"sms", "email", "voice", "portal"})
TOUCH_STATUSES = frozenset({"sent", "failed", "skipped", "cancelled"})
INTENTS = frozenset({"confirm", "cancel", "reschedule", "survey", "preferences", "opt-out",
                     "opt-in", "help", "repeat", "unknown"})
REQUEST_ACTIONS = frozenset({"confirm", "cancel", "reschedule", "survey"})
BOOKING_SOURCES = frozenset({"portal", "waitlist"})
BOOKING_STATUSES = frozenset({"pending", "booked", "conflict", "failed"})
OFFER_STATUSES = frozenset({"offered", "accepted", "declined", "expired", "taken"})
_PATHWAY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")

__all__ += [  # this section's names
    "BOOKINGS",
    "PATIENT_REQUESTS",
    "REPLIES",
    "TOUCHES",
    "WAITLIST_OFFERS",
    "count_booking",
    "count_patient_request",
    "count_reply",
    "count_touch",
    "count_waitlist_offer",
]


def _one_of(value: object, allowed: frozenset[str]) -> str:
    text = str(getattr(value, "value", value) or "")
    return text if text in allowed else OTHER


def _pathway(name: object) -> str:
    # Pathway names are configuration ([[pathways]] name: lower case, digits, - and _).
    text = str(name or "")
    ok = (0 < len(text) <= 63 and set(text) <= _PATHWAY_CHARS and text[0] not in "-_"
          and not text.isdigit())
    return text if ok else OTHER


def count_touch(pathway: str, channel: str, status: str, n: int = 1) -> None:
    """A touch became ``sent``, ``failed``, ``skipped`` or ``cancelled`` (after the commit)."""
    if n > 0:
        TOUCHES.labels(_pathway(pathway), _one_of(channel, CHANNEL_LABELS),
                       _one_of(status, TOUCH_STATUSES)).inc(n)


def count_reply(channel: str, intent: object) -> None:
    """An inbound message or a patient-page action was handled (``intent``: an
    :class:`integration.replies.keywords.Intent` or its value, or a page action)."""
    REPLIES.labels(_one_of(channel, CHANNEL_LABELS), _one_of(intent, INTENTS)).inc()


def count_patient_request(action: str, source: str) -> None:
    """A new ``patient_requests`` row was committed."""
    PATIENT_REQUESTS.labels(_one_of(action, REQUEST_ACTIONS),
                            _one_of(source, CHANNEL_LABELS)).inc()


def count_booking(source: str, status: str) -> None:
    """A booking attempt ended (``booked``, ``conflict``, ``failed``) or started (``pending``)."""
    BOOKINGS.labels(_one_of(source, BOOKING_SOURCES), _one_of(status, BOOKING_STATUSES)).inc()


def count_waitlist_offer(status: str, n: int = 1) -> None:
    """Offers made (``offered``) or answered or ended (the other statuses)."""
    if n > 0:
        WAITLIST_OFFERS.labels(_one_of(status, OFFER_STATUSES)).inc(n)


# --- the write-back outbox and the EHR subscriptions (operations) --------------------------

WRITEBACK = Counter(
    "careloop_writeback_total",
    "Write-back rows that left a flush, by resource type and outcome (written | failed | "
    "retry).",
    ["resource_type", "status"],
)
_WRITEBACK_TYPES = frozenset({"Communication", "AppointmentResponse", "Task", "Appointment",
                              "Slot"})
_WRITEBACK_STATUSES = frozenset({"written", "failed", "retry"})


def count_writeback(resource_type: str, status: str, n: int = 1) -> None:
    WRITEBACK.labels(_one_of(resource_type, _WRITEBACK_TYPES),
                     _one_of(status, _WRITEBACK_STATUSES)).inc(n)


class _SubscriptionCollector(Collector):
    """Seconds since each FHIR subscription last heard from its EHR (a notification or a
    heartbeat), and its heartbeat period: an alert compares the two."""

    def __init__(self, ages: Callable[[], list[tuple[str, str, float | None, float]]]) -> None:
        self._ages = ages

    def collect(self) -> Iterator[Any]:
        silent = GaugeMetricFamily(
            "careloop_subscription_silence_seconds",
            "Seconds since the EHR last sent a notification or heartbeat for a subscription.",
            labels=["connection", "resource_type"])
        period = GaugeMetricFamily(
            "careloop_subscription_heartbeat_seconds",
            "The heartbeat period asked of the EHR (0: none).",
            labels=["connection", "resource_type"])
        try:
            rows = self._ages()
        except Exception:  # a scrape must not fail because the database is briefly away
            rows = []
        for connection, resource_type, age, heartbeat in rows:
            if age is not None:
                silent.add_metric([connection, resource_type], age)
            period.add_metric([connection, resource_type], heartbeat)
        yield silent
        yield period


_subscription_collectors: list[_SubscriptionCollector] = []


def register_subscription_collector(
        ages: Callable[[], list[tuple[str, str, float | None, float]]]) -> None:
    """Report subscription silence from ``ages()`` on each scrape (re-registering replaces
    it): ``(connection, resource type, seconds since last heard or None, heartbeat period)``."""
    for old in _subscription_collectors:
        REGISTRY.unregister(old)
    _subscription_collectors.clear()
    collector = _SubscriptionCollector(ages)
    REGISTRY.register(collector)
    _subscription_collectors.append(collector)


__all__ += ["WRITEBACK", "count_writeback", "register_subscription_collector"]
