"""Senders: the HL7 senders careloop knows (settings file and console), and the form that registers
or changes one (admin).

* ``GET /console/senders`` (viewer): every sender seen in the inbox (``MSH-3|MSH-4``, with its
  message and failure counts and the rule that applies, if any) and every rule in effect, with
  where it comes from.
* ``GET /console/senders/edit?application=&facility=`` (admin): the form, filled from the rule
  in effect for that sender when there is one.
* ``POST /console/senders`` (admin): validate, save the console's row (it overrides the settings
  file's rule for the same sender), audit ``console.sender_saved``, 303 back to the list. Every
  process uses the saved rule from its next batch (:mod:`integration.senders`).
* ``POST /console/senders/delete`` (admin): remove a console row (the file's rule, if any,
  applies again), audited ``console.sender_deleted``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode
from zoneinfo import available_timezones

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import Engine, case, func, select

from integration.console.auth import Admin, Session, Viewer, now_for, runtime_of
from integration.console.render import HEADERS, ConsoleError, render
from integration.console.users import role_allows
from integration.models import InboxStatus, inbox
from integration.senders import (
    SenderError,
    SenderRule,
    delete_sender,
    effective_rules,
    find_rule,
    load_console_senders,
    namespace,
    save_sender,
    sender_label,
    validate_sender,
)
from integration.settings import HL7Sender, Settings

__all__ = ["SeenSender", "SendersOverview", "router", "senders_overview"]

router = APIRouter(include_in_schema=False, tags=["console"])

SEEN_LIMIT = 1000
SEEN_WINDOW = timedelta(days=30)
"""Senders are listed from the messages of this long (the ``received_at`` index bounds the
scan; a busy inbox holds millions of rows)."""
"""The most distinct senders the list shows."""
_FIELDS = ("application", "facility", "timezone", "identifier_systems", "ack_to")
_TIMEZONES = sorted(available_timezones())


@dataclass(frozen=True)
class SeenSender:
    """A sender found in the inbox."""

    sender: str
    """``MSH-3|MSH-4`` as sent."""
    application: str
    facility: str
    messages: int
    failed: int
    rule: SenderRule | None


@dataclass(frozen=True)
class SendersOverview:
    seen: list[SeenSender]
    rules: tuple[SenderRule, ...]
    truncated: bool


def senders_overview(engine: Engine, settings: Settings, now: datetime) -> SendersOverview:
    """The senders of the last :data:`SEEN_WINDOW` of the inbox (HL7 only) and the rules in
    effect, read now."""
    c = inbox.c
    failed = func.sum(case((c.status == InboxStatus.FAILED.value, 1), else_=0))
    with engine.connect() as conn:
        rules = effective_rules(settings, load_console_senders(conn))
        rows = conn.execute(
            select(c.sender, func.count(), failed)
            .where(c.received_at >= now - SEEN_WINDOW, c.source != "fhir", c.sender != "")
            .group_by(c.sender).order_by(c.sender).limit(SEEN_LIMIT + 1)).all()
    seen = []
    for sender, messages, n_failed in rows[:SEEN_LIMIT]:
        app_hd, _, fac_hd = str(sender).partition("|")
        application, facility = namespace(app_hd), namespace(fac_hd)
        seen.append(SeenSender(str(sender), application, facility, int(messages),
                               int(n_failed or 0), find_rule(rules, application, facility)))
    return SendersOverview(seen, rules, len(rows) > SEEN_LIMIT)


def _systems_text(rule: HL7Sender) -> str:
    return "\n".join(f"{k} = {v}" for k, v in rule.identifier_systems.items())


def _form_for(engine: Engine, settings: Settings, application: str,
              facility: str) -> dict[str, str]:
    """The form's values: the rule in effect for exactly this sender, else the names alone."""
    with engine.connect() as conn:
        rules = effective_rules(settings, load_console_senders(conn))
    for r in rules:
        if r.key == (application, facility):
            return {"application": application, "facility": facility,
                    "timezone": r.rule.timezone or "", "ack_to": r.rule.ack_to or "",
                    "identifier_systems": _systems_text(r.rule)}
    return {"application": application, "facility": facility, "timezone": "", "ack_to": "",
            "identifier_systems": ""}


def _form_page(session: Session, values: dict[str, str], *, status: int = 200,
               error: str = "") -> Response:
    return render("sender.html", status, session=session, active="senders", form=values,
                  error=error, timezones=_TIMEZONES)


@router.get("/console/senders")
async def senders_page(request: Request, session: Viewer) -> Response:
    runtime = runtime_of(request)
    overview = await asyncio.to_thread(senders_overview, runtime.engine, runtime.settings,
                                       now_for(request))
    params = request.query_params
    saved, deleted = params.get("saved", "")[:512], params.get("deleted", "")[:512]
    return render("senders.html", session=session, active="senders", o=overview,
                  saved=saved, deleted=deleted,
                  saved_link=urlencode({"sender": saved.removesuffix("|"),
                                        "status": "failed"}) if saved else "",
                  admin=role_allows(session.person.role, "admin"),
                  hold=runtime.settings.hl7_unregistered_senders == "hold")


@router.get("/console/senders/edit")
async def sender_form(request: Request, session: Admin) -> Response:
    runtime = runtime_of(request)
    params = request.query_params
    application = params.get("application", "").strip()[:255]
    facility = params.get("facility", "").strip()[:255]
    values = await asyncio.to_thread(_form_for, runtime.engine, runtime.settings, application,
                                     facility)
    return _form_page(session, values)


@router.post("/console/senders")
async def save_sender_form(request: Request, session: Admin) -> Response:
    runtime = runtime_of(request)
    form = await request.form()
    values = {name: str(form.get(name) or "")[:8192] for name in _FIELDS}
    try:
        rule = validate_sender(values)
    except SenderError as exc:
        return _form_page(session, values, status=400, error=str(exc))
    await asyncio.to_thread(save_sender, runtime.engine, rule, actor=session.person.username,
                            now=now_for(request))
    runtime.contexts.registry.invalidate()  # this process: at once (others: next batch)
    label = sender_label(rule.application, rule.facility)
    return RedirectResponse("/console/senders?" + urlencode({"saved": label}), status_code=303,
                            headers=HEADERS)


@router.post("/console/senders/delete")
async def delete_sender_form(request: Request, session: Admin) -> Response:
    runtime = runtime_of(request)
    form = await request.form()
    application = str(form.get("application") or "").strip()
    facility = str(form.get("facility") or "").strip()
    done = await asyncio.to_thread(delete_sender, runtime.engine, application, facility,
                                   actor=session.person.username, now=now_for(request))
    if not done:
        raise ConsoleError(404, "Not found", "The console has no rule for "
                           f"{sender_label(application, facility)}.")
    runtime.contexts.registry.invalidate()
    label = sender_label(application, facility)
    return RedirectResponse("/console/senders?" + urlencode({"deleted": label}),
                            status_code=303, headers=HEADERS)
