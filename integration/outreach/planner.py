"""The outreach planner: which touches should exist for one timeline entry, now.

Pure: (pathways, a timeline entry, the patient, the patient's other touches, now) → touches
and skipped steps, each skip with its reason. It knows nothing of the database or the clock;
the reconciler compares its answer with the touches already stored and schedules, moves or
cancels the difference, and the sender asks it again at the moment of sending (DESIGN
invariant 4, checked twice).

Each touch carries an idempotency key (pathway, step, entry, and for care plans the activity),
so planning the same state twice gives the same keys, and a touch already sent is never planned
again: a step is sent at most once per entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

from integration.outreach.pathways import OutreachSettings, Pathway, Trigger
from integration.outreach.policy import (
    Recipient,
    cap_reached,
    choose_channel,
    choose_language,
    next_allowed,
)

__all__ = ["Entry", "Plan", "Skip", "Touch", "moments", "plan"]


@dataclass(frozen=True)
class Entry:
    """A timeline entry as the planner reads it (INTERFACE.md "Timeline entry")."""

    id: str
    patient_id: str
    kind: str
    status: str
    time: datetime | None = None
    end: datetime | None = None
    resource: Mapping[str, Any] = field(default_factory=dict)
    last_dispense: datetime | None = None
    """For medication orders: when it was last dispensed (a MedicationDispense on the
    timeline), which restarts the supply clock."""
    held: str | None = None
    """Why the patient's own request stops outreach about this entry ("the patient asked to
    cancel"), or None. Holds every pathway but visit-end ones (a visit that happened anyway
    still gets its follow-up)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        def when(value: object) -> datetime | None:
            if not isinstance(value, str) or not value:
                return None
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

        return cls(
            id=str(data["id"]),
            patient_id=str(data["patient_id"]),
            kind=str(data["kind"]),
            status=str(data.get("status") or ""),
            time=when(data.get("time")),
            end=when(data.get("end")),
            resource=data.get("resource") or {},
        )


@dataclass(frozen=True)
class Touch:
    key: str
    pathway: str
    step: int
    entry_id: str
    patient_id: str
    due_at: datetime
    moment: datetime
    """What the step is relative to (the appointment start, the visit end...)."""
    channel: str
    address: str
    language: str
    template: str
    moved: str | None = None
    """Why ``due_at`` differs from the step's own time (quiet hours), if it does."""


@dataclass(frozen=True)
class Skip:
    key: str
    pathway: str
    step: int
    entry_id: str
    reason: str


@dataclass
class Plan:
    touches: list[Touch] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)


def _codes(concepts: object) -> set[str]:
    out: set[str] = set()
    for concept in concepts if isinstance(concepts, list) else []:
        if not isinstance(concept, Mapping):
            continue
        if concept.get("text"):
            out.add(str(concept["text"]).lower())
        for coding in concept.get("coding") or []:
            if isinstance(coding, Mapping):
                for key in ("code", "display"):
                    if coding.get(key):
                        out.add(str(coding[key]).lower())
    return out


def _locations(resource: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    for participant in resource.get("participant") or []:
        actor = participant.get("actor") if isinstance(participant, Mapping) else None
        if isinstance(actor, Mapping) and str(actor.get("reference", "")).startswith("Location/"):
            out.add(str(actor["reference"]).split("/", 1)[1].lower())
            if actor.get("display"):
                out.add(str(actor["display"]).lower())
    for loc in resource.get("location") or []:  # Encounter.location
        ref = loc.get("location") if isinstance(loc, Mapping) else None
        if isinstance(ref, Mapping):
            for key in ("reference", "display"):
                if ref.get(key):
                    out.add(str(ref[key]).removeprefix("Location/").lower())
    return out


def _matches(pathway: Pathway, entry: Entry) -> str | None:
    """Why the pathway's filter excludes the entry, or None when it applies."""
    f = pathway.when
    if f.status and entry.status not in f.status:
        return f"status {entry.status or 'unknown'} is not one of {', '.join(f.status)}"
    if f.service_type:
        wanted = {s.lower() for s in f.service_type}
        if not wanted & _codes(entry.resource.get("serviceType")):
            return "service type does not match"
    if f.location:
        wanted = {s.lower() for s in f.location}
        if not wanted & _locations(entry.resource):
            return "location does not match"
    return None


_FLOATING = timezone(timedelta(0), "floating")
"""A date without a time (``authoredOn: 2026-02-20``) is that day in the patient's zone:
:func:`plan` reads times in this zone as wall-clock times there."""


def _date(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text if "T" in text else text + "T00:00:00")
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_FLOATING)


