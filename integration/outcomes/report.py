"""The outcome report: what each pathway step sent and what it changed, over a period.

:func:`outcome_report` runs a handful of ``GROUP BY`` queries (no per-row Python over touches)
and returns an :class:`OutcomeReport` of counts, each rate with its numerator and denominator.
It never reads or returns a patient id, name, address or clinical value: only pathway names,
step numbers, statuses, channels, counts and reasons scrubbed of anything that looks like a
number, a date or an address (:func:`scrub_reason`).

How things are counted (the period is ``[since, until)``, in UTC):

* **The touches of the period** (a cohort): touches whose ``sent_at`` is in the period, and
  touches never sent whose ``updated_at`` is (the moment they were skipped, held, failed or last
  rescheduled). Everything attributed to a touch below is counted when *that touch* is in the
  period, however much later the patient answered, so that each rate compares like with like.
* **sent**: ``sent_at`` set; **delivered**: sent and the provider's last receipt is
  ``delivered``; **failed**: status ``failed`` (never left) or a receipt ``failed`` /
  ``undelivered``; **attempted** = sent + failed without ``sent_at``; **skipped**: status
  ``skipped`` (the planner never scheduled it); **held**: status ``cancelled`` (the planner or
  the sender stopped it: opt-out, cancellation, quiet hours, too late...); **pending**:
  ``scheduled`` / ``sending``. The top reasons of skipped and held touches are listed.
* **replies**: inbound messages (``channel_events`` kind ``inbound``) and patient-page actions
  that made a request (kind ``portal`` with a ``patient_requests`` row), attributed to a touch by
  the event's ``touch_key`` or by the ``touch_key`` of the request the event made. An SMS that
  made no request (free text, STOP, HELP) has no touch key stored, so it is not counted here.
  ``replied`` counts the touches with at least one reply (the reply rate's numerator).
* **confirmations / cancellations / reschedules**: touches with at least one
  ``patient_requests`` row of that action carrying their key (SMS, voice or the page).
* **rebookings**: bookings ``booked`` that replaced an appointment (``old_entry_id``),
  attributed to the last touch sent about that appointment at or before the booking started;
  split by the booking's source (``portal`` | ``waitlist``).
* **opt-outs**: ``address_optouts`` rows (opt-outs still in force: a START removes the row),
  attributed to the last touch sent on that channel to that address at or before the opt-out
  (addresses compared through the indexed expression replies are matched with,
  :func:`integration.replies.matching.address_expr`, applied to both sides). Channel opt-outs
  chosen on the patient page (``patient_preferences``) carry no time and are not counted.
* **survey**: ``patient_requests`` of action ``survey`` with ``detail.score`` 0-10, one answer per
  touch (the latest); mean score and NPS = % promoters (9-10) - % detractors (0-6).
* **appointments**: appointment entries whose time is in the period and whose status is final:
  ``noshow``, or attended (``fulfilled``, ``arrived``, ``checked-in``); ``cancelled`` ones are
  left out. *Reminded* means at least one touch of an appointment pathway (``on =
  "appointment"``) was sent for the entry; with no pathways given, any touch sent before its
  start. The no-show rate of reminded and of not-reminded appointments, and per pathway.
* **waitlist**: offers by ``offered_at`` in the period (made, accepted, declined, expired, taken,
  still open); freed slots by ``freed_at`` in the period (filled, expired, withdrawn, still
  open), the fill rate, and the hours from ``freed_at`` to ``filled_at`` (median, mean).
* **bookings**: every booking attempt started in the period, by source and status.

SQLite keeps datetimes as naive UTC wall time: bounds are converted to UTC before binding, and
times read back are taken as UTC.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    String,
    and_,
    case,
    cast,
    distinct,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)

from integration.models import (
    address_optouts,
    bookings,
    channel_events,
    freed_slots,
    patient_requests,
    timeline_entries,
    touches,
    waitlist_offers,
)
from integration.outreach.pathways import Pathway, Trigger
from integration.replies.matching import address_expr

__all__ = [
    "ATTENDED",
    "AppointmentOutcome",
    "BookingCount",
    "NoShow",
    "OutcomeReport",
    "Rate",
    "ReasonCount",
    "StepOutcome",
    "SurveyFigures",
    "WaitlistOutcome",
    "outcome_report",
    "scrub_reason",
]

ATTENDED = ("fulfilled", "arrived", "checked-in")
"""Appointment statuses that mean the patient came."""
NOSHOW = "noshow"
HELD = ("skipped", "cancelled")
TOP_REASONS = 5
REASON_LENGTH = 120

_SCRUB = r"[^ ]*[0-9@#][^ ]*( +[^ ]*[0-9@#][^ ]*)*"
"""A run of words holding a digit, an ``@`` or a ``#`` (times, dates, counts, phone numbers,
email addresses; ``#`` is a digit PostgreSQL masked, see :func:`_reason_sql`)."""
_SCRUB_RE = re.compile(_SCRUB)
_PLACEHOLDER = "…"
_SQLITE_SCRUB = "careloop_scrub_reason"


