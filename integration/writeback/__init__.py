"""The write-back outbox: every touch, reply and patient request on record in the EHR.

* :mod:`~integration.writeback.outbox`: :func:`enqueue` and the builders that owe the EHR a
  write (:func:`enqueue_touch`, :func:`enqueue_reply`, :func:`enqueue_request`), called in the
  transaction that records the fact.
* :mod:`~integration.writeback.resources`: the Communication, AppointmentResponse and Task
  resources, as data.
* :mod:`~integration.writeback.references`: how the EHR knows the patient and the entry.
* :mod:`~integration.writeback.flusher`: :func:`flush` writes due rows (conditional creates in
  batch Bundles, Appointment updates with ``If-Match``), :func:`replay` retries failed ones.
* :mod:`~integration.writeback.stage`: :class:`WritebackStage`, the flusher on a thread and
  event loop of its own.

See ``docs/writeback.md``.
"""

from integration.writeback.flusher import FlushResult, flush, replay
from integration.writeback.outbox import (
    WRITEBACK_SYSTEM,
    enqueue,
    enqueue_reply,
    enqueue_request,
    enqueue_touch,
    touch_key_of,
)
from integration.writeback.references import entry_reference, patient_reference
from integration.writeback.stage import WritebackStage

__all__ = [
    "WRITEBACK_SYSTEM",
    "FlushResult",
    "WritebackStage",
    "enqueue",
    "enqueue_reply",
    "enqueue_request",
    "enqueue_touch",
    "entry_reference",
    "flush",
    "patient_reference",
    "replay",
    "touch_key_of",
]
