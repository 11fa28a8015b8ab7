"""PID, PD1 and NK1 → Patient and RelatedPerson, shared by every message family.

Follows the IG segment maps ``PID[Patient]``, ``PD1[Patient]`` and ``NK1[RelatedPerson]``
(``shared/corpus/mappings/hl7-v2-to-fhir/segments/``). The Patient id comes from the first
PID-3 identifier, so every message about the same person from the same sender, or naming the
same identifier system, yields the same Patient id.
"""

from __future__ import annotations

from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.errors import MissingRequiredField
from mappings.message import Component, Message, Segment
from mappings.output import Output

__all__ = ["map_patient", "patient_id_for", "related_persons"]

JSON = dict[str, Any]

_BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
_MOTHERS_MAIDEN = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
_RELIGION = "http://hl7.org/fhir/StructureDefinition/patient-religion"


def patient_id_for(out: Output, ident: JSON, authority: str) -> str:
    """The Patient id for one identifier: global when it has a system, else per sender."""
    system = ident.get("system")
    if system:
        return out.make_id("Patient", system, ident["value"])
    return out.scoped_id("Patient", authority, ident["value"])


def _key_identifier(out: Output, pid: Segment) -> tuple[JSON, str, str]:
    """(identifier, its assigning authority text, the field it came from)."""
    for n in (3, 2, 4):
        for rep in pid.reps(n):
            ident = dt.identifier(rep, out.systems, out.tz)
            if ident:
                if n != 3:
                    out.warn(f"PID-{n}", f"PID-3 is empty: patient identified by PID-{n}")
                return ident, rep.get(4, 1) or rep.get(4, 2), f"PID-{n}"
    raise MissingRequiredField("PID-3 is empty: no patient identifier", location="PID-3")


def map_patient(out: Output, msg: Message, pid: Segment | None = None) -> JSON:
    """Map the message's (or the given) PID with its PD1 and NK1s; returns a Reference."""
    if pid is None:
        pid = msg.segment("PID")
    if pid is None:
        raise MissingRequiredField("PID segment is missing: no patient", location="PID")
    key, authority, _ = _key_identifier(out, pid)
    pid_id = patient_id_for(out, key, authority)
    res: JSON = {"resourceType": "Patient", "id": pid_id}
    ext: list[JSON] = []

    identifiers: list[JSON] = []
    for n in (3, 2, 4):
        for ident in out.identifiers(pid, n):
            if ident not in identifiers:
                identifiers.append(ident)
    ssn = pid.get(19)
    if ssn:
        identifiers.append(
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "SS",
                            "display": "Social Security number",
                        }
                    ]
                },
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": ssn,
            }
        )
    dl = pid.first(20)
    if dl.get(1):
        ident = {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                        "code": "DL",
                        "display": "Driver's license number",
                    }
                ]
            },
            "value": dl.get(1),
        }
        if dl.get(2):
            ident["assigner"] = {"display": dl.get(2)}
        identifiers.append(ident)
    res["identifier"] = identifiers

    names = out.names(pid, 5)
    if names:
        res["name"] = names
    mmn = pid.first(6).get(1)
    if mmn:
        ext.append({"url": _MOTHERS_MAIDEN, "valueString": mmn})

    telecom = _patient_telecom(out, pid)
    if telecom:
        res["telecom"] = telecom

    gender = out.mapped(pid, 8, codes.ADMINISTRATIVE_SEX)
    if gender:
        res["gender"] = gender

    birth = pid.get(7)
    if birth:
        parsed = out.safely("PID-7", lambda: dt.parse_dtm(birth))
        if parsed is not None:
            res["birthDate"] = parsed.date_text()
            if parsed.has_time:
                value = dt.fhir_datetime(birth, out.tz)
                ext.append({"url": _BIRTH_TIME, "valueDateTime": value})

    deceased_at = out.datetime(pid, 29)
    if deceased_at:
        res["deceasedDateTime"] = deceased_at
    else:
        flag = pid.get(30).upper()
        if flag in ("Y", "N"):
            res["deceasedBoolean"] = flag == "Y"

    addresses = out.addresses(pid, 11)
    if addresses:
        res["address"] = addresses

    marital = out.concept(pid, 16, codes.MARITAL_STATUS)
    if marital:
        res["maritalStatus"] = marital

    multiple = pid.get(24).upper()
    order = pid.get(25)
    if order:
        birth_order = out.safely("PID-25", lambda: dt.positive_int(order))
        if birth_order:
            res["multipleBirthInteger"] = birth_order
    elif multiple in ("Y", "N"):
        res["multipleBirthBoolean"] = multiple == "Y"

    language = out.concept(pid, 15)
    if language:
        res["communication"] = [{"language": language, "preferred": True}]

    religion = out.concept(pid, 17)
    if religion:
        ext.append({"url": _RELIGION, "valueCodeableConcept": religion})

    gp = _general_practitioners(out, msg)
    if gp:
        res["generalPractitioner"] = gp

    if ext:
        res["extension"] = ext
    return out.add(res)


