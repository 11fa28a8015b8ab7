"""The patient's own page over HTTP: ``GET /p/{token}`` for a ``p`` link, and its actions.

A ``p`` link (``careloop portal link``, or "See everything for you" on a touch page) names a
patient. Before anything about them is shown, the date-of-birth form
(:mod:`integration.portal.session`: counted, locked after too many wrong answers); then a
session cookie keeps the page open while it is used. What the page shows comes from the
timeline (:mod:`integration.portal.home_view`).

Routes (all under the link's token; only tokens that start with ``p`` reach this router, the
touch page's :mod:`integration.portal.page` keeps the others):

* ``GET  /p/{token}``: the date-of-birth form, or the page once it was given.
* ``POST /p/{token}/dob``: the answer; right: the session cookie and 303 to the page.
* ``POST /p/{token}/appointments/{entry}/{confirm|cancel|reschedule|waitlist|leave-waitlist}``
* ``POST /p/{token}/preferences``
* ``GET  /p/{token}/appointments/{entry}/slots?from=YYYY-MM-DD``: free slots (connections
  with ``scheduling = "slots"``), a few days at a time; ``POST`` books the one chosen.
* ``GET  /p/{token}/bookings/{id}``: the booking's confirmation.

Every POST needs the session and the form's CSRF token (else a 403 page, nothing stored), and
is answered Post/Redirect/Get like the touch page. Each action is stored once per form
(a ``channel_events`` row, kind ``portal``, provider id
``p<patient>:<entry>:<action>:<form hash>``). Every page shown is put on record
(``audit_events``, actor ``portal``, action ``portal.read``). Same headers as the touch page.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any
from urllib.parse import urlencode, urlsplit

from babel.dates import format_date, format_time, get_month_names
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.convertors import Convertor, register_url_convertor

from integration import waitlist
from integration.db import dialect_insert, write_lock
from integration.logs import get_logger
from integration.models import audit_events, bookings, channel_events, timeline_entries
from integration.outreach.sender import _display, _location
from integration.portal.home_view import (
    HOME_DONE,
    HomeAppointment,
    HomePage,
    birth_date,
    home_appointment,
    load_home,
    patient_ids,
    scheduling_mode,
    survivor,
)
from integration.portal.i18n import N_, language_name, normalize
from integration.portal.links import PortalLink, load_secret
from integration.portal.page import (
    MAX_PREFERRED,
    SECURITY_HEADERS,
    PortalState,
    _check,
    _fallback_language,
    _form_hash,
    _Invalid,
    _read_form,
    _Refused,
    _render,
    portal_state,
    validate,
)
from integration.portal.page import (
    _message as _page_message,
)
from integration.portal.session import (
    COOKIE,
    Session,
    SessionKeeper,
    access,
    normal_date,
    token_hash,
    verify_birth_date,
)
from integration.portal.view import (
    CHANNEL_LABELS,
    DONE_MESSAGES,
    OPT_OUT_LABELS,
    STATUS_LABELS,
    _locale,
    _recipient,
    page_language,
)
from integration.replies.effects import record_request, set_preferences

__all__ = ["HOME_ACTIONS", "PatientToken", "router"]

log = get_logger("careloop.portal")

HOME_ACTIONS = ("confirm", "cancel", "reschedule", "waitlist", "leave-waitlist")
_REQUEST_ACTIONS = ("confirm", "cancel", "reschedule")
_MAX_AHEAD = 365


class PatientToken(Convertor[str]):
    """Path segments that can be a ``p`` link (the signature is checked by the handler)."""

    regex = "p[^/]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("patient_token", PatientToken())

router = APIRouter(include_in_schema=False)

_TEXT = {
    "locked-title": N_("This link is locked"),
    "locked": N_("For your safety, this link no longer opens the page after too many tries "
                 "with a date of birth that did not match."),
    "forbidden-title": N_("Please open the page again"),
    "forbidden": N_("For your safety, this form can only be sent from your page while it is "
                    "open. Nothing was changed."),
    "failed-title": N_("We could not book this time"),
    "failed": N_("Your appointment has not been changed. Please try again later."),
    "changed": N_("This appointment can no longer be changed online."),
    "no-slots-here": N_("New times cannot be chosen online for this appointment."),
}
_DOB_ERRORS = {
    "wrong": N_("That date of birth does not match our records. Please check it and try "
                "again."),
    "missing": N_("Please choose the day, the month and the year."),
    "no-such-date": N_("That date does not exist. Please check the day and the month."),
}
_SLOT_NOTICES = {
    "taken": N_("That time was just taken by someone else. Please choose another one."),
    "invalid": N_("Please choose one of the times shown."),
}


# --- state ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Home:
    portal: PortalState
    keeper: SessionKeeper


_GUARD = threading.Lock()


def _home_state(app: Any) -> _Home:
    portal = portal_state(app)
    with _GUARD:
        found: _Home | None = getattr(app.state, "portal_home", None)
        if found is None or found.portal is not portal:
            settings = portal.settings
            secret = load_secret(settings.channels.portal.secret, settings.keys_dir)
            keeper = SessionKeeper(
                secret, settings.patient_page.session_ttl,
                secure=urlsplit(settings.base_url).scheme == "https",
                path=f"{portal.prefix}/p/",
            )
            found = _Home(portal, keeper)
            app.state.portal_home = found
        return found


async def _db(engine: Engine, work: Callable[[Connection], Any]) -> Any:
    def run() -> Any:
        with engine.connect() as conn:
            return work(conn)

    return await asyncio.to_thread(run)


# --- requests -------------------------------------------------------------------------------

@dataclass
class _Visit:
    """One request to a ``p`` link, checked."""

    home: _Home
    request: Request
    token: str
    link: PortalLink
    hash: str
    now: datetime
    patient_id: str
    language: str
    session: Session | None
    lang_query: str

    @property
    def state(self) -> PortalState:
        return self.home.portal

    @property
    def engine(self) -> Engine:
        engine: Engine = self.request.app.state.runtime.engine
        return engine

    def url(self, path: str = "", **query: str) -> str:
        wanted = {k: v for k, v in query.items() if v}
        if self.lang_query:
            wanted.setdefault("lang", self.lang_query)
        base = f"{self.state.prefix}/p/{self.token}{path}"
        return f"{base}?{urlencode(wanted)}" if wanted else base

    @property
    def csrf(self) -> str:
        return self.home.keeper.csrf(self.session) if self.session else ""


def _message(visit: _Visit, kind: str, status: int, title: str, text: str, *,
             back: str | None = None) -> HTMLResponse:
    return _render(visit.state, "message.html", visit.language, status, title=title,
                   text=text, back=back, kind=kind)


def _refusal(state: PortalState, kind: str, language: str) -> HTMLResponse:
    """The touch page's own refusals (not found, busy, error)."""
    return _page_message(state, kind, language)


