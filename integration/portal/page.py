"""The patient page over HTTP: ``GET /p/{token}`` and its form actions.

The signed link is the only credential (no login, no cookies, hence no CSRF token): every
request, page or action, is checked against it first, and a forged, damaged or expired link gets
the same friendly page whatever it names, so a guess learns nothing about which ids exist.

Actions are plain HTML forms (no JavaScript anywhere), answered Post/Redirect/Get: ``POST
/p/{token}/{confirm|cancel|reschedule|survey|preferences}`` stores what the patient did and
answers 303 to ``GET /p/{token}?done=<action>``, which says so in a ``role="status"`` region.
Each action is one transaction: a ``channel_events`` row (channel and kind ``portal``, provider
id ``<touch id>:<action>:<sha256 of the form>``) inserted with ``ON CONFLICT DO NOTHING``; only
when it is new do the effects run (``integration.replies.effects``; a survey answer also owes
the EHR a Communication). A double submit of one form is therefore stored once. Each form
carries the page's state version (``v``), so the same answer given again after something
changed (confirm, ask to cancel, confirm again) is a new event.

Responses carry ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer`` (the token is in
the URL), ``X-Frame-Options: DENY`` and a Content-Security-Policy that allows nothing but the
page's own stylesheet and forms.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup, escape
from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from integration.db import dialect_insert, write_lock
from integration.logs import get_logger
from integration.models import audit_events, channel_events
from integration.outreach.pathways import CHANNELS
from integration.outreach.stage import catalog_for
from integration.outreach.state import OutreachConfig
from integration.outreach.templates import TemplateCatalog
from integration.portal.home_view import scheduling_mode
from integration.portal.i18n import (
    N_,
    STATIC_DIR,
    PageText,
    available_languages,
    language_name,
    negotiate,
    normalize,
)
from integration.portal.links import LinkError, LinkSigner, PortalLink, load_secret
from integration.portal.view import (
    APPOINTMENT_ACTIONS,
    CHANNEL_LABELS,
    DONE_MESSAGES,
    HEADINGS,
    OPT_OUT_LABELS,
    STATUS_LABELS,
    PortalPage,
    load_language,
    load_page,
)
from integration.replies.effects import record_request, set_preferences
from integration.settings import Settings
from integration.writeback import enqueue_reply

__all__ = [
    "ACTIONS",
    "CSS_PATH",
    "MAX_COMMENT",
    "MAX_PREFERRED",
    "SECURITY_HEADERS",
    "PortalState",
    "portal_state",
    "router",
]

log = get_logger("careloop.portal")

ACTIONS = ("confirm", "cancel", "reschedule", "survey", "preferences")
MAX_COMMENT = 1000
MAX_PREFERRED = 500
MAX_BODY = 32 * 1024
CSS_PATH = "/p/static/portal.css"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
}
_EPOCH = datetime(1970, 1, 2, tzinfo=UTC)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

router = APIRouter(include_in_schema=False)


@dataclass
class PortalState:
    """What the page needs from the settings, built once per app."""

    settings: Settings
    signer: LinkSigner
    config: OutreachConfig
    catalog: TemplateCatalog
    text: PageText
    prefix: str
    """The path part of ``base_url``: links and forms are root-relative under it."""
    css: bytes
    css_version: str
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    @classmethod
    def build(cls, settings: Settings) -> PortalState:
        portal = settings.channels.portal
        signer = LinkSigner(load_secret(portal.secret, settings.keys_dir), settings.base_url,
                            portal.link_ttl)
        config = OutreachConfig.from_settings(settings)
        css = (STATIC_DIR / "portal.css").read_bytes()
        return cls(
            settings=settings, signer=signer, config=config, catalog=catalog_for(config),
            text=PageText(), prefix=urlsplit(settings.base_url).path.rstrip("/"), css=css,
            css_version=hashlib.sha256(css).hexdigest()[:10],
        )

    @property
    def languages(self) -> tuple[str, ...]:
        return available_languages()


_STATE_GUARD = threading.Lock()


def portal_state(app: Any) -> PortalState:
    """The app's :class:`PortalState` (built on first use from ``app.state.runtime``)."""
    runtime = app.state.runtime
    with _STATE_GUARD:
        state: PortalState | None = getattr(app.state, "portal", None)
        if state is None or state.settings is not runtime.settings:
            state = PortalState.build(runtime.settings)
            app.state.portal = state
        return state


