"""HL7 v2 acknowledgements (v2.x chapter 2, "Acknowledgment messages").

Original mode answers AA / AE / AR. Enhanced mode (MSH-15 or MSH-16 valued) answers the accept
acknowledgement CA / CE / CR once the message is in safe storage, and later an application
acknowledgement (AA / AE / AR) when MSH-16 asks for one.

The ACK's MSH swaps sender and receiver, keeps the message's delimiters, version (MSH-12) and
character set (MSH-18), and MSA-2 echoes MSH-10. ERR says what is wrong and where, in the v2.5+
layout (ERR-2 location, ERR-3 code from table 0357, ERR-4 severity, ERR-8 user message); older
versions also get ERR-1 (v2.4 and before used it as the only ERR field).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache

from mappings.er7 import Delimiters, Header

__all__ = [
    "AckCode",
    "AckError",
    "application_ack_wanted",
    "build_ack",
    "build_ack_for_unreadable",
    "format_ts",
]


class AckCode(StrEnum):
    """HL7 table 0008."""

    AA = "AA"
    AE = "AE"
    AR = "AR"
    CA = "CA"
    CE = "CE"
    CR = "CR"

    @property
    def positive(self) -> bool:
        return self in (AckCode.AA, AckCode.CA)


# HL7 table 0357 message error condition codes we use, with their table text.
ERROR_CODES: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


@dataclass(frozen=True, slots=True)
class AckError:
    """One ERR segment: what is wrong (``text``), where (``location``, e.g. ``PID-3`` or
    ``MSH-9``), the table 0357 ``code`` and the severity (E error, W warning, I information)."""

    text: str
    location: str = ""
    code: str = "207"
    severity: str = "E"


def format_ts(now: datetime) -> str:
    """An HL7 DTM to the second with the UTC offset (``20240131093000+0100``)."""
    return _format_ts(now.replace(microsecond=0))


@lru_cache(maxsize=8)
def _format_ts(now: datetime) -> str:
    # Every ACK of the same second shares the string (strftime is a hot spot at high rates).
    return now.strftime("%Y%m%d%H%M%S%z")


def _location(loc: str, d: Delimiters) -> str:
    # "PID-3" -> PID^1^3 (ERL: segment id, sequence, field position)
    if not loc:
        return ""
    seg, _, fld = loc.partition("-")
    if fld.isdigit():
        return f"{seg}{d.component}1{d.component}{fld}"
    return seg


def _err_segment(err: AckError, d: Delimiters, version: str) -> str:
    f, c = d.field, d.component
    text = d.escape_text(err.text)
    code_text = d.escape_text(ERROR_CODES.get(err.code, ""))
    code = f"{err.code}{c}{code_text}{c}HL70357"
    location = _location(err.location, d)
    if version[:3] in ("2.1", "2.2", "2.3", "2.4"):
        # ERR-1 (CM_ELD: segment^sequence^field^code) is all these versions have.
        seg, _, fld = err.location.partition("-")
        eld = f"{seg}{c}1{c}{fld}{c}{err.code}{d.subcomponent}{code_text}{d.subcomponent}HL70357"
        return f"ERR{f}{eld}{f}{location}{f}{code}{f}{err.severity}{f}{f}{f}{f}{text}"
    return f"ERR{f}{f}{location}{f}{code}{f}{err.severity}{f}{f}{f}{f}{text}"


def _msh(
    header: Header | None,
    d: Delimiters,
    control_id: str,
    now: datetime,
    trigger: str,
) -> str:
    f = d.field
    if header is None:
        sending = receiving = ("", "")
        version, processing, charset = "2.5.1", "P", ""
    else:
        sending = (header.receiving_application, header.receiving_facility)
        receiving = (header.sending_application, header.sending_facility)
        version = header.get(12) or "2.5.1"
        processing = header.get(11) or "P"
        charset = header.get(18)
    msg_type = f"ACK{d.component}{trigger}{d.component}ACK" if trigger else "ACK"
    fields = [
        "MSH",
        d.encoding_characters,
        sending[0] or "CARELOOP",
        sending[1],
        receiving[0],
        receiving[1],
        format_ts(now),
        "",
        msg_type,
        control_id,
        processing,
        version,
    ]
    if charset:
        fields += ["", "", "", "", "", charset]
    return f.join(fields)


def application_ack_wanted(header: Header, ok: bool) -> bool:
    """Whether MSH-16 asks for an application acknowledgement in this outcome."""
    if not header.enhanced_mode:
        return False
    return _wanted(header.application_ack_type, ok)


def _wanted(kind: str, ok: bool) -> bool:
    # HL7 table 0155: AL always, NE never, ER only on error, SU only on success.
    # Empty means "always" for MSH-15 in enhanced mode per ch. 2 (the default when absent).
    if kind in ("", "AL"):
        return True
    if kind == "NE":
        return False
    if kind == "ER":
        return not ok
    if kind == "SU":
        return ok
    return True


def build_ack(
    header: Header,
    code: AckCode,
    *,
    control_id: str,
    now: datetime,
    errors: tuple[AckError, ...] = (),
    text: str = "",
) -> str:
    """The ER7 acknowledgement for ``header``'s message, segments ended by CR."""
    d = header.delimiters
    f = d.field
    msh = _msh(header, d, control_id, now, header.trigger_event)
    msa = f"MSA{f}{code.value}{f}{header.control_id}"
    if text:
        msa += f"{f}{d.escape_text(text)}"
    segments = [msh, msa]
    segments += [_err_segment(e, d, header.version) for e in errors]
    return "\r".join(segments) + "\r"


def build_ack_for_unreadable(
    code: AckCode,
    error: AckError,
    *,
    control_id: str,
    now: datetime,
    echo_control_id: str = "",
) -> str:
    """An acknowledgement for bytes whose MSH could not be read: default delimiters, MSA-2
    holds whatever control id could be recovered (often empty)."""
    d = Delimiters()
    f = d.field
    msh = _msh(None, d, control_id, now, "")
    msa = f"MSA{f}{code.value}{f}{d.escape_text(echo_control_id)}"
    return "\r".join([msh, msa, _err_segment(error, d, "2.5.1")]) + "\r"
