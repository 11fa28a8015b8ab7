"""Replies: provider webhooks, what patients answer, and what it changes.

* :mod:`~integration.replies.keywords` (pure): SMS keywords in English and Spanish (CTIA
  opt-out and help, C / R / X for appointments) and voice key presses.
* :mod:`~integration.replies.texts`: the answers, in English and Spanish, as SMS or speech.
* :mod:`~integration.replies.matching`: which touch a reply from a number answers.
* :mod:`~integration.replies.effects`: opt-out / opt-in per address, preferences, patient
  requests (confirm, cancel, reschedule, survey) and their effects; shared with the portal.
* :mod:`~integration.replies.webhooks`: ``POST /channels/{channel}/status`` and
  ``/channels/{channel}/inbound`` (Twilio signatures; stored before the 2xx).
* :mod:`~integration.replies.processor`: processes the stored events and sends the answers.
"""

from integration.replies.keywords import Intent, Reply, classify, classify_digits
from integration.replies.processor import (
    Outcome,
    ProcessResult,
    process_event_now,
    process_events,
)

__all__ = [
    "Intent",
    "Outcome",
    "ProcessResult",
    "Reply",
    "classify",
    "classify_digits",
    "process_event_now",
    "process_events",
]