def scrub_reason(reason: str | None) -> str:
    """A reason with every word holding a digit, ``#`` or ``@`` replaced by ``…``, cut to
    :data:`REASON_LENGTH`: "its time (2026-03-02T09:00:00+00:00) had passed" → "its time …
    had passed"."""
    return _SCRUB_RE.sub(_PLACEHOLDER, reason or "")[:REASON_LENGTH]


# ------------------------------------------------------------------------------ the figures


@dataclass(frozen=True)
class Rate:
    """A rate with what it is made of; ``value`` is None when the denominator is 0."""

    numerator: int
    denominator: int

    @property
    def value(self) -> float | None:
        if not self.denominator:
            return None
        return round(self.numerator / self.denominator, 4)

    def to_json(self) -> dict[str, Any]:
        return {"numerator": self.numerator, "denominator": self.denominator,
                "value": self.value}


@dataclass(frozen=True)
class ReasonCount:
    status: str
    """``skipped`` or ``cancelled`` (held)."""
    reason: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "count": self.count}


@dataclass
class SurveyFigures:
    answers: int = 0
    score_sum: float = 0.0
    promoters: int = 0
    passives: int = 0
    detractors: int = 0

    @property
    def mean(self) -> float | None:
        return round(self.score_sum / self.answers, 2) if self.answers else None

    @property
    def nps(self) -> float | None:
        if not self.answers:
            return None
        return round((self.promoters - self.detractors) * 100 / self.answers, 1)

    def add(self, other: SurveyFigures) -> None:
        self.answers += other.answers
        self.score_sum += other.score_sum
        self.promoters += other.promoters
        self.passives += other.passives
        self.detractors += other.detractors

    def to_json(self) -> dict[str, Any]:
        return {
            "answers": self.answers, "mean_score": self.mean, "nps": self.nps,
            "promoters": self.promoters, "passives": self.passives,
            "detractors": self.detractors,
            "promoter_rate": Rate(self.promoters, self.answers).to_json(),
            "detractor_rate": Rate(self.detractors, self.answers).to_json(),
        }


_STEP_COUNTS = ("touches", "sent", "delivered", "failed", "attempted", "skipped", "held",
                "pending", "replies", "replied", "confirmations", "cancellations",
                "reschedules", "rebookings_portal", "rebookings_waitlist", "opt_outs")


