"""Outcomes over HTTP: ``GET /outreach/outcomes`` (JSON, scope ``outreach.read``), and the
console's ``GET /console/outcomes`` (HTML with inline SVG bar charts: no JavaScript, no outside
asset) and ``GET /console/outcomes.csv`` (``?table=steps|appointments|waitlist|bookings``).

The console routes are for anyone signed in to the console (any role: the figures name no
patient), and the page is drawn inside the console's layout and navigation. Scripts may use an
``admin`` API client instead: a Bearer token, or the client id and secret as HTTP Basic
credentials. Without either, a browser (``Accept: text/html``) is sent to the console's
sign-in page, and any other client gets 401 with ``WWW-Authenticate: Basic realm="careloop
console"``.

The period is ``since`` and ``until`` (``YYYY-MM-DD`` or ISO 8601 date-times; a date is
midnight in the configured time zone and ``until`` a date includes that whole day); the
default is the 30 days before now. The figures never name a patient (see
:mod:`integration.outcomes.report`).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine

from integration.api import ApiError, require_scope
from integration.clients import Client
from integration.console.auth import COOKIE, Session, load_session, now_for
from integration.console.render import CSS as CONSOLE_CSS
from integration.console.render import ConsoleError
from integration.console.users import role_allows
from integration.logs import get_logger
from integration.outcomes.report import CSV_TABLES, OutcomeReport, Rate, outcome_report
from integration.outreach.pathways import Pathway
from integration.runtime import Runtime

__all__ = ["CONSOLE_CHALLENGE", "DEFAULT_DAYS", "console_admin", "console_reader",
           "parse_period", "router"]

log = get_logger("careloop.outcomes")

DEFAULT_DAYS = 30
CONSOLE_CHALLENGE = {"WWW-Authenticate": 'Basic realm="careloop console"'}
TEMPLATES = Path(__file__).with_name("templates")
CONSOLE_TEMPLATES = Path(__file__).parents[1] / "console" / "templates"

OUTCOMES_CSS = """
h3{font-size:1.05rem;margin:1rem 0 .25rem}
form.period{display:flex;flex-wrap:wrap;gap:.75rem;align-items:flex-end;margin:.5rem 0 1rem}
form.period label{display:flex;flex-direction:column;font-weight:600;font-size:.9rem;margin:0}
svg{max-width:100%;height:auto}
svg text{font-size:12px;fill:#1a1a1a}
.legend{display:flex;flex-wrap:wrap;gap:1rem;padding:0;margin:.25rem 0;list-style:none}
.swatch{display:inline-block;width:.9rem;height:.9rem;margin-right:.3rem;vertical-align:-.1rem;
 border:1px solid #555}
.s0{fill:#0b4f8a;background:#0b4f8a}.s1{fill:#2e8540;background:#2e8540}
.s2{fill:#b50909;background:#b50909}.s3{fill:#8a6d00;background:#8a6d00}
.s4{fill:#5b2c83;background:#5b2c83}.s5{fill:#00707a;background:#00707a}
dl.defs dt{font-weight:600;margin-top:.5rem}dl.defs dd{margin-left:1rem}
"""
CSS = CONSOLE_CSS + OUTCOMES_CSS
"""The page's one style sheet: the console's, and the charts' legend colours."""
CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
CSP = (f"default-src 'none'; style-src 'sha256-{CSS_HASH}'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
CONSOLE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
}

router = APIRouter(tags=["outcomes"])

_admin = require_scope("admin")


async def console_admin(request: Request) -> Client:
    """``require_scope("admin")``, with a Basic challenge a browser answers with a prompt."""
    try:
        return await _admin(request)
    except ApiError as exc:
        if exc.status == 401:
            raise ApiError(401, exc.code, exc.message, dict(CONSOLE_CHALLENGE)) from None
        raise


async def console_reader(request: Request) -> Session | Client:
    """A signed-in console person (any role), else an ``admin`` API client
    (:func:`console_admin`); with neither, a browser is sent to sign in (303)."""
    runtime: Runtime = request.app.state.runtime
    token = request.cookies.get(COOKIE)
    if token:
        session = await asyncio.to_thread(load_session, runtime.engine, token,
                                          now=now_for(request))
        if session is not None and role_allows(session.person.role, "viewer"):
            request.state.console_session = session
            return session
    if not request.headers.get("authorization") and "text/html" in request.headers.get(
            "accept", ""):
        raise ConsoleError(303, "Sign in first")
    return await console_admin(request)


OutreachReader = Annotated[Client, Depends(require_scope("outreach.read"))]
ConsoleAdmin = Annotated[Client, Depends(console_admin)]
ConsoleReader = Annotated[Session | Client, Depends(console_reader)]


# ------------------------------------------------------------------------------- the period


def _moment(name: str, text: str, zone: tzinfo, *, end: bool) -> datetime:
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            if end:
                day += timedelta(days=1)
            return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, "bad_request",
                       f"{name}: expected YYYY-MM-DD or an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC)


def parse_period(since: str | None, until: str | None, zone: tzinfo,
                 now: datetime) -> tuple[datetime, datetime]:
    """``[since, until)`` in UTC from the query (400 when unreadable or empty)."""
    end = _moment("until", until, zone, end=True) if until else now.astimezone(UTC)
    start = (_moment("since", since, zone, end=False) if since
             else end - timedelta(days=DEFAULT_DAYS))
    if start >= end:
        raise ApiError(400, "bad_request", "since must be before until")
    return start, end


def _zone(runtime: Runtime) -> tzinfo:
    try:
        return ZoneInfo(runtime.settings.timezone)
    except (ValueError, KeyError):
        return UTC


def _compute(engine: Engine, since: datetime, until: datetime,
             pathways: Sequence[Pathway]) -> OutcomeReport:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # One snapshot for every query of the report, and nothing written by mistake.
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            return outcome_report(conn, since=since, until=until, pathways=pathways)


async def _report(request: Request, since: str | None,
                  until: str | None) -> tuple[OutcomeReport, tzinfo]:
    runtime: Runtime = request.app.state.runtime
    zone = _zone(runtime)
    start, end = parse_period(since, until, zone, datetime.now(UTC))
    began = time.perf_counter()
    report = await asyncio.to_thread(_compute, runtime.engine, start, end,
                                     tuple(runtime.settings.pathways))
    log.info("outcomes_report", count=len(report.steps),
             elapsed_ms=round((time.perf_counter() - began) * 1000, 1))
    return report, zone


# ---------------------------------------------------------------------------------- routes


@router.get(
    "/outreach/outcomes",
    responses={400: {"description": "an unreadable or empty period"},
               401: {"description": "no or bad credentials"},
               403: {"description": "the client lacks outreach.read"}},
)
async def outreach_outcomes(
    request: Request, _client: OutreachReader, since: str | None = None,
    until: str | None = None,
) -> Response:
    """Per pathway and step: sent, delivered, failed, skipped and held (with reasons), replies,
    confirmations, cancellations, reschedules, rebookings, opt-outs, survey scores; appointment
    no-show rates of reminded against not-reminded; the waitlist; bookings. Every rate with its
    numerator and denominator; no patient identifiers."""
    report = (await _report(request, since, until))[0]
    return JSONResponse(report.to_json(), headers={"Cache-Control": "no-store"})


def _csv_cell(value: Any) -> Any:
    # A spreadsheet runs a cell starting with = + - @ as a formula: text cells are defused.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


@router.get("/console/outcomes.csv", include_in_schema=False)
async def console_outcomes_csv(
    request: Request, _reader: ConsoleReader, since: str | None = None,
    until: str | None = None, table: str = "steps",
) -> Response:
    if table not in CSV_TABLES:
        raise ApiError(400, "bad_request", f"table: one of {', '.join(CSV_TABLES)}")
    report, zone = await _report(request, since, until)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for row in report.to_csv_rows(table):
        writer.writerow([_csv_cell(v) for v in row])
    first = report.since.astimezone(zone).strftime("%Y%m%d")
    last = (report.until - timedelta(microseconds=1)).astimezone(zone).strftime("%Y%m%d")
    name = f"careloop-outcomes-{table}-{first}-{last}.csv"
    headers = {**CONSOLE_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/console/outcomes", include_in_schema=False)
async def console_outcomes(
    request: Request, reader: ConsoleReader, since: str | None = None,
    until: str | None = None,
) -> Response:
    report, zone = await _report(request, since, until)
    html = _page(report, zone, reader if isinstance(reader, Session) else None)
    return HTMLResponse(html, headers=CONSOLE_HEADERS)


# ------------------------------------------------------------------------- the HTML page


@dataclass(frozen=True)
class Bar:
    css: str
    series: str
    value: float
    text: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Group:
    label: str
    y: float
    label_y: float
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    description: str
    width: int
    height: int
    label_width: int
    plot_width: int
    series: tuple[tuple[str, str], ...]
    """(name, css class) of each series, for the legend."""
    groups: tuple[Group, ...]


_BAR, _GAP, _GROUP_GAP, _TOP = 14, 3, 14, 8
_LABEL_W, _PLOT_W, _TEXT_W = 280, 400, 150


def bar_chart(chart_id: str, title: str, description: str, series: Sequence[str],
              rows: Sequence[tuple[str, Sequence[tuple[float, str]]]], *,
              scale: float | None = None) -> Chart:
    """Horizontal grouped bars: one group per row label, one bar per series (value, text);
    the longest bar is ``scale`` (default: the largest value)."""
    top = scale or max((v for _label, bars in rows for v, _t in bars), default=0.0) or 1.0
    groups = []
    y = float(_TOP)
    for label, bars in rows:
        drawn = []
        start = y
        for i, (value, text) in enumerate(bars):
            width = round(_PLOT_W * max(value, 0.0) / top, 1)
            drawn.append(Bar(f"s{i % 6}", series[i], value, text, float(_LABEL_W), y,
                             width, float(_BAR)))
            y += _BAR + _GAP
        middle = start + (y - _GAP - start) / 2 + 4
        groups.append(Group(label, start, middle, tuple(drawn)))
        y += _GROUP_GAP
    height = int(y) + 4
    return Chart(chart_id, title, description, _LABEL_W + _PLOT_W + _TEXT_W, height, _LABEL_W,
                 _PLOT_W, tuple((s, f"s{i % 6}") for i, s in enumerate(series)),
                 tuple(groups))


def pct(rate: Rate) -> str:
    """ "83.3% (5 of 6)", or "– (0 of 0)" when there is nothing to divide by."""
    value = rate.value
    shown = "–" if value is None else f"{value * 100:.1f}%"
    return f"{shown} ({rate.numerator} of {rate.denominator})"


def _charts(report: OutcomeReport) -> list[Chart]:
    steps = report.steps
    label = [f"{s.pathway} · step {s.step}" for s in steps]
    charts = [
        bar_chart(
            "chart-messages", "Messages per step",
            "Sent, delivered, failed, and skipped or held touches of each pathway step.",
            ("sent", "delivered", "failed", "skipped or held"),
            [(label[i], [(s.sent, str(s.sent)), (s.delivered, str(s.delivered)),
                         (s.failed, str(s.failed)),
                         (s.skipped + s.held, str(s.skipped + s.held))])
             for i, s in enumerate(steps)]),
        bar_chart(
            "chart-responses", "What patients did, per step",
            "Touches replied to, confirmed, cancelled, rescheduled or rebooked, and opt-outs.",
            ("replied", "confirmed", "cancelled", "reschedule asked", "rebooked", "opted out"),
            [(label[i], [(s.replied, str(s.replied)), (s.confirmations, str(s.confirmations)),
                         (s.cancellations, str(s.cancellations)),
                         (s.reschedules, str(s.reschedules)),
                         (s.rebookings, str(s.rebookings)), (s.opt_outs, str(s.opt_outs))])
             for i, s in enumerate(steps)]),
    ]
    a = report.appointments
    noshow_rows = [("Reminded", a.reminded), ("Not reminded", a.not_reminded)] + [
        (f"Reminded by {name}", f) for name, f in sorted(a.by_pathway.items())]
    charts.append(bar_chart(
        "chart-noshow", "No-show rate",
        "No-shows among appointments with a final status, reminded against not reminded "
        "(the bar's full length is 100%).",
        ("no-show rate",),
        [(name, [((f.rate.value or 0.0) * 100, pct(f.rate))]) for name, f in noshow_rows],
        scale=100.0))
    w = report.waitlist
    charts.append(bar_chart(
        "chart-waitlist", "Waitlist",
        "Slots freed and filled, offers made and accepted.",
        ("count",),
        [("Slots freed", [(w.slots_freed, str(w.slots_freed))]),
         ("Slots filled", [(w.slots_filled, f"{w.slots_filled}, {pct(w.fill_rate)}")]),
         ("Offers made", [(w.offers, str(w.offers))]),
         ("Offers accepted", [(w.accepted, f"{w.accepted}, {pct(w.acceptance_rate)}")])]))
    return charts


_ENV: Environment | None = None


def _env() -> Environment:
    global _ENV  # noqa: PLW0603 - built once, on first use
    if _ENV is None:
        # The page extends the console's base.html (header, navigation, sign-out form).
        env = Environment(loader=ChoiceLoader([FileSystemLoader(TEMPLATES),
                                               FileSystemLoader(CONSOLE_TEMPLATES)]),
                          autoescape=select_autoescape(("html",), default=True),
                          trim_blocks=True, lstrip_blocks=True)
        env.globals["pct"] = pct
        _ENV = env
    return _ENV


def _page(report: OutcomeReport, zone: tzinfo, session: Session | None = None) -> str:
    """The HTML page; with a console ``session``, inside the console's navigation."""
    first = report.since.astimezone(zone)
    last = (report.until - timedelta(microseconds=1)).astimezone(zone)
    query = {"since": first.date().isoformat(), "until": last.date().isoformat()}
    exact = {"since": report.since.isoformat(), "until": report.until.isoformat()}
    return _env().get_template("outcomes.html").render(
        report=report,
        totals=report.totals,
        charts=_charts(report),
        css=Markup(CSS),  # noqa: S704 - a constant
        session=session,
        csrf=session.csrf if session is not None else "",
        active="outcomes",
        since_day=query["since"],
        until_day=query["until"],
        since_text=first.strftime("%Y-%m-%d %H:%M"),
        until_text=(report.until.astimezone(zone)).strftime("%Y-%m-%d %H:%M"),
        zone=str(zone),
        csv_links=[(table, "outcomes.csv?" + urlencode({**exact, "table": table}))
                   for table in CSV_TABLES],
        json_link="../outreach/outcomes?" + urlencode(exact),
    )
