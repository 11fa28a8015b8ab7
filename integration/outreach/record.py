"""The write-back hook outreach calls when a touch's outcome is final.

Outreach does not know the EHR: the runtime gives the reconciler and the sender a
:data:`Recorder`, called inside the transaction that gives touches a final status (sent, failed,
held back for good, skipped for a reason) with their ids, so the write-back row commits with
the status or not at all (see :mod:`integration.writeback`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import Connection

__all__ = ["Recorder"]

Recorder = Callable[[Connection, Sequence[int], datetime], None]