@dataclass
class StepOutcome:
    """One pathway step over the period (the totals row has pathway ``*`` and step -1)."""

    pathway: str
    step: int
    trigger: str | None = None
    touches: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    attempted: int = 0
    skipped: int = 0
    held: int = 0
    pending: int = 0
    replies: int = 0
    replied: int = 0
    confirmations: int = 0
    cancellations: int = 0
    reschedules: int = 0
    rebookings_portal: int = 0
    rebookings_waitlist: int = 0
    opt_outs: int = 0
    survey: SurveyFigures = field(default_factory=SurveyFigures)
    reasons: list[ReasonCount] = field(default_factory=list)

    @property
    def rebookings(self) -> int:
        return self.rebookings_portal + self.rebookings_waitlist

    def rates(self) -> dict[str, Rate]:
        return {
            "delivery": Rate(self.delivered, self.sent),
            "failure": Rate(self.failed, self.attempted),
            "reply": Rate(self.replied, self.sent),
            "confirmation": Rate(self.confirmations, self.sent),
            "cancellation": Rate(self.cancellations, self.sent),
            "reschedule": Rate(self.reschedules, self.sent),
            "rebooking": Rate(self.rebookings, self.sent),
            "opt_out": Rate(self.opt_outs, self.sent),
        }

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pathway": self.pathway, "step": self.step,
                               "trigger": self.trigger}
        for name in _STEP_COUNTS:
            if not name.startswith("rebookings_"):
                out[name] = getattr(self, name)
        out["rebookings"] = {"portal": self.rebookings_portal,
                             "waitlist": self.rebookings_waitlist, "total": self.rebookings}
        out["survey"] = self.survey.to_json() if self.survey.answers else None
        out["reasons"] = [r.to_json() for r in self.reasons]
        out["rates"] = {k: v.to_json() for k, v in self.rates().items()}
        return out


@dataclass
class NoShow:
    noshow: int = 0
    attended: int = 0

    @property
    def total(self) -> int:
        return self.noshow + self.attended

    @property
    def rate(self) -> Rate:
        return Rate(self.noshow, self.total)

    def to_json(self) -> dict[str, Any]:
        return {"noshow": self.noshow, "attended": self.attended, "total": self.total,
                "noshow_rate": self.rate.to_json()}


@dataclass
class AppointmentOutcome:
    reminded: NoShow = field(default_factory=NoShow)
    not_reminded: NoShow = field(default_factory=NoShow)
    by_pathway: dict[str, NoShow] = field(default_factory=dict)
    """Appointments reminded by at least one sent touch of that pathway."""
    reminder_pathways: tuple[str, ...] = ()
    """The pathways that count as reminders; empty: any touch sent before the start."""

    def to_json(self) -> dict[str, Any]:
        return {
            "reminded": self.reminded.to_json(),
            "not_reminded": self.not_reminded.to_json(),
            "by_pathway": [{"pathway": name, **figures.to_json()}
                           for name, figures in sorted(self.by_pathway.items())],
            "reminder_pathways": list(self.reminder_pathways),
            "reminded_means": (
                "at least one touch of these pathways was sent for the appointment"
                if self.reminder_pathways
                else "at least one touch was sent for the appointment before its start"),
        }


@dataclass
class WaitlistOutcome:
    offers: int = 0
    accepted: int = 0
    declined: int = 0
    expired_offers: int = 0
    taken: int = 0
    open_offers: int = 0
    slots_freed: int = 0
    slots_filled: int = 0
    slots_expired: int = 0
    slots_withdrawn: int = 0
    slots_open: int = 0
    hours_to_fill: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> Rate:
        return Rate(self.accepted, self.offers)

    @property
    def fill_rate(self) -> Rate:
        return Rate(self.slots_filled, self.slots_freed)

    @property
    def hours_median(self) -> float | None:
        return round(statistics.median(self.hours_to_fill), 2) if self.hours_to_fill else None

    @property
    def hours_mean(self) -> float | None:
        return round(statistics.fmean(self.hours_to_fill), 2) if self.hours_to_fill else None

    def to_json(self) -> dict[str, Any]:
        return {
            "offers": self.offers, "accepted": self.accepted, "declined": self.declined,
            "expired_offers": self.expired_offers, "taken": self.taken,
            "open_offers": self.open_offers,
            "acceptance_rate": self.acceptance_rate.to_json(),
            "slots_freed": self.slots_freed, "slots_filled": self.slots_filled,
            "slots_expired": self.slots_expired, "slots_withdrawn": self.slots_withdrawn,
            "slots_open": self.slots_open, "fill_rate": self.fill_rate.to_json(),
            "hours_to_fill": {"count": len(self.hours_to_fill), "median": self.hours_median,
                              "mean": self.hours_mean},
        }


@dataclass(frozen=True, order=True)
class BookingCount:
    source: str
    status: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "count": self.count}


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


CSV_TABLES = ("steps", "appointments", "waitlist", "bookings")


