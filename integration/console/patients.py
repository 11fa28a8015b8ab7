"""Patients: find a patient by id or identifier and see the timeline (PHI only, every view
audited).
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