# --- responses ----------------------------------------------------------------------------------

def _phone_link(phone: str) -> Markup:
    tel = re.sub(r"[^0-9+]", "", phone)
    return Markup('<a href="tel:{}">{}</a>').format(tel, phone) if tel else escape(phone)


def _render(state: PortalState, template: str, language: str, status: int,
            **values: Any) -> HTMLResponse:
    org = state.settings.organization
    html = state.text.render(
        template, language,
        language=language,
        org_name=org.name,
        phone=org.phone,
        phone_link=_phone_link(org.phone) if org.phone else "",
        css_url=f"{state.prefix}{CSS_PATH}?v={state.css_version}",
        **values,
    )
    headers = {**SECURITY_HEADERS, "Content-Language": language}
    return HTMLResponse(html, status_code=status, headers=headers)


_MESSAGES: dict[str, tuple[int, str, str]] = {
    "not-found": (404, N_("We could not find this page"),
                  N_("The link may be incomplete. Please check that you opened the whole link "
                     "from your message.")),
    "expired": (410, N_("This link has expired"),
                N_("For your privacy, links to this page only work for a limited time.")),
    "invalid": (400, N_("We could not use your answer"), ""),
    "unavailable": (409, N_("This cannot be done here"), ""),
    "busy": (503, N_("Please try again later"),
             N_("We could not open or save this page just now. Please try again in a few "
                "minutes.")),
    "error": (500, N_("Something went wrong"),
              N_("We could not open or save this page just now. Please try again in a few "
                 "minutes.")),
}


def _message(state: PortalState, kind: str, language: str, *, reason: str = "",
             back: str | None = None) -> HTMLResponse:
    status, title, text = _MESSAGES[kind]
    response = _render(state, "message.html", language, status, title=title,
                       text=reason or text, back=back, kind=kind)
    if status == 503:
        response.headers["Retry-After"] = "60"
    return response


def _fallback_language(state: PortalState, request: Request) -> str:
    override = normalize(request.query_params.get("lang"))
    if override in state.languages:
        return override
    negotiated = negotiate(request.headers.get("accept-language", ""), state.languages)
    if negotiated:
        return negotiated
    default = normalize(state.settings.default_language)
    return default if default in state.languages else "en"


def _page_url(state: PortalState, token: str, **query: str) -> str:
    url = f"{state.prefix}/p/{token}"
    wanted = {k: v for k, v in query.items() if v}
    return f"{url}?{urlencode(wanted)}" if wanted else url


# --- links --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Refused:
    response: Response


_TOUCH = frozenset({"t"})
"""This router's links; patient (``p``) and offer (``o``) links have their own pages."""


async def _check(state: PortalState, request: Request, token: str,
                 now: datetime, *, kinds: frozenset[str] | None = None) -> PortalLink | _Refused:
    """The link, or the page that refuses it (404 forged, unknown, or not one of ``kinds``;
    410 expired, in the patient's language when the link names a patient we know)."""
    try:
        link = state.signer.read(token, now=now)
    except LinkError as exc:
        if not exc.expired:
            return _Refused(_message(state, "not-found", _fallback_language(state, request)))
    else:
        if kinds is not None and link.kind not in kinds:
            return _Refused(_message(state, "not-found", _fallback_language(state, request)))
        return link
    # Expired, but genuinely ours (the signature checked): whom it was for is known.
    language: str | None = None
    try:
        stale = state.signer.read(token, now=_EPOCH)
        override = request.query_params.get("lang")
        language = await _db(request, lambda conn: load_language(
            conn, state.config, stale, override=override))
    except Exception as exc:  # the refusal must show whatever the database says
        log.warning("portal_language_unknown", exc_type=type(exc).__name__)
        language = None
    return _Refused(_message(state, "expired", language or _fallback_language(state, request)))


async def _db(request: Request, work: Callable[[Connection], Any]) -> Any:
    engine: Engine = request.app.state.runtime.engine

    def run() -> Any:
        with engine.connect() as conn:
            return work(conn)

    return await asyncio.to_thread(run)


