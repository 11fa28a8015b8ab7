"""Messages: the list with filters, a message's detail (raw, ACK, mapped resources, timeline
entries; PHI only, audited), replay of one message or of every failed message of a filter, with
progress.
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
