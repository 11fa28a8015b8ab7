"""The one entry point: an HL7 v2 message in, FHIR R4 resources out.

    ctx = MappingContext(sender_timezone=ZoneInfo("Europe/London"))
    conversion = convert(raw_bytes, context=ctx)
    conversion.resources        # list of FHIR R4 JSON dicts, deterministic ids
    conversion.bundle()         # a Bundle of type collection

Routing trusts MSH-9 (message code and trigger), never a file name. Which families and
triggers are supported is :data:`ROUTES`; anything else raises
:class:`mappings.errors.UnsupportedMessageType` ("unsupported message type X^Y").

Parse path: every conversion uses careloop's own tokenizer (:mod:`mappings.message`), never
hl7apy, which is kept for :func:`mappings.strict.validate_strict`. See docs/mappings.md for the
figures behind that choice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mappings import adt, immunization, pharmacy, results, siu
from mappings.context import MappingContext
from mappings.er7 import ER7Error
from mappings.errors import InvalidMessage, UnsupportedMessageType
from mappings.fhir_validation import validate_resources
from mappings.message import Message
from mappings.output import ID_NAMESPACE, Output

__all__ = ["ROUTES", "Conversion", "convert", "family_of", "parse"]

JSON = dict[str, Any]
Mapper = Callable[[Output, Message, str], None]


def _routes() -> dict[tuple[str, str], tuple[str, Mapper]]:
    table: dict[tuple[str, str], tuple[str, Mapper]] = {}
    for trig in sorted(adt.TRIGGERS):
        table[("ADT", trig)] = ("adt", adt.map_adt)
    for trig in sorted(siu.TRIGGERS):
        table[("SIU", trig)] = ("siu", siu.map_siu)
    for code, trig in sorted(pharmacy.TRIGGERS):
        table[(code, trig)] = ("pharmacy", pharmacy.map_pharmacy)
    table[("ORU", "R01")] = ("results", results.map_oru)
    table[("VXU", "V04")] = ("immunization", immunization.map_vxu)
    return table


#: (message code, trigger event) → (family, mapper)
ROUTES: dict[tuple[str, str], tuple[str, Mapper]] = _routes()


@dataclass(slots=True)
class Conversion:
    """What one message became."""

    message_type: str
    control_id: str
    family: str
    resources: list[JSON]
    warnings: list[str] = field(default_factory=list)
    sender: str = ""
    timestamp: str | None = None

    def bundle(self, base_url: str | None = None) -> JSON:
        """A FHIR Bundle (type ``collection``) of the resources.

        ``fullUrl`` is ``{base_url}/{type}/{id}`` when a server base is given (then the
        ``Type/id`` references resolve inside the Bundle), else ``urn:uuid:{id}``.
        """
        entries = []
        for res in self.resources:
            if base_url:
                full = f"{base_url.rstrip('/')}/{res['resourceType']}/{res['id']}"
            else:
                full = f"urn:uuid:{res['id']}"
            entries.append({"fullUrl": full, "resource": res})
        bundle: JSON = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid5(ID_NAMESPACE, f"Bundle|{self.sender}|{self.control_id}")),
            "identifier": {"system": "urn:careloop:hl7v2:control-id", "value": self.control_id},
            "type": "collection",
        }
        if self.timestamp:
            bundle["timestamp"] = self.timestamp
        bundle["entry"] = entries
        return bundle


def parse(raw: bytes | str) -> Message:
    """Tokenize ``raw``; an unreadable MSH raises :class:`InvalidMessage`."""
    try:
        return Message.parse(raw)
    except ER7Error as exc:
        raise InvalidMessage(str(exc), location=exc.location) from None


def family_of(message_code: str, trigger: str) -> str | None:
    """The family that maps this message type, or None when unsupported."""
    hit = ROUTES.get((message_code.upper(), trigger.upper()))
    return hit[0] if hit else None


def convert(raw: bytes | str | Message, *, context: MappingContext) -> Conversion:
    """Convert one HL7 v2 message to FHIR R4 resources.

    Raises :class:`mappings.errors.MappingError` subclasses only: :class:`InvalidMessage`
    (unreadable), :class:`UnsupportedMessageType`, :class:`MissingRequiredField` (e.g.
    "PID-3 is empty: no patient identifier") or :class:`ResourceValidationError`. A field that
    cannot be read is left out and reported in ``warnings`` instead.
    """
    msg = raw if isinstance(raw, Message) else parse(raw)
    header = msg.header
    code, trigger = header.message_code, header.trigger_event
    pre_warnings: list[str] = []
    if not trigger and "_" in header.message_structure:
        # "ORU^^ORU_R01": the trigger is missing but the structure names it
        trigger = header.message_structure.split("_", 1)[1]
        pre_warnings.append(f"MSH-9.2: trigger event missing; taken from MSH-9.3 ({trigger})")
    route = ROUTES.get((code, trigger))
    if route is None:
        raise UnsupportedMessageType(f"{code}^{trigger}" if trigger else code)
    family, mapper = route
    out = Output(msg, context)
    out.warnings.extend(pre_warnings)
    mapper(out, msg, trigger)
    if context.validate:
        validate_resources(out.resources, out.warn)
    timestamp = None
    if context.now is not None:
        timestamp = context.now.isoformat(timespec="seconds").replace("+00:00", "Z")
    return Conversion(
        message_type=f"{code}^{trigger}",
        control_id=header.control_id,
        family=family,
        resources=out.resources,
        warnings=out.warnings,
        sender=out.sender,
        timestamp=timestamp,
    )
