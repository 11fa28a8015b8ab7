"""HL7 v2 data types → FHIR R4 data types (plain dicts), after the IG's data type maps.

Each reader takes a :class:`mappings.message.Component` (one repetition of a field, or a component
viewed as its subcomponents) and returns the FHIR JSON value, or None when nothing usable is in
it. A value that is present but cannot be read raises :class:`DatatypeError`; the family mappers
catch it, leave the element out and record a warning naming segment and field.

The maps followed are in ``shared/corpus/mappings/hl7-v2-to-fhir/datatypes/`` (``DTM[dateTime]``,
``XPN[HumanName]``, ``XAD[Address]``, ``XTN[ContactPoint]``, ``CX[Identifier]``,
``CWE[CodeableConcept]``, ``XCN[Practitioner]``, ``PL[Location]``, ``SN[Quantity]``...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from mappings import codes
from mappings.message import Component

__all__ = [
    "DTM",
    "DatatypeError",
    "address",
    "codeable_concept",
    "coding",
    "contact_point",
    "decimal",
    "fhir_date",
    "fhir_datetime",
    "fhir_instant",
    "human_name",
    "identifier",
    "identifier_system",
    "parse_dtm",
    "period",
    "positive_int",
    "xcn_name",
]

JSON = dict[str, Any]

UCUM_URI = "http://unitsofmeasure.org"


class DatatypeError(ValueError):
    """A v2 value is present but cannot be read as its data type."""


# ---------------------------------------------------------------------------------------------
# DTM / TS / DT


_DTM = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?\s*([+-]\d{4})?$"
)
_DASHED = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?$")
_TEXT_DATE_FORMATS = ("%b %d, %Y", "%B %d, %Y", "%d %b %Y", "%m/%d/%Y")


@dataclass(frozen=True, slots=True)
class DTM:
    """An HL7 DTM read to the precision it was sent with (``None`` for parts not sent).

    ``offset`` is the sender's UTC offset in minutes when the value carries one.
    """

    year: int
    month: int | None = None
    day: int | None = None
    hour: int | None = None
    minute: int | None = None
    second: int | None = None
    fraction: str = ""
    offset: int | None = None

    @property
    def has_time(self) -> bool:
        return self.hour is not None

    def date_text(self) -> str:
        out = f"{self.year:04d}"
        if self.month is not None:
            out += f"-{self.month:02d}"
            if self.day is not None:
                out += f"-{self.day:02d}"
        return out


def parse_dtm(value: str) -> DTM | None:
    """Read a DTM/TS/DT value; None when empty, :class:`DatatypeError` when unreadable.

    Tolerates what real feeds send besides the standard form: ``1928-01-01`` (dashes),
    ``Aug 15, 1942`` (text), a space before the offset, and an offset without seconds.
    """
    value = value.strip()
    if not value:
        return None
    m = _DTM.match(value)
    if m:
        y, mo, d, h, mi, s, frac, off = m.groups()
        if mo is None and (d or h):
            raise DatatypeError(f"{value!r} is not an HL7 date/time")
        dtm = DTM(
            int(y),
            int(mo) if mo else None,
            int(d) if d else None,
            int(h) if h else None,
            int(mi) if mi else None,
            int(s) if s else None,
            frac or "",
            _offset_minutes(off) if off else None,
        )
        _check(dtm, value)
        return dtm
    m2 = _DASHED.match(value)
    if m2:
        y, mo, d, h, mi, s = m2.groups()
        dtm = DTM(
            int(y),
            int(mo),
            int(d) if d else None,
            int(h) if h else None,
            int(mi) if mi else None,
            int(s) if s else None,
        )
        _check(dtm, value)
        return dtm
    for fmt in _TEXT_DATE_FORMATS:
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return DTM(parsed.year, parsed.month, parsed.day)
    raise DatatypeError(f"{value!r} is not an HL7 date/time")


def _offset_minutes(text: str) -> int:
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise DatatypeError(f"time zone offset {text!r} is out of range")
    return sign * (hours * 60 + minutes)


def _check(dtm: DTM, value: str) -> None:
    try:
        date(dtm.year, dtm.month or 1, dtm.day or 1)
    except ValueError:
        raise DatatypeError(f"{value!r} is not a calendar date") from None
    if dtm.year < 1:
        raise DatatypeError(f"{value!r} is not a calendar date")
    if (
        (dtm.hour is not None and dtm.hour > 23)
        or (dtm.minute is not None and dtm.minute > 59)
        or (dtm.second is not None and dtm.second > 59)
    ):
        raise DatatypeError(f"{value!r} is not a time of day")


def _format_offset(minutes: int) -> str:
    if minutes == 0:
        return "Z"
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _offset_for(dtm: DTM, tz: tzinfo) -> int:
    local = datetime(
        dtm.year,
        dtm.month or 1,
        dtm.day or 1,
        dtm.hour or 0,
        dtm.minute or 0,
        dtm.second or 0,
        tzinfo=tz,
    )
    off = local.utcoffset() or timedelta(0)
    return int(off.total_seconds() // 60)


def _time_text(dtm: DTM, tz: tzinfo) -> str:
    frac = f".{dtm.fraction}" if dtm.fraction else ""
    offset = dtm.offset if dtm.offset is not None else _offset_for(dtm, tz)
    return (
        f"{dtm.hour or 0:02d}:{dtm.minute or 0:02d}:{dtm.second or 0:02d}{frac}"
        f"{_format_offset(offset)}"
    )


def fhir_datetime(value: str, tz: tzinfo) -> str | None:
    """A FHIR ``dateTime`` at the precision sent. A date stays a date (no time zone); a time
    without an offset is read in ``tz`` (the sender's zone) and gets that zone's offset on that
    day, since FHIR requires a zone once there is a time. Hours-only and minutes-only times are
    padded to seconds, which FHIR requires."""
    dtm = parse_dtm(value)
    if dtm is None:
        return None
    if not dtm.has_time:
        return dtm.date_text()
    return f"{dtm.date_text()}T{_time_text(dtm, tz)}"


def fhir_instant(value: str, tz: tzinfo) -> str | None:
    """A FHIR ``instant`` (needs a full time): a date alone becomes midnight in ``tz``."""
    dtm = parse_dtm(value)
    if dtm is None:
        return None
    if dtm.month is None or dtm.day is None:
        raise DatatypeError(f"{value!r} is too imprecise for an instant")
    if not dtm.has_time:
        dtm = DTM(dtm.year, dtm.month, dtm.day, 0, 0, 0, "", dtm.offset)
    return f"{dtm.date_text()}T{_time_text(dtm, tz)}"


def fhir_date(value: str) -> str | None:
    """A FHIR ``date``: the date part as sent (``197006010912`` → ``1970-06-01``)."""
    dtm = parse_dtm(value)
    return dtm.date_text() if dtm else None


def period(start: str, end: str, tz: tzinfo) -> JSON | None:
    out: JSON = {}
    s = fhir_datetime(start, tz)
    e = fhir_datetime(end, tz)
    if s:
        out["start"] = s
    if e:
        out["end"] = e
    return out or None


# ---------------------------------------------------------------------------------------------
# numbers


_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def decimal(text: str) -> float | int | None:
    """An NM value as a JSON number (int when integral as sent), None when empty."""
    text = text.strip()
    if not text:
        return None
    if not _DECIMAL.match(text):
        raise DatatypeError(f"{text!r} is not a number")
    if "." not in text and "e" not in text.lower():
        return int(text)
    if text.endswith("."):
        text = text[:-1]
    if text.startswith("."):
        text = "0" + text
    return float(text)


def positive_int(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        n = int(float(text))
    except ValueError:
        raise DatatypeError(f"{text!r} is not a whole number") from None
    return n if n > 0 else None


# ---------------------------------------------------------------------------------------------
# coded values


def _code(text: str) -> str:
    # FHIR code: no leading/trailing or repeated whitespace
    return " ".join(text.split())


def coding(c: Component, first: int = 1) -> JSON | None:
    """One coding from CWE components ``first`` (code), +1 (display), +2 (system)."""
    code = _code(c.get(first))
    display = c.get(first + 1)
    if not code and not display:
        return None
    out: JSON = {}
    system = codes.coding_system_uri(c.get(first + 2))
    if system:
        out["system"] = system
    if code:
        out["code"] = code
    if display:
        out["display"] = display
    return out if code else None


def codeable_concept(c: Component, table: codes.CodeMap | None = None) -> JSON | None:
    """CWE/CE/CNE → CodeableConcept: codings from the identifier, alternate and second
    alternate triplets; text from CWE-9 (original text) or else the first display.

    With ``table``, a v2-table code the IG maps to a FHIR code system is written first as that
    FHIR coding, then the original coding follows.
    """
    out: JSON = {}
    codings: list[JSON] = []
    for first, version in ((1, 7), (4, 8), (10, 13)):
        cd = coding(c, first)
        if cd:
            ver = c.get(version)
            if ver:
                cd["version"] = ver
            codings.append(cd)
    if table is not None and c.get(1):
        mapped = table.coding(c.get(1))
        if mapped:
            codings.insert(0, mapped)
            if not c.get(3):
                # the original is the v2 table itself
                codings[1]["system"] = f"http://terminology.hl7.org/CodeSystem/v2-{table.v2_table}"
    if codings:
        out["coding"] = codings
    text = c.get(9) or c.get(2)
    if not codings and not text:
        text = c.get(1)
    if text:
        out["text"] = text
    return out or None


def text_concept(text: str) -> JSON | None:
    text = text.strip()
    return {"text": text} if text else None


# ---------------------------------------------------------------------------------------------
# identifiers


def identifier_system(
    ns: str, uid: str, uid_type: str, systems: Mapping[str, str], id_type: str = ""
) -> tuple[str | None, str]:
    """The system URI for an assigning authority (HD), and its display name.

    In order: the caller's map (by namespace id, universal id, or ``namespace^universal id``),
    the universal id by its type (ISO → ``urn:oid:``, UUID → ``urn:uuid:``, URI as is), then the
    few registry namespaces every feed uses (SSA for SS numbers, NPI, the NHS number).
    """
    uid_type = uid_type.upper()
    for key in (f"{ns}^{uid}" if ns and uid else "", ns, uid):
        if key and key in systems:
            return systems[key], ns or uid
    if uid:
        if uid_type == "ISO" and codes._is_oid(uid):
            return f"urn:oid:{uid}", ns or uid
        if uid_type == "UUID":
            return f"urn:uuid:{uid.lower()}", ns or uid
        if uid_type in ("URI", "URL") and ":" in uid:
            return uid, ns or uid
    upper = ns.upper()
    if id_type == "SS" and upper in ("SSA", "USSSA", "SSN", "US"):
        return "http://hl7.org/fhir/sid/us-ssn", ns
    if upper == "NPI" or id_type == "NPI":
        return "http://hl7.org/fhir/sid/us-npi", ns
    if upper in ("NHS", "NHSNBR") or (id_type == "NH" and upper.startswith("NHS")):
        return "https://fhir.nhs.uk/Id/nhs-number", ns
    return None, ns or uid


def _type_concept(code: str, table: str = "0203") -> JSON:
    cd: JSON = {"system": f"http://terminology.hl7.org/CodeSystem/v2-{table}", "code": code}
    display = codes.IDENTIFIER_TYPE_DISPLAY.get(code.upper()) if table == "0203" else None
    if display:
        cd["display"] = display
    return {"coding": [cd]}


def identifier(
    c: Component,
    systems: Mapping[str, str],
    tz: tzinfo,
    *,
    value_at: int = 1,
    authority_at: int = 4,
    type_at: int = 5,
    period_at: tuple[int, int] | None = (7, 8),
) -> JSON | None:
    """CX (and the identifier parts of XCN, XON, EI) → Identifier."""
    value = c.get(value_at)
    if not value:
        return None
    id_type = _code(c.get(type_at)) if type_at else ""
    out: JSON = {}
    if id_type:
        out["type"] = _type_concept(id_type)
    hd = c.part(authority_at)
    system, assigner = identifier_system(hd.get(1), hd.get(2), hd.get(3), systems, id_type.upper())
    if system:
        out["system"] = system
    out["value"] = value
    if period_at:
        start = c.get(period_at[0])
        end = c.get(period_at[1])
        p: JSON = {}
        try:
            if start:
                p["start"] = fhir_datetime(start, tz)
            if end:
                p["end"] = fhir_datetime(end, tz)
        except DatatypeError:
            p = {}
        if p:
            out["period"] = p
    if assigner and not system:
        out["assigner"] = {"display": assigner}
    return out


def ei_identifier(c: Component, systems: Mapping[str, str], id_type: str = "") -> JSON | None:
    """EI (entity identifier: id^namespace^universal id^type) → Identifier."""
    value = c.get(1)
    if not value:
        return None
    out: JSON = {}
    if id_type:
        out["type"] = _type_concept(id_type)
    system, assigner = identifier_system(c.get(2), c.get(3), c.get(4), systems)
    if system:
        out["system"] = system
    out["value"] = value
    if assigner and not system:
        out["assigner"] = {"display": assigner}
    return out


# ---------------------------------------------------------------------------------------------
# names, addresses, telecom


def _name(
    family: str,
    given: list[str],
    prefix: list[str],
    suffix: list[str],
    use: str = "",
) -> JSON | None:
    out: JSON = {}
    if use:
        out["use"] = use
    if family:
        out["family"] = family
    given = [g for g in given if g]
    if given:
        out["given"] = given
    prefix = [p for p in prefix if p]
    if prefix:
        out["prefix"] = prefix
    suffix = [s for s in suffix if s]
    if suffix:
        out["suffix"] = suffix
    if not (family or given):
        return None
    return out


def human_name(c: Component, tz: tzinfo) -> JSON | None:
    """XPN → HumanName: family XPN-1.1, given XPN-2 and XPN-3, suffix XPN-4, XPN-6 and XPN-14,
    prefix XPN-5, use from XPN-7 (table 0200), period from XPN-12/13 or XPN-10."""
    family = c.get(1)
    use = codes.NAME_USE.code(c.get(7)) or ""
    name = _name(family, [c.get(2), c.get(3)], [c.get(5)], [c.get(4), c.get(6), c.get(14)], use)
    if name is None:
        return None
    try:
        p = period(c.get(12) or c.get(10, 1), c.get(13) or c.get(10, 2), tz)
    except DatatypeError:
        p = None
    if p:
        name["period"] = p
    return name


def xcn_name(c: Component) -> JSON | None:
    """The name parts of XCN (or CNN/NDL): family XCN-2, given XCN-3 and XCN-4, suffix XCN-5
    and XCN-7 (degree), prefix XCN-6."""
    return _name(c.get(2), [c.get(3), c.get(4)], [c.get(6)], [c.get(5), c.get(7)])


def address(c: Component, tz: tzinfo) -> JSON | None:
    """XAD → Address: lines from XAD-1 (SAD, its parts in order) and XAD-2, city XAD-3, state
    XAD-4, postal code XAD-5, country XAD-6, use/type from XAD-7 (table 0190), district XAD-9,
    period from XAD-13/14 or XAD-12."""
    out: JSON = {}
    kind = c.get(7)
    use = codes.ADDRESS_USE.code(kind)
    typ = codes.ADDRESS_TYPE.code(kind)
    if use:
        out["use"] = use
    if typ:
        out["type"] = typ
    street = c.part(1)
    lines = [street.get(1), street.get(2), street.get(3), c.get(2)]
    lines = [x for x in lines if x]
    if lines:
        out["line"] = lines
    for key, idx in (("city", 3), ("district", 9), ("state", 4), ("postalCode", 5), ("country", 6)):
        v = c.get(idx)
        if v:
            out[key] = v
    if len(out) == sum(1 for k in ("use", "type") if k in out):
        return None
    try:
        p = period(c.get(13) or c.get(12, 1), c.get(14) or c.get(12, 2), tz)
    except DatatypeError:
        p = None
    if p:
        out["period"] = p
    return out


_URLISH = re.compile(r"^(https?://|www\.)", re.IGNORECASE)


def contact_point(c: Component, tz: tzinfo, version: str = "") -> JSON | None:
    """XTN → ContactPoint.

    system from XTN-3 (table 0202), use from XTN-2 (table 0201; CP also means use ``mobile``),
    value from XTN-4 for Internet/X.400, else XTN-12 (unformatted), else the number built from
    XTN-5/6/7/8, else XTN-1 (v2.3 and earlier carried the whole number there), rank XTN-18,
    period XTN-13/14.
    """
    equip = c.get(3)
    equip_u = equip.upper()
    email = c.get(4)
    out: JSON = {}
    system = codes.TELECOM_EQUIPMENT.code(equip_u)
    if equip_u in ("INTERNET", "X.400") or (not equip and email and not c.get(7)):
        value = email or c.get(1)
        if not system:
            system = "email"
        if value and _URLISH.match(value):
            system = "url"
    else:
        value = c.get(12) or _phone(c) or c.get(1)
    if not value:
        return None
    if not system:
        system = "email" if "@" in value else "phone"
    out["system"] = system
    out["value"] = value
    use = codes.TELECOM_USE.code(c.get(2))
    if equip_u == "CP" and use in (None, "home"):
        use = "mobile"
    if use:
        out["use"] = use
    try:
        rank = positive_int(c.get(18))
    except DatatypeError:
        rank = None
    if rank:
        out["rank"] = rank
    try:
        p = period(c.get(13), c.get(14), tz)
    except DatatypeError:
        p = None
    if p:
        out["period"] = p
    return out


def _phone(c: Component) -> str:
    local = c.get(7)
    if not local:
        return ""
    country, area, ext = c.get(5), c.get(6), c.get(8)
    out = local
    if area:
        out = f"({area}) {out}"
    if country:
        out = f"+{country.lstrip('+')} {out}"
    if ext:
        out = f"{out} ext. {ext}"
    return out


def add_minutes(value: str, minutes: float) -> str | None:
    """A FHIR dateTime (with a time) plus ``minutes``, in the same offset; None for a date."""
    if "T" not in value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    later = parsed + timedelta(minutes=minutes)
    text = later.isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


# UCUM codes for the duration units v2 senders write (ISO+/ANSI/UCUM and plain words).
_DURATION_UNITS = {
    "S": "s", "SEC": "s", "SECOND": "s", "SECONDS": "s",
    "MIN": "min", "MINUTE": "min", "MINUTES": "min", "MINS": "min",
    "H": "h", "HR": "h", "HRS": "h", "HOUR": "h", "HOURS": "h",
    "D": "d", "DAY": "d", "DAYS": "d",
    "W": "wk", "WK": "wk", "WEEK": "wk", "WEEKS": "wk",
    "MO": "mo", "MONTH": "mo", "MONTHS": "mo",
    "A": "a", "Y": "a", "YR": "a", "YEAR": "a", "YEARS": "a",
}  # fmt: skip
_UCUM_MINUTES = {"s": 1 / 60, "min": 1, "h": 60, "d": 1440, "wk": 10080, "mo": 43830, "a": 525960}


def duration_unit(text: str) -> str | None:
    """A v2 duration unit (``D``, ``day``, ``Hr``, ``min``, ``wk``...) as its UCUM code."""
    return _DURATION_UNITS.get(text.strip().upper())


def duration(amount: str, unit: str) -> JSON | None:
    """CQ quantity + unit → a FHIR Duration (UCUM), None when either is unusable."""
    value = decimal(amount)
    code = duration_unit(unit)
    if value is None or code is None:
        return None
    return {"value": value, "unit": code, "system": UCUM_URI, "code": code}


def minutes_of(d: JSON) -> float:
    return float(d["value"]) * _UCUM_MINUTES[d["code"]]


_LEADING_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def tq_duration(text: str) -> JSON | None:
    """The TQ-3 duration (``60``, ``2 hours``, ``M30``, ``H2``) as a Duration."""
    text = text.strip()
    if not text:
        return None
    if text[0] in "SMHDWL" and text[1:].isdigit():
        code = {"S": "s", "M": "min", "H": "h", "D": "d", "W": "wk", "L": "mo"}[text[0]]
        return {"value": int(text[1:]), "unit": code, "system": UCUM_URI, "code": code}
    m = _LEADING_NUMBER.match(text)
    if not m:
        return None
    unit = duration_unit(m.group(2) or "min")
    if unit is None:
        return None
    return duration(m.group(1), unit)