@dataclass
class OutcomeReport:
    since: datetime
    until: datetime
    steps: list[StepOutcome]
    appointments: AppointmentOutcome
    waitlist: WaitlistOutcome
    bookings: list[BookingCount]

    @property
    def totals(self) -> StepOutcome:
        total = StepOutcome("*", -1)
        reasons: dict[tuple[str, str], int] = defaultdict(int)
        for step in self.steps:
            for name in _STEP_COUNTS:
                setattr(total, name, getattr(total, name) + getattr(step, name))
            total.survey.add(step.survey)
            for r in step.reasons:
                reasons[r.status, r.reason] += r.count
        total.reasons = _top(reasons)
        return total

    def to_json(self) -> dict[str, Any]:
        totals = self.totals.to_json()
        for key in ("pathway", "step", "trigger"):
            totals.pop(key)
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "steps": [s.to_json() for s in self.steps],
            "totals": totals,
            "appointments": self.appointments.to_json(),
            "waitlist": self.waitlist.to_json(),
            "bookings": [b.to_json() for b in self.bookings],
        }

    def to_csv_rows(self, table: str = "steps") -> list[list[Any]]:
        """A header and rows: ``steps`` (one row per pathway step), ``appointments``,
        ``waitlist`` or ``bookings``."""
        if table == "steps":
            return _steps_csv(self.steps)
        if table == "appointments":
            a = self.appointments
            rows: list[list[Any]] = [["group", "noshow", "attended", "total", "noshow_rate"]]
            groups = [("reminded", a.reminded), ("not reminded", a.not_reminded)] + [
                (f"reminded by {name}", f) for name, f in sorted(a.by_pathway.items())]
            rows += [[g, f.noshow, f.attended, f.total, f.rate.value] for g, f in groups]
            return rows
        if table == "waitlist":
            w = self.waitlist
            return [
                ["figure", "value", "numerator", "denominator"],
                ["offers", w.offers, None, None],
                ["accepted", w.accepted, None, None],
                ["declined", w.declined, None, None],
                ["expired offers", w.expired_offers, None, None],
                ["taken", w.taken, None, None],
                ["open offers", w.open_offers, None, None],
                ["acceptance rate", w.acceptance_rate.value, w.accepted, w.offers],
                ["slots freed", w.slots_freed, None, None],
                ["slots filled", w.slots_filled, None, None],
                ["slots expired", w.slots_expired, None, None],
                ["slots withdrawn", w.slots_withdrawn, None, None],
                ["slots open", w.slots_open, None, None],
                ["fill rate", w.fill_rate.value, w.slots_filled, w.slots_freed],
                ["hours to fill (median)", w.hours_median, None, len(w.hours_to_fill)],
                ["hours to fill (mean)", w.hours_mean, None, len(w.hours_to_fill)],
            ]
        if table == "bookings":
            return [["source", "status", "count"]] + [
                [b.source, b.status, b.count] for b in self.bookings]
        raise ValueError(f"table must be one of {', '.join(CSV_TABLES)}")


_CSV_STEP_HEADER = [
    "pathway", "step", "trigger", "touches", "sent", "delivered", "delivery_rate", "failed",
    "attempted", "failure_rate", "skipped", "held", "pending", "replies", "replied",
    "reply_rate", "confirmations", "confirmation_rate", "cancellations", "cancellation_rate",
    "reschedules", "reschedule_rate", "rebookings_portal", "rebookings_waitlist",
    "rebooking_rate", "opt_outs", "opt_out_rate", "survey_answers", "survey_mean_score",
    "survey_promoters", "survey_passives", "survey_detractors", "nps", "top_reasons",
]


