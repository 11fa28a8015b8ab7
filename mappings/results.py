"""ORU^R01 → DiagnosticReport and Observations, after the IG's ORU_R01, ``OBR[DiagnosticReport]``
and ``OBX[Observation]`` maps. :func:`map_observation` also serves OBX in ADT and VXU.

Values by OBX-2: NM → valueQuantity (UCUM when OBX-6 says UCUM or the unit is a known UCUM
code; ``<5`` style values keep their comparator), ST/TX/FT → valueString, CE/CWE/CNE →
valueCodeableConcept, SN → valueQuantity with comparator, valueRange (``1-5``) or valueRatio
(``1:128``), DT → valueDateTime (a date), TS/DTM → valueDateTime, TM → valueTime. Other types
(ED, RP, ...) keep no value and get a warning.

Consecutive TX/FT/ST OBX in one OBR with the same OBX-3 and OBX-4 are one narrative written
line by line (LinuxForHealth's samples even leave OBX-3 empty): they become one Observation whose
value joins the lines with line breaks.
"""

from __future__ import annotations

import re
from typing import Any

from mappings import codes
from mappings import datatypes as dt
from mappings.errors import MissingRequiredField
from mappings.message import Message, Segment
from mappings.output import Output
from mappings.patient import map_patient

__all__ = ["map_observation", "map_oru", "quantity", "reference_range"]

JSON = dict[str, Any]

UCUM = "http://unitsofmeasure.org"
_TEXT_TYPES = frozenset({"ST", "TX", "FT"})
_COMPARATORS = ("<=", ">=", "<", ">")

# Units senders write without naming UCUM that are valid UCUM codes as written.
_KNOWN_UCUM = frozenset(
    [
        "%", "/min", "1/min", "cm", "m", "mm", "kg", "g", "mg", "ug", "ng", "L", "mL", "dL",
        "g/dL", "mg/dL", "g/L", "mg/L", "ug/L", "ug/dL", "ng/mL", "pg/mL", "mmol/L", "umol/L",
        "nmol/L", "meq/L", "mEq/L", "U/L", "IU/L", "[IU]/L", "mm[Hg]", "Cel", "[degF]", "kg/m2",
        "fL", "pg", "10*3/uL", "10*6/uL", "10*9/L", "10*12/L", "s", "min", "h", "d", "wk", "mo",
        "a", "{beats}/min", "mL/min", "mL/min/{1.73_m2}", "[in_i]", "[lb_av]", "cm[H2O]", "mosm/kg",
    ]
)  # fmt: skip
_UNIT_SYNONYMS = {"beats/min": "/min", "bpm": "/min", "degC": "Cel", "mmHg": "mm[Hg]"}


def _ref_id(ref: JSON) -> str:
    return str(ref["reference"]).split("/", 1)[1]


def quantity(out: Output, value: float | int, unit_seg: Segment, n: int) -> JSON:
    """A Quantity from a number and a CWE unit field (OBX-6, RXA-7, ...)."""
    q: JSON = {"value": value}
    unit = unit_seg.first(n)
    code, text, system = unit.get(1), unit.get(2), unit.get(3).upper()
    if code or text:
        q["unit"] = text or code
    if code:
        if system == "UCUM" or code in _KNOWN_UCUM:
            q["system"] = UCUM
            q["code"] = code
        elif code in _UNIT_SYNONYMS:
            q["system"] = UCUM
            q["code"] = _UNIT_SYNONYMS[code]
        elif system:
            uri = codes.coding_system_uri(system)
            if uri:
                q["system"] = uri
                q["code"] = code
    return q


_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?:-|–|to)\s*([+-]?\d+(?:\.\d+)?)\s*$")
_ONE_SIDED = re.compile(r"^\s*(<=|>=|<|>)\s*([+-]?\d+(?:\.\d+)?)\s*$")


def reference_range(text: str, unit: JSON | None) -> JSON | None:
    """OBX-7 (``70-80``, ``<5``, ``>=10``, free text) → Observation.referenceRange."""
    text = text.strip()
    if not text:
        return None

    def _q(v: str) -> JSON:
        num = dt.decimal(v)
        q: JSON = {"value": num}
        if unit:
            q.update({k: unit[k] for k in ("unit", "system", "code") if k in unit})
        return q

    m = _RANGE.match(text)
    if m:
        return {"low": _q(m.group(1)), "high": _q(m.group(2)), "text": text}
    m = _ONE_SIDED.match(text)
    if m:
        side = "high" if m.group(1).startswith("<") else "low"
        return {side: _q(m.group(2)), "text": text}
    return {"text": text}


