"""An in-memory FHIRApi for flow tests: answers by a handler, records every request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from adapters.fhir import FHIRRequest, FHIRResponse, next_link

Handler = Callable[[FHIRRequest, dict[str, str]], Any]


class FakeApi:
    """``handler(request, params)`` returns a JSON body (200), an FHIRResponse, or raises."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[FHIRRequest] = []

    async def send(self, request: FHIRRequest) -> FHIRResponse:
        self.requests.append(request)
        split = urlsplit(request.path)
        params = dict(parse_qsl(split.query))
        params.update(dict(request.params))
        result = self.handler(request, params)
        if isinstance(result, FHIRResponse):
            return result
        return FHIRResponse(200, result, {}, request.path)

    async def pages(self, request: FHIRRequest) -> AsyncIterator[dict[str, Any]]:
        while True:
            bundle = (await self.send(request)).body
            yield bundle
            link = next_link(bundle)
            if not link:
                return
            request = FHIRRequest.get(link)


def searchset(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                           "entry": [{"resource": r, "search": {"mode": "match"}}
                                     for r in resources]}
    if next_url:
        out["link"] = [{"relation": "next", "url": next_url}]
    return out


def appt(rid: str, updated: str, version: str = "1", status: str = "booked") -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": rid, "status": status,
            "meta": {"versionId": version, "lastUpdated": updated}}