def _language_for(conn: Connection, state: PortalState, patient_id: str,
                  override: str | None) -> str:
    recipient = _recipient(conn, state.config, patient_id)
    return page_language(override, None, recipient.language, state.config.default_language)


async def _visit(request: Request, token: str) -> _Visit | Response:
    """The checked link and whom it is for, or the page that refuses it."""
    home = await asyncio.to_thread(_home_state, request.app)
    state = home.portal
    now = state.clock()
    checked = await _check(state, request, token, now)
    if isinstance(checked, _Refused):
        return checked.response
    if checked.kind != "p":
        return _refusal(state, "not-found", _fallback_language(state, request))
    override = request.query_params.get("lang")
    engine: Engine = request.app.state.runtime.engine

    def read(conn: Connection) -> tuple[str, str] | None:
        pid = survivor(conn, checked.ident)
        if pid is None:
            return None
        return pid, _language_for(conn, state, pid, override)

    try:
        found = await _db(engine, read)
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(state, "busy", _fallback_language(state, request))
    if found is None:
        return _refusal(state, "not-found", _fallback_language(state, request))
    hashed = token_hash(token)
    session = home.keeper.read(request.cookies.get(COOKIE), hashed, now=now)
    lang = normalize(override)
    return _Visit(home, request, token, checked, hashed, now, found[0], found[1], session,
                  lang if lang in state.languages else "")


