"""ADT → Patient, Encounter, RelatedPerson, AllergyIntolerance, Condition, Coverage (and
Observation for ADT OBX), after the IG's ADT_A01/A02/A05/A06/A11 message maps.

Triggers: A01 A02 A03 A04 A05 A06 A07 A08 A11 A13 A28 A31 A38, and the merges A34 A40 A47.

* Person-only events (A28 add person, A31 update person) yield the Patient (and NK1, AL1...)
  but no Encounter, even when a PV1 is sent (it is usually an empty placeholder).
* Merges (A34, A40; A47 changes an identifier) yield the surviving Patient (PID) linked
  ``replaces`` to the replaced Patient (MRG-1), which is written ``active: false`` and linked
  ``replaced-by`` back, as the FHIR Patient.link and the IG's MRG map describe.
* UK outpatient bookings: PAS systems (MEDWAY, Lorenzo) send clinic appointments as ADT A05
  (book or change) and A38 (cancel) with the slot in PV2-8 or EVN-6, the clinic in PV1-3 and
  the booking reference in PV1-19. An outpatient (PV1-2 ``O``) A05/A38 with a slot yields an
  Appointment instead of a planned Encounter.
"""

from __future__ import annotations

from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.encounter import map_encounter
from mappings.errors import MissingRequiredField
from mappings.message import Message, Segment
from mappings.output import Output
from mappings.patient import map_patient, patient_id_for, related_persons
from mappings.results import map_observation
from mappings.siu import participant

__all__ = ["TRIGGERS", "map_adt"]

JSON = dict[str, Any]

PERSON_ONLY = frozenset({"A28", "A31"})
MERGES = frozenset({"A34", "A40", "A47"})
TRIGGERS = frozenset(
    {"A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A13", "A28", "A31", "A38"}
    | MERGES
)


def map_adt(out: Output, msg: Message, trigger: str) -> None:
    if trigger in MERGES:
        _merge(out, msg, trigger)
        return
    patient = map_patient(out, msg)
    related_persons(out, msg, patient)
    encounter = None
    if trigger not in PERSON_ONLY:
        if _is_outpatient_booking(msg, trigger):
            outpatient_appointment(out, msg, patient, trigger)
        else:
            status = codes.EVENT_ENCOUNTER_STATUS.code(trigger) or "unknown"
            encounter = map_encounter(out, msg, patient, status, trigger=trigger)
    _allergies(out, msg, patient)
    _conditions(out, msg, patient, encounter)
    _coverages(out, msg, patient)
    for obx in msg.segments("OBX"):
        map_observation(out, msg, obx, patient, encounter=encounter, key=("adt",))


# --- merges ------------------------------------------------------------------------------------


def _merge(out: Output, msg: Message, trigger: str) -> None:
    # A40 may carry several PID/MRG pairs; each PID is followed by its MRG.
    pids = msg.segments("PID")
    if not pids:
        raise MissingRequiredField("PID segment is missing: no surviving patient", location="PID")
    for pid in pids:
        mrg = _following(msg, pid, "MRG")
        survivor = map_patient(out, msg, pid)
        if mrg is None:
            raise MissingRequiredField(
                f"MRG segment is missing: ADT^{trigger} names no patient to merge", location="MRG"
            )
        _replaced_patient(out, mrg, survivor)


def _following(msg: Message, seg: Segment, sid: str) -> Segment | None:
    for other in msg.segments_list[seg.index + 1 :]:
        if other.id == sid:
            return other
        if other.id == seg.id:
            return None
    return None


