"""Pharmacy orders → MedicationRequest, Medication and MedicationDispense.

RDE^O11/O25 (encoded order), OMP^O09 (order) and RDS^O13 (dispense), after the IG's
``ORC``, ``RXO/RXR/TQ1[MedicationRequest]`` segment maps. One ORC starts one order; the RXO,
RXE, RXD, TQ1, RXR, RXC and NTE after it (up to the next ORC) belong to it.

* status: ORC-5 (order status, table 0038) when sent, else ORC-1 (order control, table 0119),
  mapped to medicationrequest-status (see :mod:`mappings.codes` for the departures from the
  IG's ServiceRequest-oriented tables).
* medication: RXE-2 (give code), else RXO-1 (requested give code), else RXD-2. A coded drug
  becomes a Medication resource (id from system and code, so every order of the same NDC shares
  it) referenced from medicationReference; free text stays a medicationCodeableConcept.
* dosage: TQ1 (v2.5+) or RXE-1 (the v2.3/2.4 TQ), RXE-3/4/5 dose, RXE-23/24 rate, RXR route and
  site, RXE-7 administration instructions as text.
* dispenseRequest (the refill-reminder pathway depends on it): quantity RXE-10/11 (RXO-11/12),
  refills RXE-12 (RXO-13), expectedSupplyDuration from TQ1-6 (service duration) or RXE-1.3,
  else computed as dispense quantity ÷ total daily dose (RXE-19) when both are in the same unit.
"""

from __future__ import annotations

import re
from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.errors import MissingRequiredField
from mappings.message import Component, Message, Segment
from mappings.output import Output
from mappings.patient import map_patient
from mappings.results import quantity

__all__ = ["TRIGGERS", "map_pharmacy", "timing_repeat"]

JSON = dict[str, Any]

TRIGGERS = frozenset({("RDE", "O11"), ("RDE", "O25"), ("OMP", "O09"), ("RDS", "O13")})

_PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "C": "urgent", "T": "urgent"}
_FREQ_PER_DAY = {
    "QD": 1,
    "DAILY": 1,
    "OD": 1,
    "BID": 2,
    "TID": 3,
    "QID": 4,
    "QAM": 1,
    "QPM": 1,
    "QHS": 1,
}
_EVERY = re.compile(r"^Q(\d+)(S|M|H|D|W|L|MIN|HR|HRS)$")
_TIMES_A_DAY = re.compile(r"^(\d+)XD$|^(\d+)ID$")
_UNIT_OF = {
    "S": "s",
    "M": "min",
    "MIN": "min",
    "H": "h",
    "HR": "h",
    "HRS": "h",
    "D": "d",
    "W": "wk",
    "L": "mo",
}


def timing_repeat(pattern: str) -> JSON | None:
    """A v2 repeat pattern (table 0335: ``BID``, ``Q6H``, ``QOD``, ``3XD``...) → Timing.repeat."""
    code = pattern.strip().upper().replace(" ", "")
    if not code:
        return None
    if code in _FREQ_PER_DAY:
        return {"frequency": _FREQ_PER_DAY[code], "period": 1, "periodUnit": "d"}
    if code == "QOD":
        return {"frequency": 1, "period": 2, "periodUnit": "d"}
    if code in ("QWK", "QW", "WEEKLY"):
        return {"frequency": 1, "period": 1, "periodUnit": "wk"}
    m = _EVERY.match(code)
    if m:
        return {"frequency": 1, "period": int(m.group(1)), "periodUnit": _UNIT_OF[m.group(2)]}
    m = _TIMES_A_DAY.match(code)
    if m:
        return {"frequency": int(m.group(1) or m.group(2)), "period": 1, "periodUnit": "d"}
    return None


def _orders(msg: Message) -> list[list[Segment]]:
    groups: list[list[Segment]] = []
    current: list[Segment] | None = None
    for seg in msg.segments_list:
        if seg.id == "ORC":
            current = [seg]
            groups.append(current)
        elif current is not None:
            if seg.id in ("PID", "MSH"):
                current = None
            else:
                current.append(seg)
    if not groups:
        # RXE/RXO without an ORC (seen in hand-built feeds): one order of everything
        rx = [s for s in msg.segments_list if s.id in ("RXE", "RXO", "RXD")]
        if rx:
            start = rx[0].index
            groups.append(msg.segments_list[start:])
    return groups


