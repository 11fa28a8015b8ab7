"""Outreach: ``GET /console/outreach`` (role ``viewer``; counts, no patient data).

Per pathway, over a window (``?window=24h``, the default, or ``7d``): touches due (scheduled,
overdue or due within the next 24 hours, whatever the window), sent, delivered and delivery
failed (the provider's last receipt, ``touches.delivery``), failed (never left: a channel or
template error, an interrupted send), and suppressed (skipped or cancelled: the planner or the
send-time check held them back) with the reason grouped by its stable beginning
(:data:`REASON_GROUPS`: the texts of :mod:`integration.outreach.planner`,
:mod:`integration.outreach.policy`, :mod:`integration.outreach.sender`,
:mod:`integration.outreach.reconciler` and :mod:`integration.replies.effects`, with or
without the sender's ``at send time:`` prefix). A chart shows touches sent per hour.

The failed touches are listed with their ids and the kind of failure; the failure's own text
can name an address (an SMTP server's answer quotes the recipient), so it is shown only to
people with PHI access, and showing it writes a ``console.phi_view`` audit row (target
``touch``) listing the touches. Grouping happens in SQL; touches that were never sent are
found through the partial index on ``updated_at``.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from markupsafe import Markup
from sqlalchemy import Engine, case, func, literal, or_, select
from sqlalchemy.exc import SQLAlchemyError

from integration.console.auth import Session, Viewer, now_for, record_view, runtime_of
from integration.console.charts import bucket_key, bucket_starts, column_chart, series
from integration.console.render import ConsoleError, render
from integration.models import touches

__all__ = ["FAILURE_GROUPS", "REASON_GROUPS", "WINDOWS", "OutreachFigures", "figures",
           "router"]

router = APIRouter(include_in_schema=False, tags=["console"])

WINDOWS = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}
DUE_AHEAD = timedelta(hours=24)
FAILED_LIMIT = 50
SEND_PREFIX = "at send time: "

REASON_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("opted-out", "opted out", ("%opted out%",)),
    ("quiet-hours", "quiet hours", ("quiet hours%",)),
    ("daily-cap", "daily cap reached", ("cap: % already on %",)),
    ("weekly-cap", "weekly cap reached", ("cap: more than %",)),
    ("too-late", "too late", ("too late%", "its time (%) had passed%")),
    ("patient-request", "the patient asked to cancel or reschedule",
     ("the patient asked to %",)),
    ("no-contact", "no contact on the channel", ("no % contact", "no channel%")),
    ("stale", "stale or cancelled (the entry changed)",
     ("status % is not one of %", "the entry is no longer%", "no longer planned%",
      "the % has not ended%", "the order is %", "the care plan is %",
      "the appointment has no start time", "the visit has no end time")),
    ("already-sent", "already sent", ("already sent%",)),
    ("not-applicable", "the pathway does not apply",
     ("service type does not match", "location does not match", "not an appointment",
      "not a medication order", "not a care plan", "no refills remain",
      "no expected supply duration", "no dispense or start date",
      "the prescription expires before the supply runs out")),
)
"""Suppression reasons: (key, what it means, ``LIKE`` patterns of the reason texts). The
first group whose pattern matches wins; a reason matching none is ``other``."""

FAILURE_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("channel", "the channel refused or failed", ("channel:%",)),
    ("template", "the message could not be rendered", ("template:%",)),
    ("interrupted", "an interrupted send (outcome unknown, not repeated)",
     ("interrupted send%", "interrupted sends%")),
)
"""Why touches failed, as grouped for people without PHI access."""

_LABELS = {key: label for key, label, _ in (*REASON_GROUPS, *FAILURE_GROUPS)}
_LABELS["other"] = "other"
_FAILED_DELIVERY = ("failed", "undelivered")


def _grouping(column: Any, groups: tuple[tuple[str, str, tuple[str, ...]], ...]) -> Any:
    whens = []
    for key, _label, patterns in groups:
        likes = [column.like(p) for p in patterns]
        likes += [column.like(SEND_PREFIX + p) for p in patterns]
        whens.append((or_(*likes), literal(key)))
    return case(*whens, else_=literal("other"))


def reason_group(reason: str | None) -> str:
    """The group key of a suppression reason, as the SQL grouping decides it (for tests and
    for rows already read)."""
    return _classify(reason, REASON_GROUPS)


def failure_group(reason: str | None) -> str:
    """The group key of a failure reason."""
    return _classify(reason, FAILURE_GROUPS)


def _like(text: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(text, pattern.replace("[", "[[]").replace("%", "*")
                               .replace("_", "?"))


def _classify(reason: str | None, groups: tuple[tuple[str, str, tuple[str, ...]], ...]) -> str:
    text = reason or ""
    for key, _label, patterns in groups:
        for p in patterns:
            if _like(text, p) or _like(text, SEND_PREFIX + p):
                return key
    return "other"


@dataclass
class PathwayFigures:
    """One pathway's counts."""

    pathway: str
    overdue: int = 0
    due_soon: int = 0
    sent: int = 0
    delivered: int = 0
    delivery_failed: int = 0
    failed: int = 0
    suppressed: int = 0


@dataclass(frozen=True)
class FailedTouch:
    id: int
    pathway: str
    step: int
    channel: str
    at: datetime
    group: str
    reason: str
    """The stored text: shown only to people with PHI access."""