# --- the page -----------------------------------------------------------------------------------

@router.get(CSS_PATH)
async def stylesheet(request: Request) -> Response:
    state = await asyncio.to_thread(portal_state, request.app)
    headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"}
    return Response(state.css, media_type="text/css; charset=utf-8", headers=headers)


def _languages_offered(page: PortalPage) -> list[tuple[str, str]]:
    return [(code, language_name(code)) for code in page.preferences.languages]


def _view(engine: Engine, state: PortalState, link: PortalLink, now: datetime,
          override: str | None) -> PortalPage | None:
    """The page's data, and the read on record (``audit_events``, action ``portal.read``)
    before the answer leaves, like every read of patient data."""
    with engine.connect() as conn:
        page = load_page(conn, state.config, state.catalog, link, now=now, override=override)
    if page is None:
        return None
    detail: dict[str, Any] = {"link": link.kind}
    if page.touch is not None:
        detail.update(touch_id=page.touch.id, entry_id=page.entry_id)
    try:
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(audit_events).values(
                at=now, actor="portal", action="portal.read", target_type="Patient",
                target_id=page.patient_id, detail=detail))
    except SQLAlchemyError as exc:
        raise _Unaudited(page.language) from exc
    return page


class _Unaudited(Exception):
    """The page was read but its read could not be put on record: it is not shown."""

    def __init__(self, language: str) -> None:
        super().__init__(language)
        self.language = language


@router.get("/p/{token}")
async def show(request: Request, token: str) -> Response:
    state = await asyncio.to_thread(portal_state, request.app)
    now = state.clock()
    checked = await _check(state, request, token, now, kinds=_TOUCH)
    if isinstance(checked, _Refused):
        return checked.response
    override = request.query_params.get("lang")
    engine: Engine = request.app.state.runtime.engine
    try:
        page = await asyncio.to_thread(_view, engine, state, checked, now, override)
    except _Unaudited as exc:
        log.warning("portal_unavailable", exc_type=type(exc.__cause__).__name__)
        return _message(state, "busy", exc.language)
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _message(state, "busy", _fallback_language(state, request))
    except Exception as exc:
        log.error("portal_failed", exc_type=type(exc).__name__)
        return _message(state, "error", _fallback_language(state, request))
    if page is None:
        return _message(state, "not-found", _fallback_language(state, request))
    done = request.query_params.get("done", "")
    lang_query = normalize(override) if normalize(override) in state.languages else ""
    urls = {action: f"{state.prefix}/p/{token}/{action}"
            + (f"?{urlencode({'lang': lang_query})}" if lang_query else "")
            for action in ACTIONS}
    home_url, rebook_url = await _own_page_urls(request, state, checked, page, lang_query)
    return _render(
        state, "page.html", page.language, 200,
        page=page,
        heading=HEADINGS[page.kind],
        appointment=page.appointment,
        status_label=STATUS_LABELS.get(page.appointment.status, "")
        if page.appointment else "",
        done=DONE_MESSAGES.get(done, ""),
        urls=urls,
        channel_labels=CHANNEL_LABELS,
        opt_out_labels=OPT_OUT_LABELS,
        languages=_languages_offered(page),
        max_comment=MAX_COMMENT,
        max_preferred=MAX_PREFERRED,
        home_url=home_url,
        rebook_url=rebook_url,
    )


async def _own_page_urls(request: Request, state: PortalState, link: PortalLink,
                         page: PortalPage, lang_query: str) -> tuple[str, str]:
    """The patient's own page (a ``p`` link expiring with this one, the same on every view,
    so its date-of-birth tries are counted once), and its "choose a new time" page for this
    appointment when the patient can rebook it online (else "")."""
    if page.touch is None:
        return "", ""
    token = state.signer.token("p", page.patient_id, now=link.expires_at - state.signer.ttl)
    query = f"?{urlencode({'lang': lang_query})}" if lang_query else ""
    home = f"{state.prefix}/p/{token}"
    rebook = ""
    if page.appointment is not None and page.appointment.actionable and page.entry_id and (
            await scheduling_mode(request.app.state.runtime, page.entry_id) == "slots"):
        rebook = f"{home}/appointments/{page.entry_id}/slots{query}"
    return f"{home}{query}", rebook


