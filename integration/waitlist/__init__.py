"""Waitlist backfill: patients ask for an earlier slot of the same service; a cancellation
(SIU S15, a FHIR Appointment change, a rebooking) frees a slot; the waitlisted patients who fit
get an offer in waves, the first to accept gets it, the others are told it was taken.

* :mod:`~integration.waitlist.entries`: join, withdraw, the patient's active entries.
* :mod:`~integration.waitlist.freed`: freed slots, and the timeline consumer that finds
  cancellations (cursor ``waitlist``).
* :mod:`~integration.waitlist.offers`: offer rounds, accept (the race), decline, the offer's
  page view.
* :mod:`~integration.waitlist.texts`: what patients are told, in English and Spanish.
* :mod:`~integration.waitlist.stage`: :class:`WaitlistStage`, the loop on a thread.
"""

from integration.waitlist.entries import active_for, join, withdraw
from integration.waitlist.freed import consume_cancellations, freed_key, slot_freed
from integration.waitlist.offers import (
    AcceptOutcome,
    OfferRound,
    Rebooker,
    accept,
    decline,
    offer_round,
    offer_view,
)
from integration.waitlist.stage import WaitlistStage

__all__ = [
    "AcceptOutcome",
    "OfferRound",
    "Rebooker",
    "WaitlistStage",
    "accept",
    "active_for",
    "consume_cancellations",
    "decline",
    "freed_key",
    "join",
    "offer_round",
    "offer_view",
    "slot_freed",
    "withdraw",
]