def _value(out: Output, obx: Segment, vtype: str, where: str) -> tuple[str, Any] | None:
    reps = obx.reps(5)
    if not reps:
        return None
    if vtype in _TEXT_TYPES:
        return "valueString", obx.text(5)
    if len(reps) > 1:
        out.warn(where, f"{len(reps)} repetitions in a {vtype} value; the first is kept")
    first = reps[0]
    if vtype == "NM":
        text = first.text()
        comparator = ""
        for op in _COMPARATORS:
            if text.startswith(op):
                comparator, text = op, text[len(op) :].strip()
                break
        num = out.safely(where, lambda: dt.decimal(text))
        if num is None:
            return None
        q = quantity(out, num, obx, 6)
        if comparator:
            q["comparator"] = comparator
        return "valueQuantity", q
    if vtype in ("CE", "CWE", "CNE", "CF"):
        cc = dt.codeable_concept(first)
        return ("valueCodeableConcept", cc) if cc else None
    if vtype == "SN":
        return _structured_numeric(out, obx, where)
    if vtype in ("DT", "TS", "DTM"):
        value = out.datetime_value(first.get(1), where)
        return ("valueDateTime", value) if value else None
    if vtype == "TM":
        tm = first.get(1)
        m = re.match(r"^(\d{2})(\d{2})?(\d{2})?", tm)
        if not m:
            out.warn(where, f"{tm!r} is not a time; left out")
            return None
        h, mi, s = m.group(1), m.group(2) or "00", m.group(3) or "00"
        return "valueTime", f"{h}:{mi}:{s}"
    out.warn(where, f"value type {vtype or '(empty)'} is not mapped; value left out")
    return None


def _structured_numeric(out: Output, obx: Segment, where: str) -> tuple[str, Any] | None:
    sn = obx.first(5)
    comparator, num1, sep, num2 = sn.get(1), sn.get(2), sn.get(3), sn.get(4)
    try:
        n1 = dt.decimal(num1)
        n2 = dt.decimal(num2)
    except dt.DatatypeError as exc:
        out.warn(where, f"{exc}; left out")
        return None
    if sep in (":", "/") and n1 is not None and n2 is not None:
        return "valueRatio", {"numerator": {"value": n1}, "denominator": {"value": n2}}
    if sep in ("-",) and n1 is not None and n2 is not None:
        low, high = quantity(out, n1, obx, 6), quantity(out, n2, obx, 6)
        return "valueRange", {"low": low, "high": high}
    if sep == "+" and n1 is not None:
        q = quantity(out, n1, obx, 6)
        q["comparator"] = ">="
        return "valueQuantity", q
    if n1 is None:
        return None
    q = quantity(out, n1, obx, 6)
    if comparator in ("<", ">", "<=", ">="):
        q["comparator"] = comparator
    elif comparator == "=" or not comparator:
        pass
    else:
        out.warn(where, f"comparator {comparator!r} is not a FHIR comparator; left out")
    return "valueQuantity", q


def map_observation(
    out: Output,
    msg: Message,
    obx: Segment,
    patient: JSON,
    *,
    key: tuple[str, ...],
    encounter: JSON | None = None,
    default_code: JSON | None = None,
    effective: str | None = None,
    text_override: str | None = None,
    part_of: JSON | None = None,
) -> JSON | None:
    """One OBX → an Observation (added); returns a Reference, or None when it has no code."""
    where = f"OBX-5 (#{obx.get(1) or obx.index})"
    code = out.concept(obx, 3) or default_code
    if code is None:
        out.warn(f"OBX-3 (#{obx.get(1) or obx.index})", "no observation code; OBX left out")
        return None
    status = codes.OBSERVATION_STATUS.code(obx.get(11)) if obx.get(11) else None
    res: JSON = {
        "resourceType": "Observation",
        "id": out.make_id(
            "Observation",
            _ref_id(patient),
            *key,
            obx.get(1),
            obx.raw_field(3),
            obx.get(4),
        ),
        "status": status or ("unknown" if obx.get(11) else "final"),
    }
    if obx.get(11) and status is None:
        out.warn(f"OBX-11 (#{obx.get(1) or obx.index})", f"{obx.get(11)!r} is not mapped")
    if part_of:
        res["partOf"] = [part_of]
    res["code"] = code
    res["subject"] = patient
    if encounter:
        res["encounter"] = encounter
    when = out.datetime(obx, 14) or effective
    if when:
        res["effectiveDateTime"] = when
    vtype = obx.get(2).upper()
    if text_override is not None:
        value: tuple[str, Any] | None = ("valueString", text_override) if text_override else None
    else:
        value = _value(out, obx, vtype, where)
    if value:
        res[value[0]] = value[1]
    interp = [
        cd for cd in (codes.INTERPRETATION.coding(r.get(1)) for r in obx.reps(8)) if cd is not None
    ]
    if interp:
        res["interpretation"] = [{"coding": [cd]} for cd in interp]
    unit_q = res.get("valueQuantity")
    rr_text = obx.get(7)
    if rr_text:
        rr = out.safely(f"OBX-7 (#{obx.get(1)})", lambda: reference_range(rr_text, unit_q))
        if rr:
            res["referenceRange"] = [rr]
    method = out.concept(obx, 17)
    if method:
        res["method"] = method
    performers = [
        ref for ref in (out.practitioner(r, "OBX-16") for r in obx.reps(16)) if ref is not None
    ]
    if performers:
        res["performer"] = performers
    notes = [n.text(3) for n in msg.after(obx, "NTE", stop=_GROUP_STARTS) if n.text(3)]
    if notes:
        res["note"] = [{"text": t} for t in notes]
    return out.add(res)


