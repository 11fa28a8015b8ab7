"""Routing by MSH-9: which message family handles a stored message.

The processing stage asks :func:`route` for the family; a type careloop does not handle fails
with "unsupported message type X^Y", stays in the inbox and can be replayed once support is
added (``careloop replay``).
"""

from __future__ import annotations

from mappings.er7 import Header

__all__ = ["FAMILIES", "MessageError", "UnsupportedMessage", "family_of", "route"]

# Message code -> (family, trigger events handled; empty = every trigger).
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "ADT": (
        "adt",
        frozenset(
            "A01 A02 A03 A04 A05 A06 A07 A08 A11 A13 A28 A31 A34 A38 A40 A47".split()
        ),
    ),
    "SIU": ("siu", frozenset(f"S{n}" for n in range(12, 27))),
    "RDE": ("pharmacy", frozenset({"O11", "O25"})),
    "OMP": ("pharmacy", frozenset({"O09"})),
    "RDS": ("pharmacy", frozenset({"O13"})),
    "ORU": ("results", frozenset({"R01"})),
    "VXU": ("immunization", frozenset({"V04"})),
}


class MessageError(ValueError):
    """The content cannot be processed; the row is failed with this text (replayable)."""

    def __init__(self, message: str, *, location: str = "", code: str = "207") -> None:
        super().__init__(message)
        self.location = location
        self.code = code


class UnsupportedMessage(MessageError):
    pass


def family_of(header: Header) -> str | None:
    entry = FAMILIES.get(header.message_code)
    if entry is None:
        return None
    family, triggers = entry
    if triggers and header.trigger_event not in triggers:
        return None
    return family


def route(header: Header, text: str) -> str:
    """The family that handles this message, or :class:`UnsupportedMessage`."""
    family = family_of(header)
    if family is None:
        code = "200" if header.message_code not in FAMILIES else "201"
        raise UnsupportedMessage(
            f"unsupported message type {header.message_type}", location="MSH-9", code=code
        )
    return family
