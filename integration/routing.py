"""Cheap structural checks by MSH-9, shared by the ACK path and the processing stage.

Which families and triggers careloop maps is :data:`mappings.ROUTES`; a type it does not handle
fails in the processing stage with "unsupported message type X^Y", stays in the inbox and can
be replayed once support is added (``careloop replay``).
"""

from __future__ import annotations

from mappings.er7 import Header, split_lines, split_segments

__all__ = ["MessageError", "check_structure", "required_segments"]

# Segments a message family cannot be processed without (HL7 v2.5.1 abstract message syntax).
# Missing one is a content error (AE, table 0357 code 100), found before the ACK at the cost of a
# line split. Types not listed here are only checked for well-formed segment ids.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "ADT": ("PID",),
    "SIU": ("SCH",),
    "RDE": ("ORC", "RXE"),
    "OMP": ("ORC", "RXO"),
    "RDS": ("ORC", "RXD"),
    "ORU": ("OBR",),
    "VXU": ("PID", "RXA"),
}
# ADT events whose message structure has no PID.
_ADT_WITHOUT_PID = frozenset({"A20"})


class MessageError(ValueError):
    """The content cannot be processed; the row is failed with this text (replayable)."""

    def __init__(self, message: str, *, location: str = "", code: str = "207") -> None:
        super().__init__(message)
        self.location = location
        self.code = code


def required_segments(header: Header) -> tuple[str, ...]:
    if header.message_code == "ADT" and header.trigger_event in _ADT_WITHOUT_PID:
        return ()
    return _REQUIRED.get(header.message_code, ())


def check_structure(header: Header, text: str) -> MessageError | None:
    """The first structural problem (a segment the message family cannot do without), or None.

    Cheap enough for the ACK path: one split into lines, no field parsing. Lines that do not
    start a segment are hard wraps (see :func:`mappings.er7.split_segments`), not errors.
    """
    required = required_segments(header)
    if not required:
        return None
    sep = header.delimiters.field
    lines = split_lines(text)
    if len(lines) <= 2:  # one line: possibly segments joined by spaces
        lines = split_segments(text)
    seen = {line[:3] for line in lines if line[3:4] == sep}
    for segment in required:
        if segment not in seen:
            return MessageError(
                f"{header.message_type} has no {segment} segment", location=segment, code="100"
            )
    return None
