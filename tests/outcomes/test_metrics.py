"""The outcome counters: names, labels, and no identifier ever in a label."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from integration import metrics
from integration.replies.keywords import Intent


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_touches() -> None:
    before = _value("careloop_touches_total", pathway="appointment-reminder", channel="sms",
                    status="sent")
    metrics.count_touch("appointment-reminder", "sms", "sent")
    metrics.count_touch("appointment-reminder", "sms", "sent", n=2)
    metrics.count_touch("appointment-reminder", "sms", "sent", n=0)
    assert _value("careloop_touches_total", pathway="appointment-reminder", channel="sms",
                  status="sent") == before + 3
    for status in ("failed", "skipped", "cancelled"):
        metrics.count_touch("survey", "email", status)
        assert _value("careloop_touches_total", pathway="survey", channel="email",
                      status=status) >= 1


def test_replies_requests_bookings_offers() -> None:
    before = _value("careloop_replies_total", channel="sms", intent="opt-out")
    metrics.count_reply("sms", Intent.OPT_OUT)
    assert _value("careloop_replies_total", channel="sms", intent="opt-out") == before + 1
    metrics.count_reply("portal", "survey")
    assert _value("careloop_replies_total", channel="portal", intent="survey") >= 1
    metrics.count_patient_request("reschedule", "voice")
    assert _value("careloop_patient_requests_total", action="reschedule", source="voice") >= 1
    metrics.count_booking("waitlist", "conflict")
    assert _value("careloop_bookings_total", source="waitlist", status="conflict") >= 1
    metrics.count_waitlist_offer("offered", n=3)
    assert _value("careloop_waitlist_offers_total", status="offered") >= 3


def test_anything_unexpected_is_other() -> None:
    """A phone number, an email address, a name or an id never becomes a label."""
    metrics.count_touch("+15550100001", "pat@example.org", "Jane Doe")
    metrics.count_touch("0123456789", "sms", "sent")
    metrics.count_reply("+1 555 010 0001", "Jane")
    metrics.count_patient_request("3f2a9c", "jane@example.org")
    metrics.count_booking("Patient/123", "booked")
    metrics.count_waitlist_offer("Jane Doe")
    text = generate_latest().decode()
    for leaked in ("5550100001", "example.org", "Jane", "0123456789", "3f2a9c",
                   "Patient/123"):
        assert leaked not in text
    assert _value("careloop_touches_total", pathway="other", channel="other",
                  status="other") >= 1
    assert _value("careloop_waitlist_offers_total", status="other") >= 1
    for name in ("careloop_touches_total", "careloop_replies_total",
                 "careloop_patient_requests_total", "careloop_bookings_total",
                 "careloop_waitlist_offers_total"):
        assert f"# TYPE {name} counter" in text