def _steps_csv(steps: Sequence[StepOutcome]) -> list[list[Any]]:
    rows: list[list[Any]] = [list(_CSV_STEP_HEADER)]
    for s in steps:
        r = s.rates()
        rows.append([
            s.pathway, s.step, s.trigger or "", s.touches, s.sent, s.delivered,
            r["delivery"].value, s.failed, s.attempted, r["failure"].value, s.skipped, s.held,
            s.pending, s.replies, s.replied, r["reply"].value, s.confirmations,
            r["confirmation"].value, s.cancellations, r["cancellation"].value, s.reschedules,
            r["reschedule"].value, s.rebookings_portal, s.rebookings_waitlist,
            r["rebooking"].value, s.opt_outs, r["opt_out"].value, s.survey.answers,
            s.survey.mean, s.survey.promoters, s.survey.passives, s.survey.detractors,
            s.survey.nps,
            "; ".join(f"{x.status}: {x.reason} ({x.count})" for x in s.reasons),
        ])
    return rows


def _top(reasons: Mapping[tuple[str, str], int]) -> list[ReasonCount]:
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return [ReasonCount(status, reason, n) for (status, reason), n in ranked[:TOP_REASONS]]


# ------------------------------------------------------------------------------ the queries


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: Any, since: datetime, until: datetime) -> ColumnElement[bool]:
    return and_(column >= since, column < until)


def _touch_in_period(since: datetime, until: datetime) -> ColumnElement[bool]:
    t = touches
    return or_(
        _in(t.c.sent_at, since, until),
        and_(t.c.sent_at.is_(None), _in(t.c.updated_at, since, until)),
    )


def _reason_sql(conn: Connection, column: Any) -> ColumnElement[str]:
    """A reason as the database groups it: on PostgreSQL with every digit masked as ``#``
    (``translate``: much cheaper than a regular expression on every row, and enough to put
    "due 2026-03-02T09:00" and "due 2026-03-09T10:00" in one group, which
    :func:`scrub_reason` then finishes); on SQLite scrubbed by :func:`scrub_reason` itself."""
    if conn.dialect.name == "postgresql":
        return func.translate(column, literal("0123456789"), literal("#" * 10))
    driver: Any = conn.connection.driver_connection
    driver.create_function(_SQLITE_SCRUB, 1, scrub_reason, deterministic=True)
    return getattr(func, _SQLITE_SCRUB)(column)  # type: ignore[no-any-return]


def _step(steps: dict[tuple[str, int], StepOutcome], pathway: str, step: int) -> StepOutcome:
    key = (str(pathway), int(step))
    found = steps.get(key)
    if found is None:
        found = steps[key] = StepOutcome(*key)
    return found


def _touch_counts(conn: Connection, steps: dict[tuple[str, int], StepOutcome],
                  since: datetime, until: datetime) -> None:
    """The period's touches by step, status, sent or not and delivery receipt; then the
    reasons of the skipped and held ones. Two statements: grouped on plain columns, the
    first is estimated at a few hundred groups and hashed in memory, where one statement that
    also grouped by a computed reason would be sorted on disk."""
    t = touches
    counts = (
        select(t.c.pathway, t.c.step, t.c.status, t.c.sent_at.is_(None).label("unsent"),
               t.c.delivery, func.count().label("n"))
        .where(_touch_in_period(since, until))
        .group_by(t.c.pathway, t.c.step, t.c.status, t.c.sent_at.is_(None), t.c.delivery)
    )
    for r in conn.execute(counts):
        s = _step(steps, r.pathway, r.step)
        n = int(r.n)
        s.touches += n
        sent = not r.unsent
        if sent:
            s.sent += n
            if r.delivery == "delivered":
                s.delivered += n
        failed = r.status == "failed" or r.delivery in ("failed", "undelivered")
        if failed:
            s.failed += n
        if sent or failed:
            s.attempted += n
        if r.status == "skipped":
            s.skipped += n
        elif r.status == "cancelled":
            s.held += n
        elif r.status in ("scheduled", "sending") and not sent:
            s.pending += n
    inner = (
        select(t.c.pathway, t.c.step, t.c.status,
               _reason_sql(conn, func.coalesce(t.c.reason, "")).label("reason"))
        .where(t.c.status.in_(HELD), _touch_in_period(since, until))
        .subquery()
    )
    held = (
        select(inner.c.pathway, inner.c.step, inner.c.status, inner.c.reason,
               func.count().label("n"))
        .group_by(inner.c.pathway, inner.c.step, inner.c.status, inner.c.reason)
    )
    reasons: dict[tuple[str, int], dict[tuple[str, str], int]] = defaultdict(
        lambda: defaultdict(int))
    for r in conn.execute(held):
        reasons[str(r.pathway), int(r.step)][r.status, scrub_reason(r.reason)] += int(r.n)
    for key, counted in reasons.items():
        _step(steps, *key).reasons = _top(counted)