@dataclass
class OutreachFigures:
    window: str
    since: datetime
    now: datetime
    pathways: list[PathwayFigures]
    totals: PathwayFigures
    suppressed: list[tuple[str, str, int]]
    """(group key, label, touches), most first."""
    suppressed_by_pathway: list[tuple[str, str, str, int]]
    """(pathway, group key, label, touches)."""
    sent_per_hour: list[Any] = field(default_factory=list)
    failed: list[FailedTouch] = field(default_factory=list)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def figures(engine: Engine, now: datetime, window: str) -> OutreachFigures:
    """The page's counts for ``window`` (a key of :data:`WINDOWS`) before ``now``."""
    since = now - WINDOWS[window]
    hours = bucket_starts(now, "hour", int(WINDOWS[window].total_seconds() // 3600))
    t = touches
    rows: dict[str, PathwayFigures] = {}

    def of(name: str) -> PathwayFigures:
        return rows.setdefault(name, PathwayFigures(name))

    unsent = (t.c.sent_at.is_(None), t.c.updated_at >= since)
    with engine.connect() as conn:
        for name, overdue, n in conn.execute(
                select(t.c.pathway, func.sum(case((t.c.due_at <= now, 1), else_=0)),
                       func.count())
                .where(t.c.status == "scheduled", t.c.due_at < now + DUE_AHEAD)
                .group_by(t.c.pathway)):
            of(name).overdue, of(name).due_soon = int(overdue or 0), int(n) - int(overdue or 0)
        for name, n, delivered, undelivered in conn.execute(
                select(t.c.pathway, func.count(),
                       func.sum(case((t.c.delivery == "delivered", 1), else_=0)),
                       func.sum(case((t.c.delivery.in_(_FAILED_DELIVERY), 1), else_=0)))
                .where(t.c.sent_at >= since).group_by(t.c.pathway)):
            row = of(name)
            row.sent, row.delivered = int(n), int(delivered or 0)
            row.delivery_failed = int(undelivered or 0)
        for name, n in conn.execute(
                select(t.c.pathway, func.count()).where(t.c.status == "failed", *unsent)
                .group_by(t.c.pathway)):
            of(name).failed = int(n)
        grouped = (select(t.c.pathway.label("pathway"),
                          _grouping(t.c.reason, REASON_GROUPS).label("grp"))
                   .where(t.c.status.in_(("skipped", "cancelled")), *unsent).subquery())
        by_pathway = [
            (str(name), str(grp), int(n)) for name, grp, n in conn.execute(
                select(grouped.c.pathway, grouped.c.grp, func.count())
                .group_by(grouped.c.pathway, grouped.c.grp))
        ]
        hour = bucket_key(conn.dialect.name, t.c.sent_at, "hour")
        per_hour = {key: int(n) for key, n in conn.execute(
            select(hour, func.count()).where(t.c.sent_at >= hours[0]).group_by(hour))}
        failed = [
            FailedTouch(int(r.id), r.pathway, int(r.step), r.channel or "",
                        _aware(r.updated_at), failure_group(r.reason), r.reason or "")
            for r in conn.execute(
                select(t.c.id, t.c.pathway, t.c.step, t.c.channel, t.c.updated_at, t.c.reason)
                .where(t.c.status == "failed", *unsent)
                .order_by(t.c.updated_at.desc(), t.c.id.desc()).limit(FAILED_LIMIT))
        ]
    totals_by_group: dict[str, int] = defaultdict(int)
    for name, grp, n in by_pathway:
        of(name).suppressed += n
        totals_by_group[grp] += n
    pathways = sorted(rows.values(), key=lambda r: r.pathway)
    totals = PathwayFigures("all pathways")
    for r in pathways:
        for attr in ("overdue", "due_soon", "sent", "delivered", "delivery_failed", "failed",
                     "suppressed"):
            setattr(totals, attr, getattr(totals, attr) + getattr(r, attr))
    return OutreachFigures(
        window=window, since=since, now=now, pathways=pathways, totals=totals,
        suppressed=sorted(((g, _LABELS.get(g, g), n) for g, n in totals_by_group.items()),
                          key=lambda x: (-x[2], x[0])),
        suppressed_by_pathway=sorted((p, g, _LABELS.get(g, g), n) for p, g, n in by_pathway),
        sent_per_hour=series(per_hour, hours, "hour"),
        failed=failed,
    )


def _audit_reasons(engine: Engine, session: Session, ids: list[int], now: datetime) -> None:
    try:
        record_view(engine, session, "touch", "failed", now=now,
                    detail={"touches": ids, "shown": "failure reasons"})
    except SQLAlchemyError:
        raise ConsoleError(503, "Not available",
                           "The view could not be recorded in the audit log, so it is not "
                           "shown. Try again in a moment.") from None


@router.get("/console/outreach")
async def console_outreach(request: Request, session: Viewer, window: str = "24h") -> Response:
    """Touches per pathway (table ``pathways``), suppression reasons (``suppressed``,
    ``suppressed-pathways``), sent per hour (chart ``chart-sent``) and failed touches
    (``failed``)."""
    if window not in WINDOWS:
        raise ConsoleError(400, "Unknown window", f"window is one of {', '.join(WINDOWS)}.")
    engine = runtime_of(request).engine
    now = now_for(request)
    f = await asyncio.to_thread(figures, engine, now, window)
    if session.person.phi and f.failed:
        await asyncio.to_thread(_audit_reasons, engine, session, [x.id for x in f.failed], now)
    span = "24 hours" if window == "24h" else "7 days"
    chart: Markup = column_chart(
        "chart-sent", f"Touches sent per hour, the last {span}", f.sent_per_hour,
        unit="touches", max_ticks=6 if window == "24h" else 7,
        note="Whole clock hours in UTC; the last one is still filling.")
    return render("outreach.html", session=session, active="outreach", f=f, chart=chart,
                  windows=WINDOWS, span=span, labels=_LABELS, failed_limit=FAILED_LIMIT)
