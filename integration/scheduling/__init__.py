"""Rebooking into a free slot: the EHR's Schedules and Slots searched for an appointment, and a
chosen slot booked (``Appointment/$book``, one transaction Bundle, or ordered conditional
writes) with the old appointment cancelled; the timeline, the outreach plan and the write-back
follow at once.

* :mod:`~integration.scheduling.slots`: the searches and what to read from Slots and Schedules
  (:class:`FreeSlot`), as data.
* :mod:`~integration.scheduling.booking`: the three ways to book against a FHIR server
  (:class:`BookingOutcome`).
* :mod:`~integration.scheduling.service`: :class:`SchedulingService`, with the database.
"""

from integration.scheduling.booking import BOOKING_SYSTEM, BookingOutcome
from integration.scheduling.service import SchedulingService
from integration.scheduling.slots import Capabilities, FreeSlot

__all__ = [
    "BOOKING_SYSTEM",
    "BookingOutcome",
    "Capabilities",
    "FreeSlot",
    "SchedulingService",
]