def _replaced_patient(out: Output, mrg: Segment, survivor: JSON) -> None:
    idents = out.identifiers(mrg, 1) or out.identifiers(mrg, 4)
    if not idents:
        raise MissingRequiredField(
            "MRG-1 is empty: no prior patient identifier to merge", location="MRG-1"
        )
    key = mrg.reps(1)[0] if mrg.reps(1) else mrg.reps(4)[0]
    rid = patient_id_for(out, idents[0], key.get(4, 1) or key.get(4, 2))
    survivor_id = survivor["reference"].split("/", 1)[1]
    if rid == survivor_id:
        out.warn("MRG-1", "the prior identifier is the surviving patient's own; no link made")
        return
    replaced: JSON = {
        "resourceType": "Patient",
        "id": rid,
        "identifier": idents,
        "active": False,
        "link": [{"other": {"reference": survivor["reference"]}, "type": "replaced-by"}],
    }
    names = out.names(mrg, 7)
    if names:
        replaced["name"] = names
    ref = out.add(replaced)
    body = out.get("Patient", survivor_id)
    assert body is not None
    body.setdefault("link", []).append({"other": ref, "type": "replaces"})


# --- UK outpatient bookings -----------------------------------------------------------------


def _is_outpatient_booking(msg: Message, trigger: str) -> bool:
    if trigger not in ("A05", "A38", "A14", "A27"):
        return False
    pv1 = msg.segment("PV1")
    if pv1 is None or pv1.get(2).upper() != "O":
        return False
    pv2, evn = msg.segment("PV2"), msg.segment("EVN")
    return bool((pv2 is not None and pv2.get(8)) or (evn is not None and evn.get(6)))


def outpatient_appointment(out: Output, msg: Message, patient: JSON, trigger: str) -> JSON:
    """A UK-style ADT A05/A38 outpatient booking → Appointment."""
    pv1 = msg.segment("PV1")
    pv2, evn = msg.segment("PV2"), msg.segment("EVN")
    assert pv1 is not None
    start = (out.datetime(pv2, 8) if pv2 is not None else None) or (
        out.datetime(evn, 6) if evn is not None else None
    )
    booking = pv1.first(19)
    res: JSON = {"resourceType": "Appointment"}
    if booking.get(1):
        ident = dt.identifier(booking, out.systems, out.tz)
        assert ident is not None
        res["id"] = out.scoped_id("Appointment", "visit", booking.get(1))
        res["identifier"] = [ident]
    else:
        res["id"] = out.scoped_id(
            "Appointment", patient["reference"], pv1.raw_field(3), start or ""
        )
    res["status"] = "cancelled" if trigger in ("A38", "A27") else "booked"
    if start:
        res["start"] = start
    else:
        out.warn("PV2-8", "no appointment slot time")
    if evn is not None:
        created = out.datetime(evn, 2)
        if created:
            res["created"] = created
    service = out.concept(pv1, 10)
    if service:
        res["serviceType"] = [service]
    participants = [participant(patient, "accepted")]
    for n in (9, 7, 8):
        for rep in pv1.reps(n):
            ref = out.practitioner(rep, f"PV1-{n}")
            if ref:
                participants.append(participant(ref, "accepted"))
                break
    place = out.location(pv1.first(3), "PV1-3")
    if place:
        participants.append(participant(place, "accepted"))
    res["participant"] = participants
    return out.add(res)


# --- AL1, DG1, IN1 --------------------------------------------------------------------------


def _allergies(out: Output, msg: Message, patient: JSON) -> None:
    pid = patient["reference"].split("/", 1)[1]
    for al1 in msg.segments("AL1"):
        code = out.concept(al1, 3)
        if code is None:
            out.warn(f"AL1-3 (#{al1.get(1) or al1.index})", "no allergen; AL1 left out")
            continue
        res: JSON = {
            "resourceType": "AllergyIntolerance",
            "id": out.make_id("AllergyIntolerance", pid, al1.raw_field(3)),
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                        "code": "active",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                        "code": "confirmed",
                    }
                ]
            },
            "code": code,
            "patient": patient,
        }
        category = codes.ALLERGY_CATEGORY.code(al1.get(2))
        if category:
            res["category"] = [category]
        if al1.get(2).upper() in ("MC",):
            res["type"] = "intolerance"
        elif al1.get(2):
            res["type"] = "allergy"
        criticality = codes.ALLERGY_CRITICALITY.code(al1.get(4))
        if criticality:
            res["criticality"] = criticality
        reactions = [r.text() for r in al1.reps(5) if r.text()]
        if reactions:
            reaction: JSON = {"manifestation": [{"text": t} for t in reactions]}
            severity = codes.ALLERGY_SEVERITY.code(al1.get(4))
            if severity:
                reaction["severity"] = severity
            res["reaction"] = [reaction]
        onset = out.datetime(al1, 6)
        if onset:
            res["onsetDateTime"] = onset
        out.add(res)