def _with_session(visit: _Visit, response: Response) -> Response:
    """Renew the session (idle timeout) on every page it opens."""
    if visit.session is not None:
        visit.home.keeper.set_cookie(response, visit.home.keeper.renew(visit.session,
                                                                      now=visit.now))
    return response


async def _session_open(visit: _Visit) -> bool | Response:
    """Whether the visit has a live session for a verified, unlocked link (the locked page
    when the link is locked)."""
    try:
        found = await _db(visit.engine, lambda conn: access(conn, visit.hash))
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    if found.locked:
        return _locked(visit)
    return visit.session is not None and found.verified


def _locked(visit: _Visit) -> HTMLResponse:
    response = _message(visit, "unavailable", 403, _TEXT["locked-title"],
                        _TEXT["locked"])
    response.delete_cookie(COOKIE, path=visit.home.keeper.path)
    return response


def _forbidden(visit: _Visit) -> HTMLResponse:
    return _message(visit, "unavailable", 403, _TEXT["forbidden-title"],
                    _TEXT["forbidden"], back=visit.url())


def _audit(engine: Engine, patient_id: str, now: datetime, detail: dict[str, Any]) -> None:
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(audit_events).values(
            at=now, actor="portal", action="portal.read", target_type="Patient",
            target_id=patient_id, detail=detail))


# --- the date of birth ----------------------------------------------------------------------

async def _opened(request: Request, token: str, *, next_entry: str = "") -> _Visit | Response:
    """The visit when its session is open; otherwise the page to answer with (a refusal, or
    the date-of-birth form, which returns to ``next_entry``'s slots once answered)."""
    visit = await _visit(request, token)
    if not isinstance(visit, _Visit):
        return visit
    opened = await _session_open(visit)
    if isinstance(opened, Response):
        return opened
    if not opened:
        return _dob_form(visit, next_entry=next_entry)
    return visit


def _dob_form(visit: _Visit, *, status: int = 200, error: str = "", left: int | None = None,
              values: Mapping[str, str] | None = None, next_entry: str = "") -> Response:
    locale = _locale(visit.language)
    months = get_month_names("wide", locale=locale)
    this_year = visit.now.year
    order = ("month", "day", "year") if visit.language == "en" else ("day", "month", "year")
    return _render(
        visit.state, "dob.html", visit.language, status,
        action=visit.url("/dob"), error=error, left=left, values=values or {},
        months=[(n, months[n]) for n in range(1, 13)], days=list(range(1, 32)),
        years=list(range(this_year, this_year - 121, -1)), order=order, next_entry=next_entry,
    )


def _given_date(form: Mapping[str, list[str]]) -> tuple[str, dict[str, str]]:
    """The date of birth given, as ``YYYY-MM-DD``; :class:`_Invalid` when incomplete."""
    values = {k: ((form.get(k) or [""])[0]).strip() for k in ("day", "month", "year")}
    if not all(v.isdigit() and v.isascii() and len(v) <= 4 for v in values.values()):
        raise _Invalid(_DOB_ERRORS["missing"])
    try:
        given = date(int(values["year"]), int(values["month"]), int(values["day"]))
    except ValueError:
        raise _Invalid(_DOB_ERRORS["no-such-date"]) from None
    return normal_date(given) or "", values


@router.post("/p/{token:patient_token}/dob")
async def answer_dob(request: Request, token: str) -> Response:
    visit = await _visit(request, token)
    if not isinstance(visit, _Visit):
        return visit
    settings = visit.state.settings
    next_entry = ""
    try:
        form = await _read_form(request)
        next_entry = ((form.get("next") or [""])[0]).strip()
        given, values = _given_date(form)
    except _Invalid as exc:
        return _dob_form(visit, status=400, error=exc.reason,
                         next_entry=next_entry if next_entry.isalnum() else "")
    if not next_entry.isalnum() or len(next_entry) > 32:
        next_entry = ""
    pid = visit.patient_id
    try:
        verdict = await asyncio.to_thread(
            verify_birth_date, visit.engine, visit.hash, pid, given,
            lambda conn: birth_date(conn, pid), settings.patient_page.max_dob_attempts,
            visit.now)
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    log.info("portal_dob_checked", patient_id=pid, status=verdict.outcome)
    if verdict.outcome == "locked":
        return _locked(visit)
    if verdict.outcome == "wrong":
        return _dob_form(visit, status=400, error=_DOB_ERRORS["wrong"], left=verdict.left,
                         values=values, next_entry=next_entry)
    session = visit.home.keeper.issue(visit.hash, now=visit.now)
    target = (visit.url(f"/appointments/{next_entry}/slots") if next_entry else visit.url())
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    visit.home.keeper.set_cookie(response, session)
    return response


