"""The resources one conversion produces: deterministic ids, provenance in ``meta``, warnings.

Family mappers read fields through :class:`Output`'s ``read_*`` helpers, which turn a value that
cannot be read into a warning naming segment and field (``PID-7: '19991399' is not a calendar
date; left out``) instead of an exception, so one bad field never loses the whole message.

Resource ids are UUIDv5 of the resource type and the source identifiers that name the thing
(a patient's first identifier, an appointment's filler id, an order number...), scoped by the
sender where the identifier has no system. The same message therefore always yields the same
ids, and a later message about the same patient or appointment lands on the same id.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import tzinfo
from typing import Any, TypeVar
from urllib.parse import quote

from mappings import codes
from mappings import datatypes as dt
from mappings.context import MappingContext
from mappings.message import Component, Message, Segment

__all__ = ["CONTROL_ID_TAG_SYSTEM", "ID_NAMESPACE", "SENDER_TAG_SYSTEM", "Output"]

JSON = dict[str, Any]
T = TypeVar("T")

# Fixed namespace for careloop resource ids (uuid5 of the DNS name careloop.invalid).
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "careloop.invalid")
CONTROL_ID_TAG_SYSTEM = "urn:careloop:hl7v2:control-id"
SENDER_TAG_SYSTEM = "urn:careloop:hl7v2:sender"


def _hd_text(c: Component) -> str:
    return c.get(1) or c.get(2)


def _code_text(text: str) -> str:
    return " ".join(text.split())


class Output:
    """Collects the resources of one message, stamping ids and ``meta``."""

    def __init__(self, msg: Message, ctx: MappingContext) -> None:
        self.msg = msg
        self.ctx = ctx
        self.tz: tzinfo = ctx.timezone
        self.systems = ctx.identifier_systems
        self.warnings: list[str] = []
        self.resources: list[JSON] = []
        self._ids: dict[tuple[str, str], JSON] = {}
        msh = msg.segments_list[0]
        self.version = msg.header.version
        self.sending_application = _hd_text(msh.first(3))
        self.sending_facility = _hd_text(msh.first(4))
        self.control_id = msg.header.control_id
        self.sender = "^".join(x for x in (self.sending_application, self.sending_facility) if x)
        app = quote(self.sending_application or "-", safe="")
        fac = quote(self.sending_facility or "-", safe="")
        source = f"urn:careloop:hl7v2:{app}:{fac}#{quote(self.control_id, safe='')}"
        tags = [{"system": CONTROL_ID_TAG_SYSTEM, "code": _code_text(self.control_id)}]
        if self.sender:
            tags.append({"system": SENDER_TAG_SYSTEM, "code": _code_text(self.sender)})
        self._meta: JSON = {"source": source, "tag": tags}

    # --- ids and resources ------------------------------------------------------------------

    def make_id(self, resource_type: str, *keys: str) -> str:
        """A deterministic id from the source identifiers ``keys``."""
        name = "|".join((resource_type, *keys))
        return str(uuid.uuid5(ID_NAMESPACE, name))

    def scoped_id(self, resource_type: str, *keys: str) -> str:
        """A deterministic id for keys that only mean something within this sender."""
        return self.make_id(resource_type, self.sender or "-", *keys)

    def message_id(self, resource_type: str, *keys: str) -> str:
        """An id for something only this message names (no source identifier at all)."""
        return self.make_id(resource_type, self.sender or "-", self.control_id, *keys)

    def add(self, resource: JSON) -> JSON:
        """Add ``resource`` (which has ``resourceType`` and ``id``); returns a Reference to it.

        A second resource with the same type and id (the same practitioner named twice) is
        merged into the first: elements the first lacks are taken from the second.
        """
        rtype, rid = resource["resourceType"], resource["id"]
        key = (rtype, rid)
        existing = self._ids.get(key)
        if existing is None:
            body = {"resourceType": rtype, "id": rid, "meta": self._copy_meta()}
            body.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id"))
            self._ids[key] = body
            self.resources.append(body)
        else:
            for k, v in resource.items():
                if k not in existing:
                    existing[k] = v
        return {"reference": f"{rtype}/{rid}"}

    def get(self, resource_type: str, rid: str) -> JSON | None:
        return self._ids.get((resource_type, rid))

    def _copy_meta(self) -> JSON:
        return {"source": self._meta["source"], "tag": [dict(t) for t in self._meta["tag"]]}

    # --- warnings and safe reads ------------------------------------------------------------

    def warn(self, location: str, text: str) -> None:
        self.warnings.append(f"{location}: {text}")

    def safely(self, location: str, fn: Callable[[], T]) -> T | None:
        """Run a reader; a :class:`mappings.datatypes.DatatypeError` becomes a warning."""
        try:
            return fn()
        except dt.DatatypeError as exc:
            self.warn(location, f"{exc}; left out")
            return None

    def datetime(self, seg: Segment, n: int, c: int = 1, s: int = 1) -> str | None:
        """SEG-n as a FHIR dateTime (None, with a warning, when unreadable)."""
        value = seg.get(n, c, s)
        if not value:
            return None
        return self.safely(_loc(seg, n, c), lambda: dt.fhir_datetime(value, self.tz))

    def datetime_value(self, value: str, location: str) -> str | None:
        if not value:
            return None
        return self.safely(location, lambda: dt.fhir_datetime(value, self.tz))

    def instant(self, seg: Segment, n: int, c: int = 1) -> str | None:
        value = seg.get(n, c)
        if not value:
            return None
        return self.safely(_loc(seg, n, c), lambda: dt.fhir_instant(value, self.tz))

    def date(self, seg: Segment, n: int) -> str | None:
        value = seg.get(n)
        if not value:
            return None
        return self.safely(_loc(seg, n), lambda: dt.fhir_date(value))

    def decimal(self, seg: Segment, n: int, c: int = 1) -> float | int | None:
        value = seg.get(n, c)
        if not value:
            return None
        return self.safely(_loc(seg, n, c), lambda: dt.decimal(value))

    def concept(self, seg: Segment, n: int, table: codes.CodeMap | None = None) -> JSON | None:
        rep = seg.first(n)
        return dt.codeable_concept(rep, table) if rep else None

    def concepts(self, seg: Segment, n: int, table: codes.CodeMap | None = None) -> list[JSON]:
        out = []
        for rep in seg.reps(n):
            cc = dt.codeable_concept(rep, table)
            if cc:
                out.append(cc)
        return out

    def identifiers(self, seg: Segment, n: int) -> list[JSON]:
        out = []
        for rep in seg.reps(n):
            ident = dt.identifier(rep, self.systems, self.tz)
            if ident:
                out.append(ident)
        return out

    def names(self, seg: Segment, n: int) -> list[JSON]:
        return [x for x in (dt.human_name(r, self.tz) for r in seg.reps(n)) if x]

    def addresses(self, seg: Segment, n: int) -> list[JSON]:
        return [x for x in (dt.address(r, self.tz) for r in seg.reps(n)) if x]

    def telecoms(self, seg: Segment, *fields: int) -> list[JSON]:
        out: list[JSON] = []
        for n in fields:
            for rep in seg.reps(n):
                cp = dt.contact_point(rep, self.tz, self.version)
                if cp and cp not in out:
                    out.append(cp)
        return out

    def mapped(self, seg: Segment, n: int, table: codes.CodeMap, c: int = 1) -> str | None:
        """A v2 table code mapped to a FHIR code; an unmapped code is warned about."""
        raw = seg.get(n, c)
        if not raw:
            return None
        code = table.code(raw)
        if code is None:
            self.warn(
                _loc(seg, n),
                f"{raw!r} has no {table.target} equivalent (table {table.v2_table}); left out",
            )
        return code

    # --- shared small resources -------------------------------------------------------------

    def practitioner(self, c: Component, location: str) -> JSON | None:
        """XCN → a Practitioner resource (added) and a Reference to it."""
        if not c:
            return None
        ident = dt.identifier(
            c, self.systems, self.tz, value_at=1, authority_at=9, type_at=13, period_at=None
        )
        name = dt.xcn_name(c)
        if ident is None and name is None:
            return None
        res: JSON = {"resourceType": "Practitioner"}
        if ident:
            key = ident.get("system") or ""
            res["id"] = (
                self.make_id("Practitioner", key, ident["value"])
                if key
                else self.scoped_id("Practitioner", c.get(9), ident["value"])
            )
            res["identifier"] = [ident]
        else:
            res["id"] = self.scoped_id("Practitioner", "name", c.raw)
        if name:
            res["name"] = [name]
        ref = self.add(res)
        display = _display_name(name)
        if display:
            ref["display"] = display
        return ref

    def location(self, c: Component, location: str) -> JSON | None:
        """PL → a Location resource (added) and a Reference to it.

        The most specific level sent (bed, room, point of care) names the Location; the facility
        (PL-4) becomes a separate Location it is ``partOf``.
        """
        if not c:
            return None
        poc, room, bed = c.get(1), c.get(2), c.get(3)
        facility = c.part(4)
        fac_name = facility.get(1) or facility.get(2)
        building, floor, desc = c.get(7), c.get(8), c.get(9)
        levels = [x for x in (fac_name, building, floor, poc, room, bed) if x]
        if not levels:
            return None
        fac_ref = None
        if fac_name and (poc or room or bed):
            fac_ref = self.add(
                {
                    "resourceType": "Location",
                    "id": self.scoped_id("Location", fac_name),
                    "name": fac_name,
                    "mode": "instance",
                    "physicalType": _physical("si", "Site"),
                }
            )
        name = desc or " ".join(x for x in (poc, room, bed) if x) or fac_name
        if bed:
            physical = _physical("bd", "Bed")
        elif room:
            physical = _physical("ro", "Room")
        elif poc:
            physical = _physical("area", "Area")
        else:
            physical = _physical("si", "Site")
        res: JSON = {
            "resourceType": "Location",
            "id": self.scoped_id("Location", *levels),
            "name": name,
            "mode": "instance",
            "physicalType": physical,
        }
        if poc or room or bed:
            res["identifier"] = [{"value": "^".join((poc, room, bed)).rstrip("^")}]
        if fac_ref and res["id"] != fac_ref["reference"].split("/", 1)[1]:
            res["partOf"] = fac_ref
        ref = self.add(res)
        ref["display"] = name
        return ref


def _physical(code: str, display: str) -> JSON:
    return {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
                "code": code,
                "display": display,
            }
        ]
    }


def _display_name(name: JSON | None) -> str:
    if not name:
        return ""
    parts = [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]
    return " ".join(p for p in parts if p)


def _loc(seg: Segment, n: int, c: int = 1) -> str:
    return f"{seg.id}-{n}" if c == 1 else f"{seg.id}-{n}.{c}"
