"""The vendor API over patients: identity lookup, the timeline, outreach touches.

* ``GET /patients?identifier=system|value`` (``timeline.read``): the patient and its
  identifiers.
* ``GET /patients/{id}/timeline`` (``timeline.read``): newest first; ``since``, ``until``,
  ``kind``, ``status``; keyset paging with ``cursor`` and ``limit``. ``Accept:
  application/fhir+json`` gives a FHIR searchset Bundle of the entries' resources with a
  ``next`` link, and OperationOutcome errors.
* ``GET /patients/{id}/outreach`` (``outreach.read``): touches (scheduled, sent, skipped,
  cancelled...) with their reasons, newest first; ``status`` filter, ``cursor`` paging.

A merged patient's id is resolved to its survivor (no redirect: the answer carries the
survivor's ``patient_id`` and a ``Content-Location``). Every read of patient data writes an
``audit_events`` row (client, action, patient, time) before the answer leaves: access to PHI
must be accountable, so a read that cannot be audited fails (503).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from integration.api import ApiError, require_scope
from integration.clients import Client
from integration.db import write_lock
from integration.identity import find_by_identifier, patient_summary, resolve_id
from integration.models import audit_events
from integration.outreach.views import list_touches
from integration.runtime import Runtime
from integration.timeline import KINDS, Cursor, CursorError, TimelineQuery, read_page
from integration.timeline.facts import parse_fhir_time

__all__ = ["FHIR_JSON", "router"]

FHIR_JSON = "application/fhir+json"
_TIMELINE_KINDS = frozenset(KINDS.values())
_FHIR_ISSUE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
               413: "too-costly", 503: "transient"}


def _wants_fhir(request: Request) -> bool:
    return FHIR_JSON in request.headers.get("accept", "")


def _outcome(status: int, code: str, message: str, headers: dict[str, str] | None) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": _FHIR_ISSUE.get(status, "exception"),
                "details": {
                    "coding": [{"system": "urn:careloop:error", "code": code}],
                    "text": message,
                },
                "diagnostics": message,
            }
        ],
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=FHIR_JSON)


class _PatientRoute(APIRoute):
    """Errors as ``{"code", "message"}``, or OperationOutcome when FHIR was asked for; bad
    query parameters are a 400 with the parameter named, not FastAPI's 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
                error = ApiError(400, "bad_request", f"{where}: {first.get('msg', 'invalid')}")
            except ApiError as exc:
                error = exc
            if _wants_fhir(request):
                return _outcome(error.status, error.code, error.message, error.headers)
            return JSONResponse({"code": error.code, "message": error.message},
                                status_code=error.status, headers=error.headers)

        return route


router = APIRouter(tags=["patients"], route_class=_PatientRoute)

TimelineReader = Annotated[Client, Depends(require_scope("timeline.read"))]
OutreachReader = Annotated[Client, Depends(require_scope("outreach.read"))]


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _audit(engine: Engine, client: Client, action: str, patient_id: str, detail: Any) -> None:
    try:
        with write_lock(engine), engine.begin() as conn:
            conn.execute(
                insert(audit_events).values(
                    at=datetime.now(UTC),
                    actor=client.client_id,
                    action=action,
                    target_type="Patient",
                    target_id=patient_id,
                    detail=detail,
                )
            )
    except SQLAlchemyError:
        raise ApiError(503, "unavailable", "the read could not be audited; try again",
                       {"Retry-After": "5"}) from None


def _survivor(engine: Engine, patient_id: str) -> str:
    if len(patient_id) > 64:
        raise ApiError(404, "patient_not_found", "no patient with this id")
    with engine.connect() as conn:
        survivor = resolve_id(conn, patient_id)
    if survivor is None:
        raise ApiError(404, "patient_not_found", "no patient with this id")
    return survivor


def _time_param(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = parse_fhir_time(value)
    if parsed is None:
        raise ApiError(400, "bad_request", f"{name}: {value!r} is not a date or date-time")
    return parsed


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for raw in values or [] for v in raw.split(",") if v.strip()]


@router.get(
    "/patients",
    responses={404: {"description": "no patient has this identifier"}},
)
def find_patient(
    request: Request,
    client: TimelineReader,
    identifier: Annotated[str, Query(max_length=800, description="system|value")],
) -> JSONResponse:
    """The patient an identifier names (a merged patient's identifiers name the survivor),
    with every identifier linked to it and the merges it absorbed."""
    system, sep, value = identifier.partition("|")
    if not sep or not system or not value:
        raise ApiError(400, "bad_request", "identifier must be system|value")
    engine = _runtime(request).engine
    with engine.connect() as conn:
        found = find_by_identifier(conn, system, value)
        if found is None:
            raise ApiError(404, "patient_not_found", "no patient has this identifier")
        body = patient_summary(conn, found)
    _audit(engine, client, "patient.read", found, {"by": "identifier"})
    return JSONResponse(body)