# --- the page -------------------------------------------------------------------------------

def _show_home(engine: Engine, visit: _Visit, override: str | None) -> HomePage | None:
    with engine.connect() as conn:
        page = load_home(conn, visit.state.config, visit.patient_id, now=visit.now,
                         override=override)
    if page is not None:
        _audit(engine, visit.patient_id, visit.now, {"link": "p"})
    return page


def _survey_url(visit: _Visit, touch_id: int) -> str:
    token = visit.state.signer.token("t", touch_id, now=visit.now)
    query = f"?{urlencode({'lang': visit.lang_query})}" if visit.lang_query else ""
    return f"{visit.state.prefix}/p/{token}{query}"


@router.get("/p/{token:patient_token}")
async def show_home(request: Request, token: str) -> Response:
    visit = await _opened(request, token)
    if not isinstance(visit, _Visit):
        return visit
    try:
        page = await asyncio.to_thread(_show_home, visit.engine, visit,
                                       request.query_params.get("lang"))
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    except Exception as exc:
        log.error("portal_failed", exc_type=type(exc).__name__)
        return _refusal(visit.state, "error", visit.language)
    if page is None:
        return _refusal(visit.state, "not-found", visit.language)
    runtime = request.app.state.runtime
    modes = {a.entry_id: await scheduling_mode(runtime, a.entry_id)
             for a in page.appointments if a.actionable}
    done = request.query_params.get("done", "")
    org = visit.state.settings.organization
    response = _render(
        visit.state, "home.html", page.language, 200,
        page=page, csrf=visit.csrf, modes=modes,
        done={**DONE_MESSAGES, **HOME_DONE}.get(done, ""),
        status_labels=STATUS_LABELS, channel_labels=CHANNEL_LABELS,
        opt_out_labels=OPT_OUT_LABELS,
        languages=[(c, language_name(c)) for c in page.preferences.languages],
        action_url=lambda entry_id, action: visit.url(f"/appointments/{entry_id}/{action}"),
        slots_url=lambda entry_id: visit.url(f"/appointments/{entry_id}/slots"),
        preferences_url=visit.url("/preferences"),
        survey_urls={s.touch_id: _survey_url(visit, s.touch_id) for s in page.surveys},
        results_link=org.results_link, max_preferred=MAX_PREFERRED,
    )
    return _with_session(visit, response)


# --- actions --------------------------------------------------------------------------------

async def _checked_post(request: Request, token: str
                        ) -> tuple[_Visit, dict[str, list[str]]] | Response:
    """A POST from the open page: session and CSRF token checked, form read."""
    visit = await _visit(request, token)
    if not isinstance(visit, _Visit):
        return visit
    opened = await _session_open(visit)
    if isinstance(opened, Response):
        return opened
    if not opened or visit.session is None:
        return _forbidden(visit)
    try:
        form = await _read_form(request)
    except _Invalid as exc:
        return _message(visit, "invalid", exc.status,
                        N_("We could not use your answer"), exc.reason, back=visit.url())
    if not visit.home.keeper.csrf_ok(visit.session, (form.get("csrf") or [""])[0]):
        log.warning("portal_csrf_refused", patient_id=visit.patient_id)
        return _forbidden(visit)
    return visit, form


