"""Every console router, in one place for :func:`integration.api.create_app`."""

from __future__ import annotations

from fastapi import APIRouter

from integration.console import (
    audit_log,
    connections,
    messages,
    oidc,
    outbox,
    outreach,
    pages,
    patients,
    senders,
)

__all__ = ["router"]

router = APIRouter(include_in_schema=False)
for _module in (pages, oidc, messages, senders, connections, patients, outreach, outbox,
                audit_log):
    router.include_router(_module.router)
