"""Audit log: who did what and saw whom, filtered by actor, action and time."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