def _record(  # noqa: PLR0917
    engine: Engine, settings: Any, patient_id: str, entry_id: str | None, action: str,
    values: Mapping[str, Any], form_hash: str, now: datetime,
) -> bool:
    """Store the action and apply it, in one transaction; False when this very form was
    stored before."""
    subject = f"p{patient_id}:{entry_id or '-'}:{action}:{form_hash}"
    with write_lock(engine), engine.begin() as conn:
        event_id = conn.execute(
            dialect_insert(conn, channel_events)
            .values(channel="portal", kind="portal", provider_id=subject[:255], address="",
                    touch_key=None, payload={"action": action, **values},
                    status="processed",
                    result=(f"{action} entry {entry_id}" if entry_id
                            else f"{action} patient {patient_id}"),
                    attempts=1, received_at=now, processed_at=now)
            .on_conflict_do_nothing(index_elements=["channel", "kind", "provider_id"])
            .returning(channel_events.c.id)
        ).scalar()
        if event_id is None:
            return False
        if action in _REQUEST_ACTIONS:
            assert entry_id is not None
            detail = {"preferred": values["preferred"]} if action == "reschedule" else None
            record_request(conn, settings, entry_id=entry_id, patient_id=patient_id,
                           action=action, source="portal", event_id=int(event_id),
                           touch_key=None, detail=detail, now=now)
        elif action == "waitlist":
            assert entry_id is not None
            waitlist.join(conn, settings, patient_id=patient_id, entry_id=entry_id, now=now)
        elif action == "leave-waitlist":
            for item in waitlist.active_for(conn, patient_id):
                if item.get("entry_id") == entry_id:
                    waitlist.withdraw(conn, waitlist_id=int(item["id"]), now=now)
        else:
            set_preferences(conn, patient_id, channel=values["channel"],
                            language=values["language"], opted_out=values["opted_out"],
                            now=now)
    return True


async def _store(visit: _Visit, entry_id: str | None, action: str,
                 values: Mapping[str, Any], form: Mapping[str, list[str]]) -> Response | None:
    """Run :func:`_record`; the page that says why not, or None when it is done."""
    clean = {k: v for k, v in form.items() if k != "csrf"}
    try:
        stored = await asyncio.to_thread(
            _record, visit.engine, visit.state.settings, visit.patient_id, entry_id, action,
            values, _form_hash(clean), visit.now)
    except ValueError:  # the waitlist refused: the appointment is no longer held
        return _message(visit, "unavailable", 409,
                        N_("This cannot be done here"), _TEXT["changed"], back=visit.url())
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", entry_id=entry_id, exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    except Exception as exc:
        log.error("portal_failed", entry_id=entry_id, reason=action,
                  exc_type=type(exc).__name__)
        return _refusal(visit.state, "error", visit.language)
    log.info("portal_action", entry_id=entry_id, patient_id=visit.patient_id, reason=action,
             status="stored" if stored else "duplicate")
    return None


async def _appointment(visit: _Visit, entry_id: str) -> HomeAppointment | Response:
    try:
        found = await _db(visit.engine, lambda conn: home_appointment(
            conn, visit.state.config, visit.patient_id, entry_id, now=visit.now,
            language=visit.language))
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    if found is None:
        return _refusal(visit.state, "not-found", visit.language)
    appointment: HomeAppointment = found
    return appointment