def _in_zone(moment: datetime, tz: tzinfo) -> datetime:
    if moment.tzinfo is _FLOATING:
        return moment.replace(tzinfo=tz)
    return moment.astimezone(tz)


def _duration_days(duration: object) -> float | None:
    if not isinstance(duration, Mapping) or duration.get("value") is None:
        return None
    unit = str(duration.get("code") or duration.get("unit") or "d").lower()
    factor = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30,
              "month": 30, "months": 30, "h": 1 / 24, "hour": 1 / 24}.get(unit)
    if factor is None:
        return None
    return float(duration["value"]) * factor


def moments(trigger: Trigger, entry: Entry) -> list[tuple[str, datetime]] | str:
    """The moments a pathway's steps are relative to, each with a key suffix, or why none.

    * appointment: its start;
    * visit-end: when an appointment was fulfilled or an encounter finished (its end, else its
      start);
    * medication-refill: when the supply runs out: the last dispense (or the order's validity
      start or authoring date) plus the expected supply duration, while refills remain and the
      order is active, and only inside the validity period;
    * careplan-activity: each activity's scheduled time (``scheduledPeriod.start``,
      ``scheduledString``, or each ``scheduledTiming.event``), while the plan is active.
    """
    res = entry.resource
    if trigger is Trigger.APPOINTMENT:
        if entry.kind != "appointment":
            return "not an appointment"
        return [("", entry.time)] if entry.time else "the appointment has no start time"
    if trigger is Trigger.VISIT_END:
        done = (entry.kind == "appointment" and entry.status == "fulfilled") or (
            entry.kind == "encounter" and entry.status == "finished"
        )
        if not done:
            return f"the {entry.kind} has not ended (status {entry.status or 'unknown'})"
        at = entry.end or entry.time
        return [("", at)] if at else "the visit has no end time"
    if trigger is Trigger.MEDICATION_REFILL:
        if entry.kind != "medication" or res.get("resourceType") != "MedicationRequest":
            return "not a medication order"
        if entry.status != "active":
            return f"the order is {entry.status or 'not active'}"
        dispense = res.get("dispenseRequest") or {}
        refills = dispense.get("numberOfRepeatsAllowed")
        if not isinstance(refills, int) or refills <= 0:
            return "no refills remain"
        days = _duration_days(dispense.get("expectedSupplyDuration"))
        if days is None:
            return "no expected supply duration"
        validity = dispense.get("validityPeriod") or {}
        last = entry.last_dispense or _date(validity.get("start")) or _date(
            res.get("authoredOn")
        )
        if last is None:
            return "no dispense or start date"
        runs_out = last + timedelta(days=days)
        valid_until = _date(validity.get("end"))
        if valid_until is not None and runs_out > valid_until:
            return "the prescription expires before the supply runs out"
        return [("", runs_out)]
    # care-plan activities
    if entry.kind != "careplan":
        return "not a care plan"
    if entry.status != "active":
        return f"the care plan is {entry.status or 'not active'}"
    found: list[tuple[str, datetime]] = []
    for index, activity in enumerate(res.get("activity") or []):
        detail = activity.get("detail") if isinstance(activity, Mapping) else None
        if not isinstance(detail, Mapping):
            continue
        if detail.get("status") in ("completed", "cancelled", "stopped", "entered-in-error"):
            continue
        candidates = [
            _date((detail.get("scheduledPeriod") or {}).get("start")),
            _date(detail.get("scheduledString")),
            *(_date(e) for e in ((detail.get("scheduledTiming") or {}).get("event") or [])),
        ]
        for n, when in enumerate(c for c in candidates if c is not None):
            found.append((f"|activity:{index}:{n}", when))
    return found or "no scheduled activity"


