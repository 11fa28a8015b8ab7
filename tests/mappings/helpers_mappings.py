"""Shared helpers for the mapping tests: fixtures, a default context, resource lookup."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from mappings.context import MappingContext
from mappings.convert import Conversion, convert

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HL7 = FIXTURES / "hl7"
FHIR = FIXTURES / "fhir"

# the context golden outputs are produced with: a US sender, one configured system
CONTEXT = MappingContext(
    sender_timezone=ZoneInfo("America/New_York"),
    identifier_systems={"RAJ12": "https://fhir.example.org/Id/raj12-hospital-number"},
)

MSH = "MSH|^~\\&|SND|FAC|RCV|RFAC|20240131093000||{type}|CTL{n}|P|2.5.1\r"


def fixture(name: str) -> bytes:
    return (HL7 / name).read_bytes()


def run(raw: bytes | str, context: MappingContext = CONTEXT) -> Conversion:
    return convert(raw, context=context)


def of_type(conversion: Conversion, resource_type: str) -> list[dict[str, Any]]:
    return [r for r in conversion.resources if r["resourceType"] == resource_type]


def one(conversion: Conversion, resource_type: str) -> dict[str, Any]:
    found = of_type(conversion, resource_type)
    assert len(found) == 1, f"{len(found)} {resource_type} resources"
    return found[0]


def message(msg_type: str, *segments: str, n: int = 1) -> str:
    return MSH.format(type=msg_type, n=n) + "\r".join(segments) + "\r"


def seg(sid: str, fields: dict[int, str]) -> str:
    """A segment with the given fields (1-based) set and the rest empty."""
    top = max(fields) if fields else 0
    return "|".join([sid, *(fields.get(i, "") for i in range(1, top + 1))])
