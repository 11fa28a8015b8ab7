"""SIU S12–S26 → Appointment and Patient, after the IG's SIU_S12 message map and the
``SCH/AIS/AIG/AIL/AIP[Appointment]`` segment maps.

* Identity: SCH-2 (filler appointment id) names the Appointment, else SCH-1 (placer); both
  become identifiers (FILL, PLAC). The whole S12 → S14 → S15 life of one appointment therefore
  updates one Appointment id.
* Status: the trigger event says what happened (S15 cancelled, S16 discontinued, S17 deleted,
  S26 no-show) and wins; for the other triggers SCH-25 (filler status, table 0278, read
  case-insensitively: ``Booked``, ``BOOKED``, ``Scheduled``, ``ARRIVED``) decides, and failing
  that the trigger's default (booked).
* Time: TQ1-7/8 (v2.5+), else SCH-11.4/.5 (the v2.3 TQ form), else the earliest AIS/AIG/AIL/AIP
  start; the end, when not sent, from the duration (SCH-9/10, SCH-11.3, AIx duration).
* Participants: the patient, AIP personnel (Practitioner), AIL locations (Location), AIG
  resources (by display); AIS-3 gives the service type. An AIx with action code D or X
  (delete) is left out of the participants.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.errors import MissingRequiredField
from mappings.message import Component, Message, Segment
from mappings.output import Output
from mappings.patient import map_patient

__all__ = ["TRIGGERS", "map_siu", "participant"]

JSON = dict[str, Any]

TRIGGERS = frozenset(f"S{n}" for n in range(12, 27))

# Trigger events whose meaning overrides SCH-25 (v2.5 ch. 10.3).
_TERMINAL = {"S15": "cancelled", "S16": "cancelled", "S17": "entered-in-error", "S26": "noshow"}


def participant(actor: JSON, status: str, role: JSON | None = None) -> JSON:
    out: JSON = {}
    if role:
        out["type"] = [role]
    out["actor"] = actor
    out["status"] = status
    return out


def appointment_status(trigger: str, filler_status: str) -> str:
    """The Appointment.status for a trigger and SCH-25 (see the module docs)."""
    if trigger in _TERMINAL:
        return _TERMINAL[trigger]
    mapped = codes.APPOINTMENT_STATUS.code(filler_status) if filler_status else None
    return mapped or "booked"


def map_siu(out: Output, msg: Message, trigger: str) -> None:
    sch = msg.segment("SCH")
    if sch is None:
        raise MissingRequiredField("SCH segment is missing: no appointment", location="SCH")
    patient = map_patient(out, msg)
    filler, placer = sch.first(2), sch.first(1)
    if not filler.get(1) and not placer.get(1):
        raise MissingRequiredField(
            "SCH-1 and SCH-2 are empty: no appointment identifier", location="SCH-2"
        )
    res: JSON = {"resourceType": "Appointment"}
    key = filler if filler.get(1) else placer
    ident_key = dt.ei_identifier(key, out.systems)
    assert ident_key is not None
    res["id"] = (
        out.make_id("Appointment", ident_key["system"], ident_key["value"])
        if "system" in ident_key
        else out.scoped_id("Appointment", "FILL" if key is filler else "PLAC", key.get(1))
    )
    idents = []
    for comp, code in ((placer, "PLAC"), (filler, "FILL")):
        ident = dt.ei_identifier(comp, out.systems, code)
        if ident:
            idents.append(ident)
    res["identifier"] = idents
    res["status"] = appointment_status(trigger, sch.get(25))
    if sch.get(25) and trigger not in _TERMINAL and not codes.APPOINTMENT_STATUS.code(sch.get(25)):
        out.warn("SCH-25", f"filler status {sch.get(25)!r} is not mapped; status booked")

    resources = _resource_segments(msg)
    services = [
        cc for cc in (out.concept(s, 3) for s in resources if s.id == "AIS") if cc is not None
    ]
    if services:
        res["serviceType"] = services
    appt_type = out.concept(sch, 8)
    if appt_type:
        res["appointmentType"] = appt_type
    reason = out.concept(sch, 7)
    if reason:
        res["reasonCode"] = [reason]

    start, end, minutes = _timing(out, msg, sch, resources)
    if start:
        res["start"] = start
        if end is None and minutes:
            end = dt.add_minutes(start, minutes)
    if end and start:
        res["end"] = end
    if start and end and "T" in start and "T" in end:
        span = (_parse(end) - _parse(start)).total_seconds() / 60
        minutes = span if span > 0 else None
    if minutes and minutes >= 1:
        res["minutesDuration"] = round(minutes)
    if (not start or not end) and res["status"] not in ("proposed", "cancelled", "waitlist"):
        out.warn("SCH-11", "no start and end time for the appointment")
    notes = [n.text(3) for n in msg.after(sch, "NTE", stop=_STOP) if n.text(3)]
    if notes:
        res["comment"] = "\n".join(notes)

    participants = [participant(patient, "accepted")]
    for seg in resources:
        action = seg.get(2).upper()
        if action in ("D", "X"):
            continue
        p = _participant_for(out, seg)
        if p and p not in participants:
            participants.append(p)
    res["participant"] = participants
    out.add(res)


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


_STOP = frozenset({"PID", "RGS", "AIS", "AIG", "AIL", "AIP", "PV1"})


def _resource_segments(msg: Message) -> list[Segment]:
    return [s for s in msg.segments_list if s.id in ("AIS", "AIG", "AIL", "AIP")]


def _participant_for(out: Output, seg: Segment) -> JSON | None:
    if seg.id == "AIP":
        role = out.concept(seg, 4)
        for rep in seg.reps(3):
            ref = out.practitioner(rep, "AIP-3")
            if ref:
                return participant(ref, "accepted", role)
        return None
    if seg.id == "AIL":
        ref = out.location(seg.first(3), "AIL-3")
        if ref:
            role = out.concept(seg, 4)
            return participant(ref, "accepted", role)
        return None
    if seg.id == "AIG":
        res = seg.first(3)
        name = res.get(2) or res.get(1)
        if not name:
            return None
        role = out.concept(seg, 4)
        p: JSON = {}
        if role:
            p["type"] = [role]
        p["actor"] = {"display": name}
        p["status"] = "accepted"
        return p
    return None


def _timing(
    out: Output, msg: Message, sch: Segment, resources: list[Segment]
) -> tuple[str | None, str | None, float | None]:
    start = end = None
    minutes: float | None = None
    tq1 = msg.segment("TQ1")
    if tq1 is not None:
        start, end = out.datetime(tq1, 7), out.datetime(tq1, 8)
    tq = sch.first(11)
    if not start and tq.get(4):
        start = out.datetime_value(tq.get(4), "SCH-11.4")
        end = out.datetime_value(tq.get(5), "SCH-11.5")
    if not start:
        for seg in resources:
            n = 4 if seg.id == "AIS" else 6 if seg.id in ("AIL", "AIP") else 8
            start = out.datetime(seg, n)
            if start:
                break
    # duration: SCH-9/10, then SCH-11.3, then the first AIx duration
    dur = _duration_from(sch.get(9), sch.first(10))
    if dur is None and tq.get(3):
        dur = dt.tq_duration(tq.get(3))
    if dur is None:
        for seg in resources:
            n = 7 if seg.id == "AIS" else 9 if seg.id in ("AIL", "AIP") else 11
            dur = _duration_from(seg.get(n), seg.first(n + 1))
            if dur:
                break
    if dur is not None:
        minutes = dt.minutes_of(dur)
    return start, end, minutes


def _duration_from(amount: str, unit: Component) -> JSON | None:
    if not amount:
        return None
    try:
        return dt.duration(amount, unit.get(1) or unit.get(2) or "min")
    except dt.DatatypeError:
        return None
