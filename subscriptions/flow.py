"""Plans as generators: a flow yields :class:`~adapters.fhir.FHIRRequest`s, receives each
:class:`~adapters.fhir.FHIRResponse` (or has the request's :class:`~adapters.fhir.FHIRError`
thrown into it) and finally returns its result, the way ``httpx.Auth.auth_flow`` does.

The flows decide (which ``$events`` range, which search, when to stop paging, what to fall
back to); :func:`run_flow` executes them against any :class:`~adapters.fhir.FHIRApi`, and tests
drive them by hand with canned responses.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

from adapters.fhir import FHIRApi, FHIRError, FHIRRequest, FHIRResponse

__all__ = ["Flow", "run_flow"]

T = TypeVar("T")
Flow = Generator[FHIRRequest, FHIRResponse, T]


async def run_flow(flow: Flow[T], api: FHIRApi) -> T:
    """Execute ``flow`` with ``api.send``; FHIR errors go back into the flow, which may handle
    them (fall back) or let them propagate."""
    try:
        request = next(flow)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    while True:
        try:
            response = await api.send(request)
        except FHIRError as exc:
            try:
                request = flow.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            continue
        try:
            request = flow.send(response)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
