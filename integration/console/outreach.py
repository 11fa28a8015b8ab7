"""Outreach: touches due, sent, delivered, failed and suppressed with the reason."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