def _patient_telecom(out: Output, pid: Segment) -> list[JSON]:
    # PID-13 home, PID-14 business (use defaults when XTN-2 is empty), PID-40 (v2.7+).
    found: list[JSON] = []
    for n, default_use in ((13, "home"), (14, "work"), (40, "")):
        for rep in pid.reps(n):
            cp = dt.contact_point(rep, out.tz, out.version)
            if not cp:
                continue
            if default_use and "use" not in cp and cp["system"] in ("phone", "fax"):
                cp["use"] = default_use
            if cp not in found:
                found.append(cp)
    return found


def _general_practitioners(out: Output, msg: Message) -> list[JSON]:
    pd1 = msg.segment("PD1")
    if pd1 is None:
        return []
    refs: list[JSON] = []
    for rep in pd1.reps(3):
        org = _organization(out, rep)
        if org:
            refs.append(org)
    for rep in pd1.reps(4):
        ref = out.practitioner(rep, "PD1-4")
        if ref:
            refs.append(ref)
    return refs


def _organization(out: Output, xon: Component) -> JSON | None:
    """XON → Organization: name XON-1, identifier XON-10 (or XON-3 before v2.5)."""
    name = xon.get(1)
    ident_value = xon.get(10) or xon.get(3)
    if not name and not ident_value:
        return None
    res: JSON = {"resourceType": "Organization"}
    if ident_value:
        system, assigner = dt.identifier_system(
            xon.get(6, 1), xon.get(6, 2), xon.get(6, 3), out.systems, xon.get(7)
        )
        ident: JSON = {"value": ident_value}
        if system:
            ident["system"] = system
        res["identifier"] = [ident]
        res["id"] = (
            out.make_id("Organization", system, ident_value)
            if system
            else out.scoped_id("Organization", assigner, ident_value)
        )
    else:
        res["id"] = out.scoped_id("Organization", "name", name)
    if name:
        res["name"] = name
    ref = out.add(res)
    if name:
        ref["display"] = name
    return ref


def related_persons(out: Output, msg: Message, patient: JSON) -> list[JSON]:
    """NK1 → RelatedPerson, one per NK1 that names someone."""
    refs = []
    patient_id = patient["reference"].split("/", 1)[1]
    for nk1 in msg.segments("NK1"):
        names = out.names(nk1, 2)
        relationship = out.concept(nk1, 3, codes.RELATIONSHIP)
        telecom = out.telecoms(nk1, 5, 6)
        addresses = out.addresses(nk1, 4)
        if not (names or telecom or addresses):
            continue
        key = nk1.raw_field(2) or nk1.raw_field(5) or nk1.raw_field(4)
        res: JSON = {
            "resourceType": "RelatedPerson",
            "id": out.make_id("RelatedPerson", patient_id, nk1.get(1), key),
            "patient": patient,
        }
        idents = out.identifiers(nk1, 12) + out.identifiers(nk1, 33)
        if idents:
            res["identifier"] = idents
        if relationship:
            res["relationship"] = [relationship]
        if names:
            res["name"] = names
        if telecom:
            res["telecom"] = telecom
        if addresses:
            res["address"] = addresses
        gender = out.mapped(nk1, 15, codes.ADMINISTRATIVE_SEX)
        if gender:
            res["gender"] = gender
        birth = out.date(nk1, 16)
        if birth:
            res["birthDate"] = birth
        start, end = out.datetime(nk1, 8), out.datetime(nk1, 9)
        if start or end:
            res["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        refs.append(out.add(res))
    return refs
