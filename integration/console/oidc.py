"""OpenID Connect sign-in against the hospital's identity provider, when configured."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(include_in_schema=False, tags=["console"])
