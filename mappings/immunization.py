"""VXU^V04 → Immunization, plus the VIS and funding Observations, after the IG's VXU_V04
message map and ``RXA[Immunization]`` segment map, read with the CDC immunization IG's habits.

One RXA (with its ORC, RXR and OBX) is one dose:

* vaccineCode RXA-5 (CVX, with NDC/MVX alternates), occurrence RXA-3, dose RXA-6/7 (``999``
  means unknown and is left out), lot RXA-15, expiry RXA-16, manufacturer RXA-17 (MVX, as a
  reference by identifier), performer RXA-10 (AP) and ORC-12 (OP), location RXA-11.
* status from RXA-20 (table 0322: CP/PA completed, RE/NA not-done) and RXA-21 (action code: D
  → entered-in-error); a refusal reason RXA-18 becomes statusReason.
* RXA-9 ``00`` is a new record (primarySource true), ``01``–``08`` historical
  (primarySource false, reportOrigin from RXA-9).
* OBX after the RXA become Observations partOf the Immunization; the funding ones also fill
  fundingSource (30963-3) and programEligibility (64994-7), and the VIS ones (69764-9 document
  type, 29768-9 published, 29769-7 presented) fill ``education``.
"""

from __future__ import annotations

from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.errors import MissingRequiredField
from mappings.message import Message, Segment
from mappings.output import Output
from mappings.patient import map_patient
from mappings.results import map_observation, quantity

__all__ = ["map_vxu"]

JSON = dict[str, Any]

_PERFORMER_FUNCTION = "http://terminology.hl7.org/CodeSystem/v2-0443"
_FUNDING_SOURCE = "30963-3"
_ELIGIBILITY = "64994-7"
_VIS_DOCUMENT = "69764-9"
_VIS_PUBLISHED = "29768-9"
_VIS_PRESENTED = "29769-7"
_VIS_VACCINE = "30956-7"


def map_vxu(out: Output, msg: Message, trigger: str) -> None:
    patient = map_patient(out, msg)
    rxas = msg.segments("RXA")
    if not rxas:
        raise MissingRequiredField("RXA segment is missing: no immunization", location="RXA")
    for rxa in rxas:
        _immunization(out, msg, rxa, patient)
    # person-level OBX (before the first ORC/RXA) are plain Observations
    first_order = min(
        (s.index for s in msg.segments_list if s.id in ("ORC", "RXA")), default=len(msg)
    )
    for obx in msg.segments("OBX"):
        if obx.index < first_order:
            map_observation(out, msg, obx, patient, key=("vxu-person",))


def _group_of(msg: Message, rxa: Segment) -> tuple[Segment | None, list[Segment]]:
    orc = None
    for seg in reversed(msg.segments_list[: rxa.index]):
        if seg.id == "ORC":
            orc = seg
            break
        if seg.id == "RXA":
            break
    members: list[Segment] = []
    for seg in msg.segments_list[rxa.index + 1 :]:
        if seg.id in ("ORC", "RXA", "PID"):
            break
        members.append(seg)
    return orc, members