@router.get("/p/{token}/{action}")
async def show_after_action(request: Request, token: str, action: str) -> Response:
    """A reload or bookmark of an action's address: back to the page (no state change)."""
    lang = normalize(request.query_params.get("lang"))
    state = await asyncio.to_thread(portal_state, request.app)
    return RedirectResponse(_page_url(state, token, lang=lang), status_code=303,
                            headers=SECURITY_HEADERS)


# --- actions ------------------------------------------------------------------------------------

class _Invalid(ValueError):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _clean(value: str) -> str:
    text = unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text).strip()


def _one(form: Mapping[str, list[str]], name: str) -> str:
    values = form.get(name) or []
    return values[0] if values else ""


def validate(action: str, form: Mapping[str, list[str]], languages: tuple[str, ...]
             ) -> dict[str, Any]:
    """The action's inputs, checked; :class:`_Invalid` with a reason the patient can act on."""
    if action == "reschedule":
        preferred = _clean(_one(form, "preferred"))
        if len(preferred) > MAX_PREFERRED:
            raise _Invalid(N_("Please keep your preferred days and times under 500 characters."))
        return {"preferred": preferred}
    if action == "survey":
        raw = _one(form, "score").strip()
        if not raw:
            raise _Invalid(N_("Please choose a number from 0 to 10."))
        if not raw.isdigit() or not raw.isascii() or not 0 <= int(raw) <= 10:
            raise _Invalid(N_("The answer must be a whole number from 0 to 10."))
        comment = _clean(_one(form, "comment"))
        if len(comment) > MAX_COMMENT:
            raise _Invalid(N_("Please keep your comment under 1000 characters."))
        return {"score": int(raw), "comment": comment}
    if action == "preferences":
        channel = _one(form, "channel").strip() or None
        if channel is not None and channel not in CHANNELS:
            raise _Invalid(N_("Please choose one of the ways to reach you shown on the page."))
        language = _one(form, "language").strip() or None
        if language is not None and language not in languages:
            raise _Invalid(N_("Please choose one of the languages shown on the page."))
        opted_out = sorted(set(form.get("opted_out") or []))
        if any(c not in CHANNELS for c in opted_out):
            raise _Invalid(N_("Please choose from the kinds of messages shown on the page."))
        if channel is not None and channel in opted_out:
            raise _Invalid(N_("You chose a way to reach you and also asked us to stop it. "
                              "Please choose another way, or untick it."))
        return {"channel": channel, "language": language, "opted_out": opted_out}
    return {}



def _form_hash(form: Mapping[str, list[str]]) -> str:
    canonical = urlencode(sorted((k, v) for k, values in form.items() for v in values))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def record(  # noqa: PLR0917
    engine: Engine, settings: Settings, page: PortalPage, action: str, values: Mapping[str, Any],
    form_hash: str, now: datetime,
) -> bool:
    """Store the action and apply its effects, in one transaction. False: this very form was
    submitted before (nothing more is done)."""
    subject = str(page.touch.id) if page.touch is not None else f"p{page.patient_id}"
    if action == "preferences":
        result = f"preferences patient {page.patient_id}"
    else:
        result = f"{action} entry {page.entry_id}"
    with write_lock(engine), engine.begin() as conn:
        stmt = (
            dialect_insert(conn, channel_events)
            .values(
                channel="portal", kind="portal",
                provider_id=f"{subject}:{action}:{form_hash}",
                address=page.address, touch_key=page.touch.key if page.touch else None,
                payload={"action": action, **values}, status="processed", result=result,
                attempts=1, received_at=now, processed_at=now,
            )
            .on_conflict_do_nothing(index_elements=["channel", "kind", "provider_id"])
            .returning(channel_events.c.id)
        )
        event_id = conn.execute(stmt).scalar()
        if event_id is None:
            return False
        touch_key = page.touch.key if page.touch is not None else None
        if action in APPOINTMENT_ACTIONS:
            assert page.entry_id is not None
            detail = {"preferred": values["preferred"]} if action == "reschedule" else None
            record_request(conn, settings, entry_id=page.entry_id, patient_id=page.patient_id,
                           action=action, source="portal", event_id=int(event_id),
                           touch_key=touch_key, detail=detail, now=now)
        elif action == "survey":
            assert page.entry_id is not None
            score, comment = values["score"], values["comment"]
            record_request(conn, settings, entry_id=page.entry_id, patient_id=page.patient_id,
                           action="survey", source="portal", event_id=int(event_id),
                           touch_key=touch_key, detail={"score": score, "comment": comment},
                           now=now)
            text = f"Survey: {score}/10. {comment}".strip()
            enqueue_reply(conn, settings, event_id=int(event_id), channel="portal",
                          patient_id=page.patient_id, entry_id=page.entry_id,
                          touch_key=touch_key, text=text, received_at=now, now=now)
        else:
            set_preferences(conn, page.patient_id, channel=values["channel"],
                            language=values["language"], opted_out=values["opted_out"], now=now)
    return True


