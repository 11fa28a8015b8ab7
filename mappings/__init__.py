"""Pure HL7 v2 and FHIR mapping functions: bytes or parsed input in, data out.

No database, network, settings or clock: callers pass what a function needs (``now``,
identifier systems, time zones). See DESIGN.md, "Where things live".
"""