def _answers(conn: Connection, steps: dict[tuple[str, int], StepOutcome],
             since: datetime, until: datetime) -> None:
    """Replies, requests and survey answers, attributed to the touch they carry the key of:
    one statement, which looks up each touch once (by its unique key) however many things
    answered it."""
    ce, pr, t = channel_events, patient_requests, touches
    if conn.dialect.name == "postgresql":
        numeric = func.json_typeof(pr.c.detail["score"]) == "number"
    else:
        numeric = func.json_type(pr.c.detail, "$.score").in_(("integer", "real"))
    no_score = cast(null(), Float).label("score")
    replies = (
        select(func.coalesce(ce.c.touch_key, pr.c.touch_key).label("touch_key"),
               literal("reply").label("what"), ce.c.id.label("ref"), no_score)
        .select_from(ce.outerjoin(pr, pr.c.event_id == ce.c.id))
        .where(or_(ce.c.kind == "inbound", and_(ce.c.kind == "portal", pr.c.id.is_not(None))),
               ce.c.received_at >= since)  # an answer to a touch of the period comes after it
    )
    requests = (
        select(pr.c.touch_key, pr.c.action.label("what"), pr.c.id.label("ref"), no_score)
        .where(pr.c.action.in_(("confirm", "cancel", "reschedule")),
               pr.c.touch_key.is_not(None), pr.c.created_at >= since)
    )
    latest = (
        select(func.max(pr.c.id).label("id"))
        .where(pr.c.action == "survey", pr.c.touch_key.is_not(None),
               pr.c.created_at >= since)
        .group_by(pr.c.touch_key)
        .subquery()
    )
    surveys = (
        select(pr.c.touch_key, literal("survey").label("what"), pr.c.id.label("ref"),
               case((numeric, pr.c.detail["score"].as_float()), else_=None).label("score"))
        .select_from(pr.join(latest, latest.c.id == pr.c.id))
    )
    answers = union_all(replies, requests, surveys).cte("answers")
    attributed = (
        select(t.c.key, t.c.id, t.c.pathway, t.c.step)
        .where(t.c.key.in_(select(answers.c.touch_key)), _touch_in_period(since, until))
        .cte("attributed")
    )
    score = answers.c.score
    valid = and_(score >= 0, score <= 10)
    query = (
        select(
            attributed.c.pathway, attributed.c.step, answers.c.what,
            func.count(distinct(answers.c.ref)).label("things"),
            func.count(distinct(attributed.c.id)).label("touches"),
            func.sum(case((valid, 1), else_=0)).label("answers"),
            func.sum(case((valid, score), else_=0)).label("score_sum"),
            func.sum(case((and_(valid, score >= 9), 1), else_=0)).label("promoters"),
            func.sum(case((and_(valid, score > 6, score < 9), 1), else_=0)).label("passives"),
            func.sum(case((and_(valid, score <= 6), 1), else_=0)).label("detractors"),
        )
        .select_from(answers.join(attributed, attributed.c.key == answers.c.touch_key))
        .group_by(attributed.c.pathway, attributed.c.step, answers.c.what)
    )
    field_of = {"confirm": "confirmations", "cancel": "cancellations",
                "reschedule": "reschedules"}
    for r in conn.execute(query):
        s = _step(steps, r.pathway, r.step)
        if r.what == "reply":
            s.replies += int(r.things)
            s.replied += int(r.touches)
        elif r.what in field_of:
            name = field_of[r.what]
            setattr(s, name, getattr(s, name) + int(r.touches))
        elif r.what == "survey" and r.answers:
            s.survey.add(SurveyFigures(int(r.answers), float(r.score_sum or 0),
                                       int(r.promoters or 0), int(r.passives or 0),
                                       int(r.detractors or 0)))