@router.post("/p/{token:patient_token}/appointments/{entry_id}/slots")
async def book(request: Request, token: str, entry_id: str) -> Response:
    checked = await _checked_post(request, token)
    if not isinstance(checked, tuple):
        return checked
    visit, form = checked
    appointment = await _appointment(visit, entry_id)
    if not isinstance(appointment, HomeAppointment):
        return appointment
    runtime = request.app.state.runtime
    unavailable = await _no_rebooking(visit, runtime, appointment)
    if unavailable is not None:
        return unavailable
    start_day = _from_day((form.get("from") or [""])[0])
    slot = _unseal(visit, entry_id, (form.get("slot") or [""])[0])
    if slot is None:
        return await _slots_page(visit, runtime, appointment, start_day,
                                 notice=_SLOT_NOTICES["invalid"], status=400)
    try:
        outcome = await runtime.scheduling.rebook(
            patient_id=visit.patient_id, entry_id=entry_id, slot=slot, source="portal",
            now=visit.now)
    except Exception as exc:
        log.error("portal_rebook_failed", entry_id=entry_id, exc_type=type(exc).__name__)
        return _failed(visit)
    status = getattr(outcome, "status", "failed")
    log.info("portal_rebook", entry_id=entry_id, patient_id=visit.patient_id, status=status)
    if status == "booked":
        booking_id = getattr(outcome, "booking_id", None)
        if booking_id is not None:
            return RedirectResponse(visit.url(f"/bookings/{int(booking_id)}"), status_code=303,
                                    headers=SECURITY_HEADERS)
        tz = await asyncio.to_thread(_zone, visit)
        return _with_session(visit, _booked_page(visit, appointment, outcome.start, tz=tz))
    if status == "requested":  # the EHR takes no bookings from us: the care team will
        return RedirectResponse(visit.url(done="rebook-requested"), status_code=303,
                                headers=SECURITY_HEADERS)
    if status == "conflict":
        alternatives = list(getattr(outcome, "alternatives", None) or [])
        return await _slots_page(visit, runtime, appointment, start_day,
                                 notice=_SLOT_NOTICES["taken"], slots=alternatives or None)
    return _failed(visit)


def _failed(visit: _Visit) -> Response:
    return _with_session(visit, _message(
        visit, "unavailable", 200, _TEXT["failed-title"], _TEXT["failed"],
        back=visit.url()))


@router.post("/p/{token:patient_token}/appointments/{entry_id}/{action}")
async def act(request: Request, token: str, entry_id: str, action: str) -> Response:
    checked = await _checked_post(request, token)
    if not isinstance(checked, tuple):
        return checked
    visit, form = checked
    if action not in HOME_ACTIONS:
        return _refusal(visit.state, "not-found", visit.language)
    appointment = await _appointment(visit, entry_id)
    if not isinstance(appointment, HomeAppointment):
        return appointment
    if not appointment.actionable:
        return _message(visit, "unavailable", 409,
                        N_("This cannot be done here"), _TEXT["changed"], back=visit.url())
    values: dict[str, Any] = {}
    if action == "reschedule":
        try:
            values = validate("reschedule", form, ())
        except _Invalid as exc:
            return _message(visit, "invalid", exc.status,
                            N_("We could not use your answer"), exc.reason, back=visit.url())
    refused = await _store(visit, entry_id, action, values, form)
    if refused is not None:
        return refused
    return RedirectResponse(visit.url(done=action), status_code=303, headers=SECURITY_HEADERS)


@router.post("/p/{token:patient_token}/preferences")
async def preferences(request: Request, token: str) -> Response:
    checked = await _checked_post(request, token)
    if not isinstance(checked, tuple):
        return checked
    visit, form = checked
    languages = visit.state.config.languages
    try:
        values = validate("preferences", form, languages)
    except _Invalid as exc:
        return _message(visit, "invalid", exc.status,
                        N_("We could not use your answer"), exc.reason, back=visit.url())
    refused = await _store(visit, None, "preferences", values, form)
    if refused is not None:
        return refused
    if values.get("language") in visit.state.languages:
        visit.lang_query = str(values["language"]) if visit.lang_query else ""
    return RedirectResponse(visit.url(done="preferences"), status_code=303,
                            headers=SECURITY_HEADERS)


# --- choosing a new time ----------------------------------------------------------------------

async def _no_rebooking(visit: _Visit, runtime: Any,
                        appointment: HomeAppointment) -> Response | None:
    if not appointment.actionable:
        return _message(visit, "unavailable", 409,
                        N_("This cannot be done here"), _TEXT["changed"], back=visit.url())
    if await scheduling_mode(runtime, appointment.entry_id) != "slots":
        return _message(visit, "unavailable", 409,
                        N_("This cannot be done here"), _TEXT["no-slots-here"],
                        back=visit.url())
    return None


def _zone(visit: _Visit) -> tzinfo:
    return _recipient_zone(visit.engine, visit.state, visit.patient_id)