def _conditions(out: Output, msg: Message, patient: JSON, encounter: JSON | None) -> None:
    pid = patient["reference"].split("/", 1)[1]
    for dg1 in msg.segments("DG1"):
        code = out.concept(dg1, 3)
        if code is None and dg1.get(4):
            code = {"text": dg1.get(4)}
        if code is None:
            out.warn(f"DG1-3 (#{dg1.get(1) or dg1.index})", "no diagnosis code; DG1 left out")
            continue
        ident_raw = dg1.get(20)
        res: JSON = {
            "resourceType": "Condition",
            "id": out.make_id("Condition", pid, ident_raw or dg1.raw_field(3)),
        }
        if ident_raw:
            ident = dt.ei_identifier(dg1.first(20), out.systems)
            if ident:
                res["identifier"] = [ident]
        res["category"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "encounter-diagnosis",
                        "display": "Encounter Diagnosis",
                    }
                ]
            }
        ]
        dtype = codes.DIAGNOSIS_TYPE.coding(dg1.get(6))
        if dtype:
            res["category"].append({"coding": [dtype]})
        res["code"] = code
        res["subject"] = patient
        if encounter:
            res["encounter"] = encounter
        onset = out.datetime(dg1, 5)
        if onset:
            res["onsetDateTime"] = onset
        recorded = out.datetime(dg1, 19)
        if recorded:
            res["recordedDate"] = recorded
        for rep in dg1.reps(16):
            ref = out.practitioner(rep, "DG1-16")
            if ref:
                res["asserter"] = ref
                break
        out.add(res)


def _coverages(out: Output, msg: Message, patient: JSON) -> None:
    pid = patient["reference"].split("/", 1)[1]
    for in1 in msg.segments("IN1"):
        plan = in1.first(2)
        company = in1.get(4, 1) or in1.get(3)
        member = in1.get(49)
        policy = in1.get(36)
        res: JSON = {
            "resourceType": "Coverage",
            "id": out.make_id(
                "Coverage", pid, in1.raw_field(3), in1.raw_field(2), policy, in1.get(1)
            ),
            "status": "active",
            "beneficiary": patient,
        }
        if policy:
            res["identifier"] = [{"value": policy}]
        plan_type = out.concept(in1, 15)
        if plan_type:
            res["type"] = plan_type
        if member:
            res["subscriberId"] = member
        relationship = out.concept(in1, 17)
        if relationship:
            res["relationship"] = relationship
        start, end = out.datetime(in1, 12), out.datetime(in1, 13)
        if start or end:
            res["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        payor_name = company or plan.get(2) or plan.get(1)
        if not payor_name:
            out.warn(f"IN1-4 (#{in1.get(1) or in1.index})", "no insurer; Coverage left out")
            continue
        insurer_ident = in1.first(3)
        payor: JSON = {"display": payor_name}
        ins = dt.identifier(insurer_ident, out.systems, out.tz, period_at=None)
        if ins:
            payor["identifier"] = {k: v for k, v in ins.items() if k != "assigner"}
        res["payor"] = [payor]
        if plan.get(1) or plan.get(2):
            res["class"] = [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                "code": "plan",
                            }
                        ]
                    },
                    "value": plan.get(1) or plan.get(2),
                    **({"name": plan.get(2)} if plan.get(2) else {}),
                }
            ]
        group = in1.get(8)
        if group:
            res.setdefault("class", []).append(
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                "code": "group",
                            }
                        ]
                    },
                    "value": group,
                    **({"name": in1.get(9)} if in1.get(9) else {}),
                }
            )
        out.add(res)