def _rebookings(conn: Connection, steps: dict[tuple[str, int], StepOutcome],
                since: datetime, until: datetime) -> None:
    b, t = bookings, touches
    ranked = (
        select(
            b.c.source, t.c.pathway, t.c.step, t.c.sent_at,
            func.row_number().over(partition_by=b.c.id,
                                   order_by=(t.c.sent_at.desc(), t.c.id.desc())).label("rn"),
        )
        .select_from(b.join(t, and_(t.c.entry_id == b.c.old_entry_id,
                                    t.c.sent_at.is_not(None),
                                    t.c.sent_at <= b.c.started_at)))
        .where(b.c.status == "booked", b.c.old_entry_id.is_not(None),
               b.c.started_at >= since)
        .subquery()
    )
    query = (
        select(ranked.c.pathway, ranked.c.step, ranked.c.source, func.count().label("n"))
        .where(ranked.c.rn == 1, _in(ranked.c.sent_at, since, until))
        .group_by(ranked.c.pathway, ranked.c.step, ranked.c.source)
    )
    for r in conn.execute(query):
        s = _step(steps, r.pathway, r.step)
        if r.source == "waitlist":
            s.rebookings_waitlist += int(r.n)
        else:
            s.rebookings_portal += int(r.n)


def _opt_outs(conn: Connection, steps: dict[tuple[str, int], StepOutcome],
              since: datetime, until: datetime) -> None:
    o, t = address_optouts, touches
    ranked = (
        select(
            t.c.pathway, t.c.step, t.c.sent_at,
            func.row_number().over(partition_by=(o.c.channel, o.c.address),
                                   order_by=(t.c.sent_at.desc(), t.c.id.desc())).label("rn"),
        )
        .select_from(o.join(t, and_(t.c.channel == o.c.channel,
                                    # both sides as the index has it (an email keeps
                                    # no dots there, so the opt-out's address loses them too)
                                    address_expr(t.c.address) == address_expr(o.c.address),
                                    t.c.sent_at.is_not(None),
                                    t.c.sent_at <= o.c.at)))
        .where(o.c.at >= since)
        .subquery()
    )
    query = (
        select(ranked.c.pathway, ranked.c.step, func.count().label("n"))
        .where(ranked.c.rn == 1, _in(ranked.c.sent_at, since, until))
        .group_by(ranked.c.pathway, ranked.c.step)
    )
    for r in conn.execute(query):
        _step(steps, r.pathway, r.step).opt_outs += int(r.n)