def _recipient_zone(engine: Engine, state: PortalState, patient_id: str) -> tzinfo:
    with engine.connect() as conn:
        return _recipient(conn, state.config, patient_id).timezone


def _today(visit: _Visit, tz: tzinfo) -> date:
    return visit.now.astimezone(tz).date()


def _from_day(raw: str) -> date | None:
    """``from`` as a date (None: absent or not a date)."""
    try:
        return date.fromisoformat(raw.strip()) if raw.strip() else None
    except ValueError:
        return None


def _seal(visit: _Visit, entry_id: str, slot: Any) -> str:
    """The form value of a slot the page offers: its reference, signed for this link and
    appointment (so a form cannot book a slot the page did not offer)."""
    ref = str(slot.ref)
    return f"{ref}|{_slot_mac(visit, entry_id, ref)}"


def _slot_mac(visit: _Visit, entry_id: str, ref: str) -> str:
    return visit.home.keeper.slot_mac(f"{visit.hash}|{entry_id}|{ref}")


def _unseal(visit: _Visit, entry_id: str, value: str) -> str | None:
    """The slot reference a form names, when this page offered it; the EHR still checks that
    it is free (its version)."""
    ref, _, mac = value.strip().rpartition("|")
    if not ref or len(value) > 1024 or not hmac.compare_digest(
            _slot_mac(visit, entry_id, ref), mac):
        return None
    return ref


@dataclass(frozen=True)
class _Day:
    label: str
    slots: list[tuple[int, str, str, str]]
    """(number on the page, sealed value, start time, end time)"""


def _days(visit: _Visit, entry_id: str, slots: Sequence[Any], tz: tzinfo,
          language: str) -> list[_Day]:
    locale = _locale(language)
    days: dict[date, list[tuple[datetime, str, str, str]]] = {}
    for slot in slots:
        start = slot.start.astimezone(tz)
        end = slot.end.astimezone(tz) if slot.end else None
        days.setdefault(start.date(), []).append((
            start, _seal(visit, entry_id, slot),
            format_time(start, "short", tzinfo=tz, locale=locale),
            format_time(end, "short", tzinfo=tz, locale=locale) if end else ""))
    out = []
    number = 0
    for day in sorted(days):
        items = []
        for _, value, start_text, end_text in sorted(days[day], key=lambda i: i[0]):
            number += 1
            items.append((number, value, start_text, end_text))
        out.append(_Day(format_date(day, "full", locale=locale), items))
    return out


async def _slots_page(
    visit: _Visit, runtime: Any, appointment: HomeAppointment, start_day: date | None, *,
    notice: str = "", status: int = 200, slots: list[Any] | None = None,
) -> Response:
    tz = await asyncio.to_thread(_zone, visit)
    today = _today(visit, tz)
    held = appointment.start.date() if appointment.start else today
    last = max(today, held) + timedelta(days=_MAX_AHEAD)  # a year past the time held now
    day = start_day if start_day is not None and today <= start_day <= last else today
    span = visit.state.settings.patient_page.slot_days
    start = max(visit.now, datetime.combine(day, time(0), tz).astimezone(UTC))
    if slots is None:
        try:
            slots = list(await runtime.scheduling.free_slots(
                appointment.entry_id, start=start, days=span))
        except Exception as exc:
            log.error("portal_free_slots_failed", entry_id=appointment.entry_id,
                      exc_type=type(exc).__name__)
            return _failed(visit)
    earlier = max(today, day - timedelta(days=span)) if day > today else None
    later = day + timedelta(days=span)
    path = f"/appointments/{appointment.entry_id}/slots"
    response = _render(
        visit.state, "slots.html", visit.language, status,
        appointment=appointment, days=_days(visit, appointment.entry_id, slots, tz,
                                            visit.language),
        notice=notice, csrf=visit.csrf, action=visit.url(path), from_day=day.isoformat(),
        earlier_url=visit.url(path, **{"from": earlier.isoformat()}) if earlier else "",
        later_url=visit.url(path, **{"from": later.isoformat()}) if later <= last else "",
        back=visit.url(), booked=None,
    )
    return _with_session(visit, response)