def _one(group: list[Segment], sid: str) -> Segment | None:
    for seg in group:
        if seg.id == sid:
            return seg
    return None


def _all(group: list[Segment], sid: str) -> list[Segment]:
    return [s for s in group if s.id == sid]


def map_pharmacy(out: Output, msg: Message, trigger: str) -> None:
    patient = map_patient(out, msg)
    groups = _orders(msg)
    if not groups:
        raise MissingRequiredField("ORC segment is missing: no order", location="ORC")
    for group in groups:
        request = _request(out, msg, group, patient)
        if msg.header.message_code == "RDS":
            for rxd in _all(group, "RXD"):
                _dispense(out, group, rxd, patient, request)


def _medication(out: Output, code_field: Component, form: JSON | None) -> JSON | None:
    """A Medication for a coded drug (returns medicationReference), or None."""
    cc = dt.codeable_concept(code_field)
    if cc is None or not cc.get("coding"):
        return None
    first = cc["coding"][0]
    system = first.get("system")
    rid = (
        out.make_id("Medication", system, first["code"])
        if system
        else out.scoped_id("Medication", code_field.get(3), first["code"])
    )
    res: JSON = {"resourceType": "Medication", "id": rid, "code": cc}
    if form:
        res["form"] = form
    ref = out.add(res)
    display = cc.get("text") or first.get("display")
    if display:
        ref["display"] = display
    return ref


def _request(out: Output, msg: Message, group: list[Segment], patient: JSON) -> JSON:
    orc = group[0] if group[0].id == "ORC" else None
    rxe, rxo = _one(group, "RXE"), _one(group, "RXO")
    rxd = _one(group, "RXD")
    placer = orc.first(2) if orc is not None else None
    filler = orc.first(3) if orc is not None else None
    rx_number = rxe.get(15) if rxe is not None else (rxd.get(7) if rxd is not None else "")
    res: JSON = {"resourceType": "MedicationRequest"}
    if placer is not None and placer.get(1):
        res["id"] = out.scoped_id("MedicationRequest", "PLAC", placer.get(1), placer.get(2))
    elif filler is not None and filler.get(1):
        res["id"] = out.scoped_id("MedicationRequest", "FILL", filler.get(1), filler.get(2))
    elif rx_number:
        res["id"] = out.scoped_id("MedicationRequest", "RX", rx_number)
    else:
        res["id"] = out.message_id("MedicationRequest", str(group[0].index))
    idents = []
    for comp, code in ((placer, "PLAC"), (filler, "FILL")):
        if comp is not None:
            ident = dt.ei_identifier(comp, out.systems, code)
            if ident:
                idents.append(ident)
    if rx_number:
        idents.append({"value": rx_number})
    if idents:
        res["identifier"] = idents

    status = None
    if orc is not None:
        if orc.get(5):
            status = out.mapped(orc, 5, codes.ORDER_STATUS)
        if status is None and orc.get(1):
            status = out.mapped(orc, 1, codes.ORDER_CONTROL_STATUS)
    res["status"] = status or "unknown"
    res["intent"] = "order"

    # medication
    code_seg, code_n, form_n = (
        (rxe, 2, 6) if rxe is not None and rxe.has(2) else
        (rxo, 1, 5) if rxo is not None and rxo.has(1) else
        (rxd, 2, 6) if rxd is not None else (None, 0, 0)
    )  # fmt: skip
    if code_seg is None:
        raise MissingRequiredField(
            "RXE-2 is empty: no medication ordered", location="RXE-2" if rxe else "RXO-1"
        )
    form = out.concept(code_seg, form_n)
    med_ref = _medication(out, code_seg.first(code_n), form)
    if med_ref:
        res["medicationReference"] = med_ref
    else:
        cc = out.concept(code_seg, code_n)
        if cc is None:
            raise MissingRequiredField(
                f"{code_seg.id}-{code_n} is empty: no medication ordered",
                location=f"{code_seg.id}-{code_n}",
            )
        res["medicationCodeableConcept"] = cc
    res["subject"] = patient
    if orc is not None:
        authored = out.datetime(orc, 9)
        if authored:
            res["authoredOn"] = authored
        for rep in orc.reps(12):
            ref = out.practitioner(rep, "ORC-12")
            if ref:
                res["requester"] = ref
                break
    if "authoredOn" not in res and rxe is not None:
        authored = out.datetime(rxe, 32)
        if authored:
            res["authoredOn"] = authored
    if rxe is not None:
        reasons = out.concepts(rxe, 27)
        if reasons:
            res["reasonCode"] = reasons

    dosage, supply_from_timing, priority = _dosage(out, group, rxe, rxo)
    if priority:
        res["priority"] = priority
    if dosage:
        res["dosageInstruction"] = [dosage]
    dispense = _dispense_request(out, rxe, rxo, supply_from_timing)
    if dispense:
        res["dispenseRequest"] = dispense
    subst = _substitution(rxe, rxo)
    if subst is not None:
        res["substitution"] = {"allowedBoolean": subst}
    notes = [n.text(3) for n in _all(group, "NTE") if n.text(3)]
    if notes:
        res["note"] = [{"text": t} for t in notes]
    return out.add(res)


def _dosage(
    out: Output, group: list[Segment], rxe: Segment | None, rxo: Segment | None
) -> tuple[JSON | None, JSON | None, str | None]:
    dosage: JSON = {}
    timing: JSON = {}
    repeat: JSON = {}
    supply: JSON | None = None
    priority = None
    tq1s = _all(group, "TQ1")
    if tq1s:
        tq1 = tq1s[0]
        pattern = tq1.first(3)
        code = pattern.get(1)
        rep = timing_repeat(code) if code else None
        if rep:
            repeat.update(rep)
        if code:
            timing["code"] = {"text": code}
            if code.upper() == "PRN":
                dosage["asNeededBoolean"] = True
        start, end = out.datetime(tq1, 7), out.datetime(tq1, 8)
        if start or end:
            repeat["boundsPeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        sd = tq1.first(6)
        if sd.get(1):
            unit = sd.part(2)
            supply = out.safely("TQ1-6", lambda: dt.duration(sd.get(1), unit.get(1) or unit.get(2)))
            if supply is None:
                out.warn("TQ1-6", f"service duration {tq1.raw_field(6)!r} has no usable unit")
        prio = tq1.get(9).upper()
        priority = _PRIORITY.get(prio)
        text = tq1.get(11)
        if text:
            dosage["patientInstruction"] = text
    elif rxe is not None and rxe.has(1):
        tq = rxe.first(1)
        interval = tq.part(2)
        rep = timing_repeat(interval.get(1))
        if rep:
            repeat.update(rep)
        if interval.get(1):
            timing["code"] = {"text": interval.get(1)}
        start = out.datetime_value(tq.get(4), "RXE-1.4")
        end = out.datetime_value(tq.get(5), "RXE-1.5")
        if start or end:
            repeat["boundsPeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        if tq.get(3):
            supply = dt.tq_duration(tq.get(3))
        priority = _PRIORITY.get(tq.get(6).upper())
    if repeat:
        timing["repeat"] = repeat
    if timing:
        dosage["timing"] = timing

    # dose and rate
    src, n_min, n_max, n_units = (
        (rxe, 3, 4, 5)
        if rxe is not None
        else (rxo, 2, 3, 4)
        if rxo is not None
        else (None, 0, 0, 0)
    )
    if src is not None:
        low = out.decimal(src, n_min)
        high = out.decimal(src, n_max)
        dose_and_rate: JSON = {}
        if low is not None and high is not None and high != low:
            dose_and_rate["doseRange"] = {
                "low": quantity(out, low, src, n_units),
                "high": quantity(out, high, src, n_units),
            }
        elif low is not None:
            dose_and_rate["doseQuantity"] = quantity(out, low, src, n_units)
        if rxe is not None:
            rate = out.decimal(rxe, 23)
            if rate is not None:
                dose_and_rate["rateQuantity"] = quantity(out, rate, rxe, 24)
        if dose_and_rate:
            dosage["doseAndRate"] = [dose_and_rate]
    rxr = _one(group, "RXR")
    if rxr is not None:
        route = out.concept(rxr, 1)
        if route:
            dosage["route"] = route
        site = out.concept(rxr, 2)
        if site:
            dosage["site"] = site
        method = out.concept(rxr, 4)
        if method:
            dosage["method"] = method
    # RXE-7 / RXO-7 are CWE: the text is CWE-2 (or CWE-1 when no text is sent)
    source = rxe if rxe is not None else rxo
    instructions = (
        [(r.get(2) or r.get(1)) if len(r) > 1 else r.text() for r in source.reps(7)]
        if source is not None
        else []
    )
    instructions = [t for t in instructions if t]
    if instructions:
        dosage["text"] = "\n".join(instructions)
    return (dosage or None), supply, priority


def _dispense_request(
    out: Output, rxe: Segment | None, rxo: Segment | None, supply: JSON | None
) -> JSON | None:
    dispense: JSON = {}
    src, n_amount, n_units, n_refills = (
        (rxe, 10, 11, 12)
        if rxe is not None
        else (rxo, 11, 12, 13)
        if rxo is not None
        else (None, 0, 0, 0)
    )
    if src is None:
        return None
    amount = out.decimal(src, n_amount)
    if amount is not None:
        dispense["quantity"] = quantity(out, amount, src, n_units)
    refills = src.get(n_refills)
    if refills:
        try:
            n = int(float(refills))
        except ValueError:
            out.warn(f"{src.id}-{n_refills}", f"{refills!r} is not a number of refills; left out")
        else:
            if n >= 0:
                dispense["numberOfRepeatsAllowed"] = n
    if supply is None and rxe is not None and amount is not None:
        supply = _supply_from_daily_dose(out, rxe, amount)
    if supply is not None:
        dispense["expectedSupplyDuration"] = supply
    return dispense or None


def _supply_from_daily_dose(out: Output, rxe: Segment, amount: float) -> JSON | None:
    # RXE-19 total daily dose is CQ: quantity^units
    daily = rxe.first(19)
    per_day = out.safely("RXE-19", lambda: dt.decimal(daily.get(1)))
    if not per_day:
        return None
    daily_unit = daily.part(2).get(1).lower()
    dispense_unit = rxe.get(11).lower()
    if not daily_unit or daily_unit != dispense_unit:
        return None
    days = amount / per_day
    value: float | int = round(days) if abs(days - round(days)) < 1e-9 else round(days, 2)
    return {"value": value, "unit": "d", "system": dt.UCUM_URI, "code": "d"}


def _substitution(rxe: Segment | None, rxo: Segment | None) -> bool | None:
    # RXE-9 substitution status (table 0167) or RXO-9 allow substitutions (table 0161)
    code = rxe.get(9).upper() if rxe is not None else rxo.get(9).upper() if rxo is not None else ""
    if code in ("N",):
        return False
    if code in ("G", "T", "Y"):
        return True
    return None


def _dispense(
    out: Output, group: list[Segment], rxd: Segment, patient: JSON, request: JSON
) -> None:
    res: JSON = {
        "resourceType": "MedicationDispense",
        "id": out.make_id(
            "MedicationDispense", request["reference"], rxd.get(1), rxd.get(3), rxd.get(7)
        ),
        "status": "completed",
    }
    rx = rxd.get(7)
    if rx:
        res["identifier"] = [{"value": rx}]
    form = out.concept(rxd, 6)
    med_ref = _medication(out, rxd.first(2), form)
    if med_ref:
        res["medicationReference"] = med_ref
    else:
        cc = out.concept(rxd, 2)
        if cc is None:
            out.warn("RXD-2", "no dispensed drug; MedicationDispense left out")
            return
        res["medicationCodeableConcept"] = cc
    res["subject"] = patient
    for rep in rxd.reps(10):
        ref = out.practitioner(rep, "RXD-10")
        if ref:
            res["performer"] = [{"actor": ref}]
            break
    res["authorizingPrescription"] = [request]
    amount = out.decimal(rxd, 4)
    if amount is not None:
        res["quantity"] = quantity(out, amount, rxd, 5)
    when = out.datetime(rxd, 3)
    if when:
        res["whenHandedOver"] = when
    notes = [r.text() for r in rxd.reps(9) if r.text()]
    if notes:
        res["note"] = [{"text": t} for t in notes]
    out.add(res)