_GROUP_STARTS = frozenset({"OBR", "ORC", "RXA", "SPM", "PID", "PV1", "OBX"})


def map_oru(out: Output, msg: Message, trigger: str) -> None:
    patient = map_patient(out, msg)
    obrs = msg.segments("OBR")
    if not obrs:
        raise MissingRequiredField("OBR segment is missing: no report", location="OBR")
    for obr in obrs:
        _report(out, msg, obr, patient)


def _report(out: Output, msg: Message, obr: Segment, patient: JSON) -> None:
    orc = _preceding_orc(msg, obr)
    filler = obr.first(3) if obr.get(3) else (orc.first(3) if orc is not None else obr.first(3))
    placer = obr.first(2) if obr.get(2) else (orc.first(2) if orc is not None else obr.first(2))
    order_key = filler.get(1) or placer.get(1)
    res: JSON = {"resourceType": "DiagnosticReport"}
    if order_key:
        res["id"] = out.scoped_id("DiagnosticReport", order_key, obr.get(4))
    else:
        res["id"] = out.message_id("DiagnosticReport", obr.get(1), obr.raw_field(4))
    idents = []
    for comp, id_type in ((filler, "FILL"), (placer, "PLAC")):
        ident = dt.ei_identifier(comp, out.systems, id_type)
        if ident:
            idents.append(ident)
    if idents:
        res["identifier"] = idents
    status_raw = obr.get(25)
    status = codes.REPORT_STATUS.code(status_raw) if status_raw else None
    if status_raw and status is None:
        out.warn("OBR-25", f"{status_raw!r} is not mapped; status unknown")
    res["status"] = status or ("unknown" if status_raw else "final")
    section = out.concept(obr, 24)
    if section:
        res["category"] = [section]
    code = out.concept(obr, 4)
    if code is None:
        out.warn("OBR-4", "no universal service id; report code unknown")
        code = {"text": "unknown"}
    res["code"] = code
    res["subject"] = patient
    effective = out.datetime(obr, 7)
    if effective:
        res["effectiveDateTime"] = effective
    issued = out.instant(obr, 22)
    if issued:
        res["issued"] = issued
    interpreters = [
        ref
        for ref in (out.practitioner(r.part(1), "OBR-32") for r in obr.reps(32))
        if ref is not None
    ]
    if interpreters:
        res["resultsInterpreter"] = interpreters

    results = []
    pending: list[Segment] = []

    def flush() -> None:
        if not pending:
            return
        first = pending[0]
        text = "\n".join(s.text(5) for s in pending) if len(pending) > 1 else None
        ref = map_observation(
            out,
            msg,
            first,
            patient,
            key=("report", res["id"]),
            default_code=code,
            effective=effective,
            text_override=text,
        )
        if ref:
            results.append(ref)
        pending.clear()

    for obx in _observations_of(msg, obr):
        is_text = obx.get(2).upper() in _TEXT_TYPES
        if (
            is_text
            and pending
            and pending[0].get(2).upper() in _TEXT_TYPES
            and pending[0].raw_field(3) == obx.raw_field(3)
            and pending[0].get(4) == obx.get(4)
        ):
            pending.append(obx)
            continue
        flush()
        pending.append(obx)
    flush()
    if results:
        res["result"] = results
    conclusion = [n.text(3) for n in msg.after(obr, "NTE", stop=_GROUP_STARTS) if n.text(3)]
    if conclusion:
        res["conclusion"] = "\n".join(conclusion)
    out.add(res)


def _preceding_orc(msg: Message, obr: Segment) -> Segment | None:
    for seg in reversed(msg.segments_list[: obr.index]):
        if seg.id == "ORC":
            return seg
        if seg.id == "OBR":
            return None
    return None


def _observations_of(msg: Message, obr: Segment) -> list[Segment]:
    found = []
    for seg in msg.segments_list[obr.index + 1 :]:
        if seg.id in ("OBR", "ORC", "PID"):
            break
        if seg.id == "OBX":
            found.append(seg)
    return found
