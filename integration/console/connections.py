"""EHR connections: per connection and resource type, subscription status, last event number, last
heartbeat, catch-up in progress, last error, token expiry.
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