@router.get("/p/{token:patient_token}/appointments/{entry_id}/slots")
async def show_slots(request: Request, token: str, entry_id: str) -> Response:
    visit = await _opened(request, token, next_entry=entry_id if entry_id.isalnum() else "")
    if not isinstance(visit, _Visit):
        return visit
    appointment = await _appointment(visit, entry_id)
    if not isinstance(appointment, HomeAppointment):
        return appointment
    runtime = request.app.state.runtime
    unavailable = await _no_rebooking(visit, runtime, appointment)
    if unavailable is not None:
        return unavailable
    try:
        await asyncio.to_thread(_audit, visit.engine, visit.patient_id, visit.now,
                                {"link": "p", "entry_id": entry_id, "page": "slots"})
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    return await _slots_page(visit, runtime, appointment,
                             _from_day(request.query_params.get("from", "")))


def _booked_page(visit: _Visit, appointment: HomeAppointment | None, start: datetime | None,
                 *, tz: tzinfo, service: str = "", location: str = "") -> HTMLResponse:
    zone = tz
    locale = _locale(visit.language)
    local = start.astimezone(zone) if start else None
    booked = {
        "service": service or (appointment.service if appointment else ""),
        "location": location or (appointment.location if appointment else ""),
        "start": local,
        "date_text": format_date(local, "full", locale=locale) if local else "",
        "time_text": format_time(local, "short", tzinfo=zone, locale=locale) if local else "",
    }
    return _render(visit.state, "slots.html", visit.language, 200, booked=booked,
                   back=visit.url(), appointment=appointment, days=[], notice="", csrf="",
                   action="", from_day="", earlier_url="", later_url="")


def _booking(engine: Engine, visit: _Visit, booking_id: int) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(bookings).where(bookings.c.id == booking_id)).first()
        if row is None or row.status != "booked" or str(row.patient_id) not in patient_ids(
                conn, visit.patient_id):
            return None
        service = location = ""
        if row.old_entry_id:
            res = conn.execute(select(timeline_entries.c.resource).where(
                timeline_entries.c.id == row.old_entry_id)).scalar() or {}
            service = _display(res.get("serviceType")) or _display(res.get("appointmentType"))
            location = _location(res)
        start = row.start if row.start.tzinfo else row.start.replace(tzinfo=UTC)
        tz = _recipient(conn, visit.state.config, visit.patient_id).timezone
    _audit(engine, visit.patient_id, visit.now, {"link": "p", "booking_id": booking_id})
    return {"start": start, "service": service,
            "location": location or visit.state.settings.organization.name, "tz": tz}


@router.get("/p/{token:patient_token}/bookings/{booking_id}")
async def show_booking(request: Request, token: str, booking_id: str) -> Response:
    visit = await _opened(request, token)
    if not isinstance(visit, _Visit):
        return visit
    if not booking_id.isdigit() or len(booking_id) > 18:
        return _refusal(visit.state, "not-found", visit.language)
    try:
        found = await asyncio.to_thread(_booking, visit.engine, visit, int(booking_id))
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _refusal(visit.state, "busy", visit.language)
    if found is None:
        return _refusal(visit.state, "not-found", visit.language)
    return _with_session(visit, _booked_page(
        visit, None, found["start"], tz=found["tz"], service=found["service"],
        location=found["location"]))


# --- anything else under a p link -----------------------------------------------------------

@router.get("/p/{token:patient_token}/{rest:path}")
async def back_to_page(request: Request, token: str, rest: str) -> Response:
    """A reload or bookmark of an action's address: back to the page (no state change)."""
    state = await asyncio.to_thread(portal_state, request.app)
    lang = normalize(request.query_params.get("lang"))
    query = f"?{urlencode({'lang': lang})}" if lang in state.languages else ""
    return RedirectResponse(f"{state.prefix}/p/{token}{query}", status_code=303,
                            headers=SECURITY_HEADERS)


@router.post("/p/{token:patient_token}/{rest:path}")
async def unknown_action(request: Request, token: str, rest: str) -> Response:
    state = await asyncio.to_thread(portal_state, request.app)
    return _refusal(state, "not-found", _fallback_language(state, request))
