"""Errors a conversion can end in, split by what the sender or operator should do.

Every message names the segment and field (``PID-3 is empty: no patient identifier``), and each
class carries the HL7 table 0357 code and the acknowledgement it suggests, so the edges (ERR
segment, OperationOutcome, CLI exit status) translate without parsing text:

* :class:`InvalidMessage` and :class:`MissingRequiredField`: the sender must fix and resend (AR);
* :class:`UnsupportedMessageType`: nothing for the sender to do; the message is stored and can be
  replayed once support exists (AE);
* :class:`ResourceValidationError`: a produced resource does not validate, a careloop defect or a
  value no rule foresaw; stored for replay (AE).
"""

from __future__ import annotations

__all__ = [
    "InvalidMessage",
    "MappingError",
    "MissingRequiredField",
    "ResourceValidationError",
    "UnsupportedMessageType",
]


class MappingError(ValueError):
    """A message that cannot be mapped. ``location`` is ``SEG-n`` where known."""

    hl7_code = "207"
    ack_code = "AE"

    def __init__(self, message: str, *, location: str = "") -> None:
        super().__init__(message)
        self.location = location


class InvalidMessage(MappingError):
    """The bytes are not a readable HL7 v2 message (no MSH, unusable delimiters...)."""

    hl7_code = "100"
    ack_code = "AR"


class MissingRequiredField(MappingError):
    """A field the mapping cannot do without is empty or unreadable."""

    hl7_code = "101"
    ack_code = "AR"


class UnsupportedMessageType(MappingError):
    """No mapping exists for this MSH-9 message type and trigger."""

    hl7_code = "200"
    ack_code = "AE"

    def __init__(self, message_type: str) -> None:
        super().__init__(f"unsupported message type {message_type}", location="MSH-9")
        self.message_type = message_type


class ResourceValidationError(MappingError):
    """A produced resource fails FHIR validation even after unreadable elements were dropped."""

    hl7_code = "207"
    ack_code = "AE"
