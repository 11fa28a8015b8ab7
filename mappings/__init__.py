"""Pure HL7 v2 and FHIR mapping functions: bytes or parsed input in, data out.

No database, network, settings or clock: callers pass what a function needs (``now``,
identifier systems, time zones). See DESIGN.md, "Where things live", and docs/mappings.md.

The public surface for the pipeline and the CLI::

    from mappings import MappingContext, convert
    conversion = convert(raw, context=MappingContext(...))   # -> Conversion
    conversion.resources / conversion.warnings / conversion.bundle()

Errors are :class:`MappingError` subclasses (``InvalidMessage``, ``MissingRequiredField``,
``UnsupportedMessageType``, ``ResourceValidationError``); :func:`validate_strict` is the slow
hl7apy check for ``careloop hl7 validate``.
"""

from mappings.context import MappingContext
from mappings.convert import ROUTES, Conversion, convert, family_of
from mappings.errors import (
    InvalidMessage,
    MappingError,
    MissingRequiredField,
    ResourceValidationError,
    UnsupportedMessageType,
)
from mappings.strict import validate_strict

__all__ = [
    "ROUTES",
    "Conversion",
    "InvalidMessage",
    "MappingContext",
    "MappingError",
    "MissingRequiredField",
    "ResourceValidationError",
    "UnsupportedMessageType",
    "convert",
    "family_of",
    "validate_strict",
]
