"""Strict validation against the HL7 v2 standard's message structures, with hl7apy.

This is the slow, thorough path for ``careloop hl7 validate``: hl7apy knows each version's
message structures, groups, segments, data types, lengths and tables, which the hot path's own
tokenizer (:mod:`mappings.message`) deliberately does not check. It parses an ADT^A01 in tens of
milliseconds, so it never runs on intake.

:func:`validate_strict` returns problems as text (empty list: valid); it never raises on bad
input. hl7apy stops at the first error of an element, so each segment and group is checked on
its own to report more than one problem per message.
"""

from __future__ import annotations

import warnings
from typing import Any

from mappings.er7 import ER7Error, decode, read_header, split_segments

__all__ = ["validate_strict"]

# hl7apy supports these versions; others are checked as the nearest one it knows.
_VERSIONS = (
    "2.1",
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.8",
    "2.8.1",
    "2.8.2",
)


def _normalise(raw: bytes | str) -> tuple[str, str]:
    text = decode(raw) if isinstance(raw, bytes) else raw.lstrip("\ufeff")
    header = read_header(text)
    segments = split_segments(text.lstrip("\ufeff\r\n\t "))
    d = header.delimiters
    # hl7apy wants the standard four encoding characters and CR between segments
    msh = segments[0]
    parts = msh.split(d.field)
    parts[1] = d.component + d.repetition + (d.escape or "\\") + (d.subcomponent or "&")
    segments[0] = d.field.join(parts)
    return "\r".join(segments), header.version


def _walk(element: Any, problems: list[str], validator: Any) -> None:
    for child in element.children:
        if child.classname == "Group":
            _walk(child, problems, validator)
            continue
        try:
            validator.validate(child)
        except Exception as exc:  # hl7apy raises its own hierarchy, and sometimes plain ones
            problems.append(f"{child.name}: {exc}")


def validate_strict(raw: bytes | str) -> list[str]:
    """Problems with ``raw`` by the HL7 v2 standard (hl7apy), one line each; [] when valid."""
    # hl7apy loads its structure tables on import; convert() must not pay for that
    from hl7apy.consts import VALIDATION_LEVEL  # noqa: PLC0415
    from hl7apy.parser import parse_message  # noqa: PLC0415
    from hl7apy.validation import Validator  # noqa: PLC0415

    try:
        text, version = _normalise(raw)
    except ER7Error as exc:
        return [f"{exc.location or 'MSH'}: {exc}"]
    problems: list[str] = []
    if version not in _VERSIONS:
        problems.append(f"MSH-12: version {version!r} is not one hl7apy knows")
        return problems
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            msg = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)
        except Exception as exc:  # hl7apy parse errors are not one hierarchy
            return [f"structure: {exc}"]
        try:
            Validator.validate(msg)
        except Exception as exc:
            problems.append(f"message: {exc}")
        else:
            return []
        _walk(msg, problems, Validator)
    seen: set[str] = set()
    unique = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique
