"""PV1 and PV2 → Encounter, after the IG's ``PV1[Encounter]`` and ``PV2[Encounter]`` maps.

The Encounter id comes from the visit number (PV1-19), so an admit, its transfers and its
discharge update one Encounter. Without a visit number the id is the patient plus the admit
time (PV1-44), and failing that this message.
"""

from __future__ import annotations

from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.message import Message, Segment
from mappings.output import Output

__all__ = ["map_encounter"]

JSON = dict[str, Any]

_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_PARTICIPANTS = (
    (7, "ATND", "attender"),
    (8, "REF", "referrer"),
    (9, "CON", "consultant"),
    (17, "ADM", "admitter"),
)


def _class(out: Output, pv1: Segment) -> JSON:
    raw = pv1.get(2)
    if raw:
        mapped = codes.ENCOUNTER_CLASS.coding(raw)
        if mapped:
            return mapped
        return {"system": "http://terminology.hl7.org/CodeSystem/v2-0004", "code": raw}
    return {
        "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
        "code": "UNK",
        "display": "unknown",
    }


def map_encounter(
    out: Output, msg: Message, patient: JSON, status: str, *, trigger: str = ""
) -> JSON | None:
    """Map PV1 (and PV2) to an Encounter with ``status``; returns a Reference or None."""
    pv1 = msg.segment("PV1")
    if pv1 is None:
        return None
    patient_id = patient["reference"].split("/", 1)[1]
    visit = pv1.first(19)
    visit_ident = None
    res: JSON = {"resourceType": "Encounter"}
    if visit.get(1):
        visit_ident = _visit_identifier(out, pv1)
        system = visit_ident.get("system")
        res["id"] = (
            out.make_id("Encounter", system, visit_ident["value"])
            if system
            else out.scoped_id("Encounter", visit.get(4, 1), visit_ident["value"])
        )
        res["identifier"] = [visit_ident]
    elif pv1.get(44):
        res["id"] = out.make_id("Encounter", patient_id, "admit", pv1.get(44))
    else:
        res["id"] = out.message_id("Encounter")
    res["status"] = status
    res["class"] = _class(out, pv1)
    adm_type = out.concept(pv1, 4)
    if adm_type:
        res["type"] = [adm_type]
    service = out.concept(pv1, 10)
    if service:
        res["serviceType"] = service
    res["subject"] = patient

    participants = []
    for n, code, display in _PARTICIPANTS:
        for rep in pv1.reps(n):
            ref = out.practitioner(rep, f"PV1-{n}")
            if ref:
                participants.append(
                    {
                        "type": [
                            {
                                "coding": [
                                    {"system": _PARTICIPATION, "code": code, "display": display}
                                ]
                            }
                        ],
                        "individual": ref,
                    }
                )
    if participants:
        res["participant"] = participants

    start, end = out.datetime(pv1, 44), out.datetime(pv1, 45)
    if start or end:
        res["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}

    pv2 = msg.segment("PV2")
    if pv2 is not None:
        reason = out.concept(pv2, 3)
        if reason:
            res["reasonCode"] = [reason]

    hosp: JSON = {}
    pre = pv1.first(5)
    if pre.get(1):
        hosp["preAdmissionIdentifier"] = {"value": pre.get(1)}
    for key, n in (("admitSource", 14), ("reAdmission", 13), ("dischargeDisposition", 36)):
        cc = out.concept(pv1, n)
        if cc:
            hosp[key] = cc
    courtesy = out.concepts(pv1, 16)
    if courtesy:
        hosp["specialCourtesy"] = courtesy
    if hosp:
        res["hospitalization"] = hosp

    locations = []
    finished = status in ("finished", "cancelled")
    here = out.location(pv1.first(3), "PV1-3")
    if here:
        locations.append({"location": here, "status": "completed" if finished else "active"})
    if trigger == "A02":
        prior = out.location(pv1.first(6), "PV1-6")
        if prior and prior != here:
            locations.append({"location": prior, "status": "completed"})
    temp = out.location(pv1.first(11), "PV1-11")
    if temp:
        locations.append({"location": temp, "status": "completed" if finished else "active"})
    if locations:
        res["location"] = locations
    return out.add(res)


def _visit_identifier(out: Output, pv1: Segment) -> JSON:
    ident = dt.identifier(pv1.first(19), out.systems, out.tz)
    assert ident is not None
    if "type" not in ident:
        ident["type"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "VN",
                    "display": "Visit number",
                }
            ]
        }
    return ident