def _immunization(out: Output, msg: Message, rxa: Segment, patient: JSON) -> None:
    orc, members = _group_of(msg, rxa)
    patient_id = patient["reference"].split("/", 1)[1]
    res: JSON = {"resourceType": "Immunization"}
    filler = orc.first(3) if orc is not None else None
    placer = orc.first(2) if orc is not None else None
    if filler is not None and filler.get(1):
        res["id"] = out.scoped_id("Immunization", "FILL", filler.get(1), filler.get(2))
    elif placer is not None and placer.get(1):
        res["id"] = out.scoped_id("Immunization", "PLAC", placer.get(1), placer.get(2))
    else:
        res["id"] = out.make_id(
            "Immunization", patient_id, rxa.get(3), rxa.raw_field(5), rxa.get(15)
        )
    idents = []
    for comp, code in ((filler, "FILL"), (placer, "PLAC")):
        if comp is not None:
            ident = dt.ei_identifier(comp, out.systems, code)
            if ident:
                idents.append(ident)
    if idents:
        res["identifier"] = idents

    action = rxa.get(21).upper()
    completion = rxa.get(20).upper()
    status = codes.COMPLETION_STATUS.code(completion) if completion else None
    if completion and status is None:
        out.warn("RXA-20", f"completion status {completion!r} is not mapped; completed")
    res["status"] = "entered-in-error" if action == "D" else status or "completed"
    if res["status"] == "not-done":
        reason = out.concept(rxa, 18)
        if reason:
            res["statusReason"] = reason

    vaccine = out.concept(rxa, 5)
    if vaccine is None:
        out.warn("RXA-5", "no vaccine code; vaccine unknown")
        vaccine = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
                    "code": "UNK",
                    "display": "unknown",
                }
            ]
        }
    res["vaccineCode"] = vaccine
    res["patient"] = patient
    occurrence = out.datetime(rxa, 3)
    if occurrence:
        res["occurrenceDateTime"] = occurrence
    else:
        raise MissingRequiredField("RXA-3 is empty: no administration date", location="RXA-3")
    recorded = out.datetime(rxa, 22)
    if recorded:
        res["recorded"] = recorded
    source = rxa.first(9)
    source_code = source.get(1)
    if source_code:
        res["primarySource"] = source_code == "00"
        if source_code != "00":
            origin = dt.codeable_concept(source)
            if origin:
                res["reportOrigin"] = origin
    location = rxa.first(11)
    facility = location.part(4).get(1) or location.get(4)
    if facility:
        res["location"] = {"display": facility}
    mvx = rxa.first(17)
    if mvx.get(1) or mvx.get(2):
        manufacturer: JSON = {}
        if mvx.get(1):
            system = codes.coding_system_uri(mvx.get(3)) or "http://hl7.org/fhir/sid/mvx"
            if system == "http://terminology.hl7.org/CodeSystem/MVX":
                system = "http://hl7.org/fhir/sid/mvx"
            manufacturer["identifier"] = {"system": system, "value": mvx.get(1)}
        if mvx.get(2):
            manufacturer["display"] = mvx.get(2)
        res["manufacturer"] = manufacturer
    lot = rxa.get(15)
    if lot:
        res["lotNumber"] = lot
    expiry = out.date(rxa, 16)
    if expiry:
        res["expirationDate"] = expiry
    rxr = next((s for s in members if s.id == "RXR"), None)
    if rxr is not None:
        route = out.concept(rxr, 1)
        if route:
            res["route"] = route
        site = out.concept(rxr, 2)
        if site:
            res["site"] = site
    amount = rxa.get(6)
    if amount and amount != "999":
        value = out.decimal(rxa, 6)
        if value is not None:
            res["doseQuantity"] = quantity(out, value, rxa, 7)
    performers = []
    for seg, n, function in ((rxa, 10, "AP"), (orc, 12, "OP")):
        if seg is None:
            continue
        for rep in seg.reps(n):
            ref = out.practitioner(rep, f"{seg.id}-{n}")
            if ref:
                performers.append(
                    {
                        "function": {"coding": [{"system": _PERFORMER_FUNCTION, "code": function}]},
                        "actor": ref,
                    }
                )
                break
    if performers:
        res["performer"] = performers
    notes = [n.text(3) for n in members if n.id == "NTE" and n.text(3)]
    if notes:
        res["note"] = [{"text": t} for t in notes]

    ref = out.add(res)
    body = out.get("Immunization", res["id"])
    assert body is not None
    _observations(out, msg=msg, members=members, patient=patient, immunization=ref, body=body)


def _observations(
    out: Output,
    *,
    msg: Message,
    members: list[Segment],
    patient: JSON,
    immunization: JSON,
    body: JSON,
) -> None:
    education: dict[str, JSON] = {}
    for obx in members:
        if obx.id != "OBX":
            continue
        map_observation(
            out,
            msg,
            obx,
            patient,
            key=("vxu", immunization["reference"]),
            part_of=immunization,
        )
        loinc = obx.get(3)
        group = obx.get(4) or "1"
        value = obx.first(5)
        if loinc == _FUNDING_SOURCE:
            cc = dt.codeable_concept(value)
            if cc:
                body["fundingSource"] = cc
        elif loinc == _ELIGIBILITY:
            cc = dt.codeable_concept(value)
            if cc:
                body.setdefault("programEligibility", []).append(cc)
        elif loinc in (_VIS_DOCUMENT, _VIS_VACCINE):
            entry = education.setdefault(group, {})
            if loinc == _VIS_DOCUMENT:
                # the CDC IG codes the VIS by its GS1 barcode (cdcgs1vis); FHIR R4 has only a
                # string here, so the barcode is kept when there is no title
                entry["documentType"] = value.get(2) or value.get(1)
        elif loinc in (_VIS_PUBLISHED, _VIS_PRESENTED):
            entry = education.setdefault(group, {})
            when = out.datetime(obx, 5)
            if when:
                entry["publicationDate" if loinc == _VIS_PUBLISHED else "presentationDate"] = when
    entries = [e for e in education.values() if "documentType" in e]
    if entries:
        body["education"] = entries
