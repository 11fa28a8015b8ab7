"""A waitlist offer's page: ``GET /p/{token}`` for an ``o`` link, Accept and No thanks.

The link went to the patient's own address, like a touch link, so it is the credential: no
date of birth here (the page shows only the offered time, service and place, never the
patient's record). Routes, for tokens that start with ``o`` only:

* ``GET  /p/{token}``: the offered slot (:func:`integration.waitlist.offer_view`) with Accept /
  No thanks while the offer stands; what became of it otherwise.
* ``POST /p/{token}/accept``: :func:`integration.waitlist.accept` (the first acceptance wins
  the slot); 303 to the page, which says how it went.
* ``POST /p/{token}/decline``: :func:`integration.waitlist.decline`; 303 likewise.

Every view is put on record (``audit_events``, ``portal.read``); headers as the touch page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from babel.dates import format_date, format_datetime, format_time
from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import SQLAlchemyError
from starlette.convertors import Convertor, register_url_convertor

from integration import waitlist
from integration.db import write_lock
from integration.logs import get_logger
from integration.models import audit_events
from integration.portal.i18n import N_, normalize
from integration.portal.links import PortalLink
from integration.portal.page import (
    SECURITY_HEADERS,
    PortalState,
    _check,
    _fallback_language,
    _message,
    _Refused,
    _render,
    portal_state,
)
from integration.portal.view import _locale, _recipient, page_language

__all__ = ["OFFER_DONE", "OfferToken", "router"]

log = get_logger("careloop.portal")


class OfferToken(Convertor[str]):
    """Path segments that can be an ``o`` link (the signature is checked by the handler)."""

    regex = "o[^/]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("offer_token", OfferToken())

router = APIRouter(include_in_schema=False)

OFFER_DONE = {
    "booked": N_("It's yours. Your appointment is booked for this time, and your earlier "
                 "booking is cancelled."),
    "requested": N_("Thank you. We asked the care team to move your appointment to this time. "
                    "They will confirm it with you."),
    "taken": N_("Sorry, someone else took this time first. You keep your appointment and "
                "stay on the waitlist."),
    "expired": N_("This offer has expired. You keep your appointment and stay on the "
                  "waitlist."),
    "invalid": N_("This offer is no longer valid. You keep your appointment."),
    "declined": N_("You said no thanks to this time. You keep your appointment and stay on "
                   "the waitlist."),
}
"""What the page says after Accept or No thanks (by outcome)."""

STATE_TEXT = {
    "accepted": N_("You accepted this time."),
    "declined": N_("You said no thanks to this time."),
    "expired": N_("This offer has expired. You keep your appointment and stay on the "
                  "waitlist."),
    "taken": N_("Sorry, someone else took this time first. You keep your appointment and "
                "stay on the waitlist."),
}
"""What the page says about an offer that no longer stands (by its status)."""


async def _db(engine: Engine, work: Any) -> Any:
    def run() -> Any:
        with engine.connect() as conn:
            return work(conn)

    return await asyncio.to_thread(run)


def _offer_id(link: PortalLink) -> int | None:
    return int(link.ident) if link.ident.isdigit() and len(link.ident) <= 18 else None


def _aware(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _read(conn: Connection, state: PortalState, offer_id: int,
          override: str | None) -> tuple[Mapping[str, Any], str, Any] | None:
    view = waitlist.offer_view(conn, offer_id)
    if view is None:
        return None
    recipient = _recipient(conn, state.config, str(view["patient_id"]))
    language = page_language(override, view.get("language") or None, recipient.language,
                             state.config.default_language)
    tz = state.config.zone(view.get("timezone")) if view.get("timezone") else recipient.timezone
    return view, language, tz


def _audit(engine: Engine, patient_id: str, offer_id: int, now: datetime) -> None:
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(audit_events).values(
            at=now, actor="portal", action="portal.read", target_type="Patient",
            target_id=patient_id, detail={"link": "o", "offer_id": offer_id}))


async def _open(request: Request, token: str
                ) -> tuple[PortalState, datetime, int] | Response:
    state = await asyncio.to_thread(portal_state, request.app)
    now = state.clock()
    checked = await _check(state, request, token, now)
    if isinstance(checked, _Refused):
        return checked.response
    offer_id = _offer_id(checked) if checked.kind == "o" else None
    if offer_id is None:
        return _message(state, "not-found", _fallback_language(state, request))
    return state, now, offer_id


def _url(state: PortalState, token: str, request: Request, path: str = "",
         **query: str) -> str:
    lang = normalize(request.query_params.get("lang"))
    wanted = {k: v for k, v in query.items() if v}
    if lang in state.languages:
        wanted["lang"] = lang
    base = f"{state.prefix}/p/{token}{path}"
    return f"{base}?{urlencode(wanted)}" if wanted else base


@router.get("/p/{token:offer_token}")
async def show_offer(request: Request, token: str) -> Response:
    opened = await _open(request, token)
    if not isinstance(opened, tuple):
        return opened
    state, now, offer_id = opened
    engine: Engine = request.app.state.runtime.engine
    override = request.query_params.get("lang")
    try:
        found = await _db(engine, lambda conn: _read(conn, state, offer_id, override))
        if found is not None:
            await asyncio.to_thread(_audit, engine, str(found[0]["patient_id"]), offer_id, now)
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _message(state, "busy", _fallback_language(state, request))
    except Exception as exc:
        log.error("portal_failed", exc_type=type(exc).__name__)
        return _message(state, "error", _fallback_language(state, request))
    if found is None:
        return _message(state, "not-found", _fallback_language(state, request))
    view, language, tz = found
    locale = _locale(language)
    start = _aware(view.get("start"))
    end = _aware(view.get("end"))
    expires = _aware(view.get("expires_at"))
    status = str(view.get("status") or "")
    if status == "offered" and expires is not None and expires <= now:
        status = "expired"
    done = request.query_params.get("done", "")
    local = start.astimezone(tz) if start else None
    return _render(
        state, "offer.html", language, 200,
        service=str(view.get("service") or ""), location=str(view.get("location") or ""),
        start=local,
        date_text=format_date(local, "full", locale=locale) if local else "",
        time_text=format_time(local, "short", tzinfo=tz, locale=locale) if local else "",
        end_text=format_time(end, "short", tzinfo=tz, locale=locale) if end else "",
        expires_text=(format_datetime(expires, "short", tzinfo=tz, locale=locale)
                      if expires else ""),
        open=status == "offered", state_text=STATE_TEXT.get(status, ""),
        done=OFFER_DONE.get(done, ""), done_kind=done if done in OFFER_DONE else "",
        accept_url=_url(state, token, request, "/accept"),
        decline_url=_url(state, token, request, "/decline"),
    )


@router.post("/p/{token:offer_token}/{action}")
async def answer_offer(request: Request, token: str, action: str) -> Response:
    opened = await _open(request, token)
    if not isinstance(opened, tuple):
        return opened
    state, now, offer_id = opened
    if action not in ("accept", "decline"):
        return _message(state, "not-found", _fallback_language(state, request))
    runtime = request.app.state.runtime
    try:
        if action == "accept":
            outcome = await waitlist.accept(
                runtime.engine, state.settings, runtime.channels,
                getattr(runtime, "scheduling", None), offer_id=offer_id, now=now)
            status = str(outcome.status)
        else:
            declined = await asyncio.to_thread(waitlist.decline, runtime.engine,
                                               offer_id=offer_id, now=now)
            status = "declined" if declined else ""
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _message(state, "busy", _fallback_language(state, request))
    except Exception as exc:
        log.error("portal_failed", reason=action, exc_type=type(exc).__name__)
        return _message(state, "error", _fallback_language(state, request))
    log.info("portal_offer_answer", reason=action, status=status or "unchanged")
    return RedirectResponse(_url(state, token, request, done=status), status_code=303,
                            headers=SECURITY_HEADERS)


@router.get("/p/{token:offer_token}/{rest:path}")
async def back_to_offer(request: Request, token: str, rest: str) -> Response:
    state = await asyncio.to_thread(portal_state, request.app)
    return RedirectResponse(_url(state, token, request), status_code=303,
                            headers=SECURITY_HEADERS)