def _refusal(page: PortalPage, action: str) -> str | None:
    """Why ``action`` cannot be taken on this page, or None."""
    if action in APPOINTMENT_ACTIONS:
        if page.appointment is None:
            return N_("This page is not about an appointment.")
        if not page.appointment.actionable:
            return N_("This appointment can no longer be changed online.")
    if action == "survey" and not page.survey:
        return N_("This page has no survey.")
    return None


async def _read_form(request: Request) -> dict[str, list[str]]:
    """The urlencoded form (an empty body is an empty form, whatever its type)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _Invalid(N_("Your answer is too long."), 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        return {}
    if content_type != "application/x-www-form-urlencoded":
        raise _Invalid(N_("We could not read the form. Please try again from the page."))
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise _Invalid(N_("We could not read the form. Please try again from the page.")
                       ) from None


@router.post("/p/{token}/{action}")
async def act(request: Request, token: str, action: str) -> Response:
    state = await asyncio.to_thread(portal_state, request.app)
    now = state.clock()
    checked = await _check(state, request, token, now, kinds=_TOUCH)
    if isinstance(checked, _Refused):
        return checked.response
    if action not in ACTIONS:
        return _message(state, "not-found", _fallback_language(state, request))
    override = request.query_params.get("lang")
    runtime = request.app.state.runtime
    try:
        page: PortalPage | None = await _db(request, lambda conn: load_page(
            conn, state.config, state.catalog, checked, now=now, override=override))
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", exc_type=type(exc).__name__)
        return _message(state, "busy", _fallback_language(state, request))
    except Exception as exc:
        log.error("portal_failed", reason=action, exc_type=type(exc).__name__)
        return _message(state, "error", _fallback_language(state, request))
    if page is None:
        return _message(state, "not-found", _fallback_language(state, request))
    lang = normalize(override) if normalize(override) in state.languages else ""
    back = _page_url(state, token, lang=lang)
    refusal = _refusal(page, action)
    if refusal is not None:
        return _message(state, "unavailable", page.language, reason=refusal, back=back)
    try:
        form = await _read_form(request)
        values = validate(action, form, page.preferences.languages)
    except _Invalid as exc:
        response = _message(state, "invalid", page.language, reason=exc.reason, back=back)
        response.status_code = exc.status
        return response
    try:
        stored = await asyncio.to_thread(record, runtime.engine, state.settings, page, action,
                                         values, _form_hash(form), now)
    except SQLAlchemyError as exc:
        log.warning("portal_unavailable", entry_id=page.entry_id, exc_type=type(exc).__name__)
        return _message(state, "busy", page.language, back=back)
    except Exception as exc:
        log.error("portal_failed", entry_id=page.entry_id, reason=action,
                  exc_type=type(exc).__name__)
        return _message(state, "error", page.language, back=back)
    log.info("portal_action", entry_id=page.entry_id, patient_id=page.patient_id,
             reason=action, status="stored" if stored else "duplicate")
    if action == "preferences" and values.get("language") in state.languages:
        lang = str(values["language"])
    return RedirectResponse(_page_url(state, token, done=action, lang=lang), status_code=303,
                            headers=SECURITY_HEADERS)
