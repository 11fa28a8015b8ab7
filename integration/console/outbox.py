"""Write-back: the EHR outbox by status, rejected rows with the EHR's answer, retry (operator)."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