def _appointments(conn: Connection, since: datetime, until: datetime,
                  reminder_pathways: tuple[str, ...]) -> AppointmentOutcome:
    """One statement: each final appointment of the period with the reminder pathways sent
    for it (none: not reminded), counted per pathway and, once per appointment, overall."""
    e, t = timeline_entries, touches
    final = (NOSHOW, *ATTENDED)
    outcome = AppointmentOutcome(reminder_pathways=reminder_pathways)
    sent = [t.c.entry_id == e.c.id, t.c.sent_at.is_not(None)]
    if reminder_pathways:
        sent.append(t.c.pathway.in_(reminder_pathways))
    else:
        sent.append(t.c.sent_at <= e.c.time)
    pairs = (
        select(e.c.id, e.c.status, t.c.pathway)
        .select_from(e.outerjoin(t, and_(*sent)))
        .where(e.c.kind == "appointment", _in(e.c.time, since, until), e.c.status.in_(final))
        .distinct()
        .cte("pairs")
    )
    query = union_all(
        select(pairs.c.status, pairs.c.pathway, literal(0).label("overall"),
               func.count().label("n"))
        .group_by(pairs.c.status, pairs.c.pathway),
        select(pairs.c.status, cast(null(), String).label("pathway"), literal(1).label("overall"),
               func.count(distinct(pairs.c.id)).label("n"))
        .where(pairs.c.pathway.is_not(None))
        .group_by(pairs.c.status),
    )
    reminded_total: dict[str, int] = defaultdict(int)
    for r in conn.execute(query):
        n = int(r.n)
        if r.overall:
            reminded_total[r.status] += n
            continue
        if r.pathway is None:
            figures = outcome.not_reminded
        else:
            figures = outcome.by_pathway.setdefault(str(r.pathway), NoShow())
        if r.status == NOSHOW:
            figures.noshow += n
        else:
            figures.attended += n
    for status, n in reminded_total.items():
        if status == NOSHOW:
            outcome.reminded.noshow += n
        else:
            outcome.reminded.attended += n
    return outcome


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _waitlist(conn: Connection, since: datetime, until: datetime) -> WaitlistOutcome:
    wo, fs = waitlist_offers, freed_slots
    out = WaitlistOutcome()
    offer_fields = {"accepted": "accepted", "declined": "declined",
                    "expired": "expired_offers", "taken": "taken", "offered": "open_offers"}
    for r in conn.execute(
        select(wo.c.status, func.count().label("n"))
        .where(_in(wo.c.offered_at, since, until)).group_by(wo.c.status)
    ):
        out.offers += int(r.n)
        name = offer_fields.get(r.status)
        if name is not None:
            setattr(out, name, getattr(out, name) + int(r.n))
    for r in conn.execute(
        select(fs.c.status, func.count().label("n"))
        .where(_in(fs.c.freed_at, since, until)).group_by(fs.c.status)
    ):
        n = int(r.n)
        out.slots_freed += n
        if r.status == "filled":
            out.slots_filled += n
        elif r.status == "expired":
            out.slots_expired += n
        elif r.status == "withdrawn":
            out.slots_withdrawn += n
        else:  # open | offering
            out.slots_open += n
    for r in conn.execute(
        select(fs.c.freed_at, fs.c.filled_at)
        .where(_in(fs.c.freed_at, since, until), fs.c.status == "filled",
               fs.c.filled_at.is_not(None))
    ):
        hours = (_aware(r.filled_at) - _aware(r.freed_at)).total_seconds() / 3600
        out.hours_to_fill.append(max(hours, 0.0))
    out.hours_to_fill.sort()
    return out


def _bookings(conn: Connection, since: datetime, until: datetime) -> list[BookingCount]:
    b = bookings
    rows = conn.execute(
        select(b.c.source, b.c.status, func.count().label("n"))
        .where(_in(b.c.started_at, since, until))
        .group_by(b.c.source, b.c.status)
    )
    return sorted(BookingCount(str(r.source), str(r.status), int(r.n)) for r in rows)


def outcome_report(
    conn: Connection,
    *,
    since: datetime,
    until: datetime,
    pathways: Iterable[Pathway] = (),
) -> OutcomeReport:
    """The outcomes of ``[since, until)`` (see the module docstring for every definition).

    ``pathways`` (the configured ones) name the steps to list even when nothing happened,
    each step's trigger, and which pathways count as appointment reminders. On PostgreSQL,
    run it in a transaction (``REPEATABLE READ`` gives every query the same snapshot): it sets
    ``work_mem`` and ``jit`` for that transaction only (``SET LOCAL``).
    """
    since, until = _utc(since), _utc(until)
    if since >= until:
        raise ValueError("since must be before until")
    configured = tuple(pathways)
    if conn.dialect.name == "postgresql":
        # For this transaction only: the few large aggregates hash in memory rather than sort
        # on disk, and JIT compilation (tens of ms per statement) would cost more than it saves.
        conn.exec_driver_sql("SET LOCAL work_mem = '32MB'")
        conn.exec_driver_sql("SET LOCAL jit = off")
    steps: dict[tuple[str, int], StepOutcome] = {}
    for p in configured:
        for index in range(len(p.steps)):
            _step(steps, p.name, index).trigger = p.on.value
    _touch_counts(conn, steps, since, until)
    _answers(conn, steps, since, until)
    _rebookings(conn, steps, since, until)
    _opt_outs(conn, steps, since, until)
    reminders = tuple(sorted(p.name for p in configured if p.on is Trigger.APPOINTMENT))
    return OutcomeReport(
        since=since,
        until=until,
        steps=[steps[k] for k in sorted(steps)],
        appointments=_appointments(conn, since, until, reminders),
        waitlist=_waitlist(conn, since, until),
        bookings=_bookings(conn, since, until),
    )