@router.get(
    "/patients/{patient_id}/timeline",
    responses={
        200: {"description": "entries newest first; a FHIR searchset Bundle with "
                             "Accept: application/fhir+json"},
        404: {"description": "no such patient"},
    },
)
def timeline(
    *,
    request: Request,
    client: TimelineReader,
    patient_id: str,
    since: Annotated[str | None, Query(max_length=40, description="time >= since")] = None,
    until: Annotated[str | None, Query(max_length=40, description="time < until")] = None,
    kind: Annotated[list[str] | None, Query(max_length=200)] = None,
    status: Annotated[list[str] | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    """The patient's timeline, newest first, one entry per real-world thing."""
    runtime = _runtime(request)
    survivor = _survivor(runtime.engine, patient_id)
    kinds = _split(kind)
    unknown = sorted(set(kinds) - _TIMELINE_KINDS)
    if unknown:
        raise ApiError(400, "bad_request",
                       f"kind: {unknown[0]!r} is not one of {', '.join(sorted(_TIMELINE_KINDS))}")
    try:
        after = Cursor.decode(cursor, survivor) if cursor else None
    except CursorError as exc:
        raise ApiError(400, "bad_cursor", str(exc)) from None
    query = TimelineQuery(
        patient_id=survivor,
        since=_time_param("since", since),
        until=_time_param("until", until),
        kinds=kinds,
        statuses=_split(status),
        limit=limit,
        after=after,
    )
    with runtime.engine.connect() as conn:
        page = read_page(conn, query)
    _audit(runtime.engine, client, "timeline.read", survivor,
           {"entries": len(page.items), "requested_id": patient_id})
    next_cursor = page.next.encode(survivor) if page.next else None
    headers = {"Content-Location": f"/patients/{survivor}/timeline"}
    base = runtime.settings.base_url.rstrip("/")
    if _wants_fhir(request):
        return JSONResponse(
            _bundle(base, request, survivor, page.items, next_cursor),
            media_type=FHIR_JSON, headers=headers,
        )
    return JSONResponse(
        {
            "patient_id": survivor,
            "items": page.items,
            "next_cursor": next_cursor,
            "next": _link(base, request, survivor, next_cursor) if next_cursor else None,
        },
        headers=headers,
    )


def _link(base: str, request: Request, patient_id: str, cursor: str | None) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    if cursor:
        params.append(("cursor", cursor))
    query = urlencode(params)
    return f"{base}/patients/{patient_id}/timeline" + (f"?{query}" if query else "")


def _full_url(resource: dict[str, Any], entry_id: str) -> str:
    try:
        return f"urn:uuid:{uuid.UUID(str(resource.get('id')))}"
    except ValueError:
        return f"urn:uuid:{uuid.UUID(hex=entry_id)}"


def _bundle(
    base: str, request: Request, patient_id: str, items: list[dict[str, Any]],
    next_cursor: str | None,
) -> dict[str, Any]:
    links = [{"relation": "self", "url": _link(base, request, patient_id,
                                               request.query_params.get("cursor"))}]
    if next_cursor:
        links.append({"relation": "next", "url": _link(base, request, patient_id, next_cursor)})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "link": links,
        "entry": [
            {
                "fullUrl": _full_url(item["resource"], item["id"]),
                "resource": item["resource"],
                "search": {"mode": "match"},
            }
            for item in items
        ],
    }


_TOUCH_STATUSES = frozenset({"scheduled", "sending", "sent", "cancelled", "skipped", "failed"})


@router.get("/patients/{patient_id}/outreach", responses={404: {"description": "no such patient"}})
def outreach(
    *,
    request: Request,
    client: OutreachReader,
    patient_id: str,
    status: Annotated[list[str] | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> JSONResponse:
    """The patient's touches, newest first: scheduled, sent, skipped and cancelled, each with
    its pathway, step, entry, due time, channel, language and the reason it was moved, skipped
    or cancelled. ``status`` filters (repeat or comma-separate); ``cursor`` pages."""
    runtime = _runtime(request)
    survivor = _survivor(runtime.engine, patient_id)
    statuses = _split(status)
    unknown = sorted(set(statuses) - _TOUCH_STATUSES)
    if unknown:
        raise ApiError(400, "bad_request",
                       f"status: {unknown[0]!r} is not one of {', '.join(sorted(_TOUCH_STATUSES))}")
    before = None
    if cursor is not None:
        if not cursor.isdigit():
            raise ApiError(400, "bad_cursor", "cursor: not a cursor from a previous page")
        before = int(cursor)
    with runtime.engine.connect() as conn:
        items, next_id = list_touches(conn, survivor, limit=limit, before=before,
                                      statuses=statuses or None)
    _audit(runtime.engine, client, "outreach.read", survivor,
           {"touches": len(items), "requested_id": patient_id})
    return JSONResponse(
        {"patient_id": survivor, "items": items,
         "next_cursor": str(next_id) if next_id is not None else None},
        headers={"Content-Location": f"/patients/{survivor}/outreach"},
    )