def plan(
    pathways: Iterable[Pathway],
    entry: Entry,
    recipient: Recipient,
    now: datetime,
    *,
    settings: OutreachSettings,
    languages: Sequence[str],
    default_language: str,
    others: Iterable[datetime] = (),
    sent_keys: Iterable[str] = (),
    keep: Iterable[str] = (),
) -> Plan:
    """The touches that should exist for ``entry`` now, and every step skipped with a reason.

    ``others`` are the due times of the patient's other live touches (for the caps);
    ``sent_keys`` the keys already sent (never planned again); ``keep`` the keys already
    scheduled (by the reconciler) or being sent (by the sender): the "its time had passed"
    rule, which stops a late booking from getting a late reminder, does not apply to them: their
    time passing is the sweep's business, which checks lateness itself.
    """
    result = Plan()
    ctx = _Context(
        entry=entry,
        recipient=recipient,
        now=now,
        settings=settings,
        language=choose_language(recipient.language, languages, default_language),
        booked=sorted(others),
        sent=set(sent_keys),
        keep=set(keep),
    )
    for pathway in pathways:
        found = _matches(pathway, entry) or moments(pathway.on, entry)
        for index in range(len(pathway.steps)):
            if isinstance(found, str):
                key = f"{pathway.name}|{index}|{entry.id}"
                result.skips.append(Skip(key, pathway.name, index, entry.id, found))
                continue
            for suffix, at in found:
                # Offsets are wall-clock in the patient's zone ("3 days before" a 14:00
                # appointment is 14:00, across a daylight-saving change too).
                moment = _in_zone(at, recipient.timezone)
                key = f"{pathway.name}|{index}|{entry.id}{suffix}"
                outcome = _plan_step(ctx, pathway, index, key, moment)
                if isinstance(outcome, str):
                    result.skips.append(Skip(key, pathway.name, index, entry.id, outcome))
                else:
                    result.touches.append(outcome)
    return result


@dataclass
class _Context:
    entry: Entry
    recipient: Recipient
    now: datetime
    settings: OutreachSettings
    language: str
    booked: list[datetime]
    sent: set[str]
    keep: set[str] = field(default_factory=set)


_EVERY_CHANNEL = frozenset({"sms", "email", "voice", "portal"})


def _plan_step(
    ctx: _Context, pathway: Pathway, index: int, key: str, moment: datetime
) -> Touch | str:
    """One step's touch, or why there is none."""
    step = pathway.steps[index]
    recipient, settings = ctx.recipient, ctx.settings
    if key in ctx.sent:
        return "already sent"
    if ctx.entry.held and pathway.on is not Trigger.VISIT_END:
        return ctx.entry.held
    due = moment + step.at
    if due < ctx.now and key not in ctx.keep:
        return f"its time ({due.isoformat()}) had passed when planned"
    if recipient.opted_out >= _EVERY_CHANNEL:
        return "opted out of every channel"
    allowed = next_allowed(due, settings.quiet_window, recipient.timezone)
    moved = None
    if allowed != due:
        moved = "quiet hours"
        if pathway.on is Trigger.APPOINTMENT and allowed > moment - settings.min_notice:
            return "quiet hours: the next allowed time is too close to the appointment"
    channel = choose_channel(step.channel, recipient, pathway.fallback)
    if isinstance(channel, str):
        return channel
    capped = cap_reached(
        allowed, ctx.booked, tz=recipient.timezone,
        max_per_day=settings.max_per_day, max_per_week=settings.max_per_week,
    )
    if capped:
        return capped
    ctx.booked.append(allowed)
    ctx.booked.sort()
    return Touch(
        key=key,
        pathway=pathway.name,
        step=index,
        entry_id=ctx.entry.id,
        patient_id=ctx.entry.patient_id,
        due_at=allowed,
        moment=moment,
        channel=channel[0],
        address=channel[1],
        language=ctx.language,
        template=step.template,
        moved=moved,
    )
