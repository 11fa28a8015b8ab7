"""Senders: the HL7 senders careloop knows (settings file and console), and the form that registers
or changes one (admin).
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
