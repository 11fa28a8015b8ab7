"""HL7 v2 ER7 ("pipe and hat") reading that the intake hot path can afford.

Everything here is pure and tolerant of what real feeds send (see ``shared/corpus/NOTES.md``):

* segment ends in CR, LF or CRLF; a UTF-8 byte-order mark; no final terminator;
* MSH-2 typed with a doubled backslash (``^~\\\\&``, Java string escaping) or the v2.7+ five
  character form with the truncation character (``^~\\&#``);
* bytes decoded by the character set MSH-18 declares (ASCII, 8859/x, UNICODE UTF-8, ...),
  falling back to UTF-8 and then Windows-1252 when MSH-18 is empty;
* batches (FHS/BHS ... BTS/FTS) and several messages in one body.

Only the first segment is split into fields here (:func:`read_header`): that is all an
acknowledgement needs, so the ACK never waits on a full parse. Anything unreadable raises
:class:`ER7Error`, never a bare ``IndexError`` or ``UnicodeDecodeError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "BATCH_SEGMENTS",
    "Delimiters",
    "ER7Error",
    "Header",
    "codec_for",
    "decode",
    "read_header",
    "split_lines",
    "split_messages",
    "split_segments",
]

BOM = b"\xef\xbb\xbf"
BATCH_SEGMENTS = frozenset({"FHS", "BHS", "BTS", "FTS"})
_BATCH_BYTES = frozenset(s.encode() for s in BATCH_SEGMENTS)
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_LINE_SPLIT = re.compile(rb"\r\n|\r|\n")
_LINE_SPLIT_TEXT = re.compile(r"\r\n|\r|\n")

# MSH-18 (HL7 table 0211) to a Python codec. UTF-16 and UTF-32 cannot carry an ASCII MSH and are
# not listed; an unknown value is an error the sender must fix (AR), not a guess.
_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",  # v2.3-era senders write bare UNICODE for UTF-8
    "UTF-8": "utf-8",
    "ISO IR6": "ascii",
    "ISO IR100": "iso-8859-1",
    "ISO IR192": "utf-8",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


class ER7Error(ValueError):
    """The bytes are not a readable HL7 v2 message.

    ``location`` names the segment and field (``MSH-9``) where that is known, ``code`` is the
    HL7 table 0357 error code an acknowledgement should carry.
    """

    def __init__(self, message: str, *, location: str = "", code: str = "100") -> None:
        super().__init__(message)
        self.location = location
        self.code = code


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it should be written back (ACKs keep the sender's delimiters)."""
        return (
            self.component + self.repetition + self.escape + self.subcomponent + self.truncation
        )

    def escape_text(self, text: str) -> str:
        """Escape free text so that it can stand in a field (used for ERR and NTE text)."""
        e = self.escape
        if e:
            text = text.replace(e, f"{e}E{e}")
        out = (
            text.replace(self.field, f"{e}F{e}")
            .replace(self.component, f"{e}S{e}")
            .replace(self.repetition, f"{e}R{e}")
            .replace(self.subcomponent, f"{e}T{e}")
        )
        if self.truncation:
            out = out.replace(self.truncation, f"{e}P{e}")
        return out.replace("\r", f"{e}.br{e}").replace("\n", f"{e}.br{e}")


@dataclass(frozen=True, slots=True)
class Header:
    """What the MSH segment of one message says, fields kept raw (still escaped).

    ``fields[n]`` is MSH-n (``fields[1]`` is the field separator, ``fields[2]`` MSH-2), so the
    numbering matches the standard.
    """

    delimiters: Delimiters
    fields: tuple[str, ...]
    text: str = field(repr=False)

    def get(self, n: int) -> str:
        """MSH-n, raw; empty when absent."""
        return self.fields[n] if n < len(self.fields) else ""

    def component(self, n: int, c: int) -> str:
        """Component ``c`` (1-based) of MSH-n."""
        parts = self.get(n).split(self.delimiters.component)
        return parts[c - 1] if c <= len(parts) else ""

    @property
    def sending_application(self) -> str:
        return self.get(3)

    @property
    def sending_facility(self) -> str:
        return self.get(4)

    @property
    def receiving_application(self) -> str:
        return self.get(5)

    @property
    def receiving_facility(self) -> str:
        return self.get(6)

    @property
    def timestamp(self) -> str:
        return self.component(7, 1)

    @property
    def message_code(self) -> str:
        return self.component(9, 1).strip().upper()

    @property
    def trigger_event(self) -> str:
        return self.component(9, 2).strip().upper()

    @property
    def message_structure(self) -> str:
        return self.component(9, 3).strip().upper()

    @property
    def message_type(self) -> str:
        """``ADT^A01`` style; just the code when the trigger is missing (``ORU``)."""
        code, trigger = self.message_code, self.trigger_event
        return f"{code}^{trigger}" if trigger else code

    @property
    def control_id(self) -> str:
        return self.get(10).strip()

    @property
    def processing_id(self) -> str:
        return self.component(11, 1).strip()

    @property
    def version(self) -> str:
        return self.component(12, 1).strip()

    @property
    def accept_ack_type(self) -> str:
        return self.get(15).strip().upper()

    @property
    def application_ack_type(self) -> str:
        return self.get(16).strip().upper()

    @property
    def charset(self) -> str:
        """MSH-18, first repetition (later ones name alternate sets for ISO 2022 switching)."""
        return self.get(18).split(self.delimiters.repetition)[0].strip()

    @property
    def enhanced_mode(self) -> bool:
        """HL7 v2 ch. 2: MSH-15 or MSH-16 valued asks for enhanced acknowledgement mode."""
        return bool(self.accept_ack_type or self.application_ack_type)


def codec_for(charset: str) -> str | None:
    """The Python codec for an MSH-18 value, or None when it is not one we know."""
    return _CHARSETS.get(charset.strip().upper())


def _peek_charset(raw: bytes) -> str:
    """MSH-18 read straight from the bytes, before the message is decoded."""
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 8:
        return ""
    sep = raw[start + 3 : start + 4]
    match = _LINE_SPLIT.search(raw, start)
    line = raw[start : match.start() if match else len(raw)]
    parts = line.split(sep)
    # parts[0] is "MSH", parts[1] is MSH-2, so MSH-n is parts[n - 1]
    if len(parts) < 18:
        return ""
    rep = parts[1][1:2] or b"~"
    return parts[17].split(rep)[0].strip().decode("latin-1")


def decode(raw: bytes) -> str:
    """Decode one message's bytes by what its MSH-18 declares.

    A leading UTF-8 BOM is dropped. With no MSH-18 the bytes are taken as UTF-8 and, when they
    are not valid UTF-8, as Windows-1252 (what most engines without MSH-18 really send).
    """
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    charset = _peek_charset(raw)
    if charset:
        codec = codec_for(charset)
        if codec is None:
            raise ER7Error(
                f"MSH-18 character set {charset!r} is not supported",
                location="MSH-18",
                code="203",
            )
        try:
            return raw.decode(codec)
        except UnicodeDecodeError as exc:
            raise ER7Error(
                f"bytes at offset {exc.start} are not valid {charset} as MSH-18 declares",
                location="MSH-18",
                code="102",
            ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _delimiters(msh2: str, field_sep: str) -> Delimiters:
    # Tolerate MSH-2 written with a doubled escape character ("^~\\&"): drop repeats.
    chars: list[str] = []
    for ch in msh2:
        if ch not in chars and ch != field_sep:
            chars.append(ch)
    if len(chars) < 2:
        raise ER7Error(
            f"MSH-2 encoding characters {msh2!r} are incomplete",
            location="MSH-2",
            code="102",
        )
    comp, rep = chars[0], chars[1]
    esc = chars[2] if len(chars) > 2 else ""
    sub = chars[3] if len(chars) > 3 else ""
    trunc = chars[4] if len(chars) > 4 else ""
    for ch in chars:
        if ch.isalnum() or ch in "\r\n ":
            raise ER7Error(
                f"MSH-2 encoding character {ch!r} is not a delimiter",
                location="MSH-2",
                code="102",
            )
    return Delimiters(field_sep, comp, rep, esc, sub, trunc)


def read_header(text: str) -> Header:
    """Read the MSH segment at the start of ``text`` (one decoded message).

    Leading blank lines and a BOM are skipped. Raises :class:`ER7Error` when there is no MSH,
    when its delimiters are unusable, or when MSH-9 or MSH-10 is missing.
    """
    text = text.lstrip("\ufeff\r\n\t ")
    if not text.startswith("MSH"):
        raise ER7Error("the message does not start with an MSH segment", location="MSH")
    if len(text) < 8:
        raise ER7Error("the MSH segment is truncated", location="MSH-2", code="102")
    field_sep = text[3]
    if field_sep.isalnum() or field_sep in "\r\n ":
        raise ER7Error(
            f"MSH-1 field separator {field_sep!r} is not usable", location="MSH-1", code="102"
        )
    match = _LINE_SPLIT_TEXT.search(text)
    line = text[: match.start()] if match else _unjoin(text, field_sep)[0]
    parts = line.split(field_sep)
    delims = _delimiters(parts[1], field_sep)
    fields = ("MSH", field_sep, *parts[1:])
    header = Header(delims, fields, text)
    if not header.message_code:
        raise ER7Error("MSH-9 message type is empty", location="MSH-9", code="101")
    if not header.control_id:
        raise ER7Error("MSH-10 message control id is empty", location="MSH-10", code="101")
    return header


def split_lines(text: str) -> list[str]:
    """Split on CR, LF or CRLF. Fast paths for the usual single-terminator text (a regex split
    costs several times more on a large message)."""
    has_cr = "\r" in text
    has_lf = "\n" in text
    if has_cr and not has_lf:
        return text.split("\r")
    if has_lf and not has_cr:
        return text.split("\n")
    if not has_cr:
        return [text]
    return _LINE_SPLIT_TEXT.split(text)


def _unjoin(line: str, field_sep: str) -> list[str]:
    """Split a one-line message whose segment ends were replaced by spaces (seen in a real
    export: ``...|2.3||| EVN|A01...``). Only a space right after a field separator and before a
    segment id counts, so spaces inside text fields are left alone."""
    sep = re.escape(field_sep)
    pattern = re.compile(sep + r" +(?=[A-Z][A-Z0-9]{2}" + sep + ")")
    pieces = pattern.split(line)
    if len(pieces) == 1:
        return pieces
    return [p + field_sep for p in pieces[:-1]] + [pieces[-1]]


def split_segments(text: str) -> list[str]:
    """Split a decoded message into segments on CR, LF or CRLF, dropping empty lines.

    A line that does not start with a segment id and the field separator is a hard wrap in the
    middle of a field (seen in real Epic exports): it is joined to the segment before it.
    """
    text = text.lstrip("\ufeff")
    field_sep = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    segments: list[str] = []
    lines = split_lines(text)
    if len([ln for ln in lines if ln.strip()]) == 1:
        lines = _unjoin(lines[0] if lines[0].strip() else lines[-1], field_sep)
    for line in lines:
        if not line.strip():
            continue
        head = line[:3]
        if segments and not (
            _SEGMENT_ID.match(head) and (len(line) == 3 or line[3] == field_sep)
        ):
            segments[-1] += line
            continue
        segments.append(line)
    return segments


def split_messages(data: bytes) -> list[bytes]:
    """Split a body or file into the raw bytes of each message it holds.

    Messages start at each line beginning with ``MSH``; batch envelope segments (FHS, BHS, BTS,
    FTS) and blank lines between messages are dropped. Each message is returned as the exact
    slice of ``data`` it occupies, line endings untouched, so what is stored is what was sent.
    Text before the first MSH that is not a batch segment raises :class:`ER7Error`.
    """
    messages: list[bytes] = []
    start: int | None = None
    end = 0
    pos = 3 if data.startswith(BOM) else 0
    n = len(data)
    while pos < n:
        match = _LINE_SPLIT.search(data, pos)
        line_end = match.start() if match else n
        next_pos = match.end() if match else n
        line = data[pos:line_end]
        if line.startswith(BOM):
            line = line[len(BOM) :]
        head = line[:3]
        if head == b"MSH":
            if start is not None:
                messages.append(data[start:end])
            start = pos
            end = next_pos
        elif head in _BATCH_BYTES and (len(line) == 3 or not line[3:4].isalnum()):
            if start is not None:
                messages.append(data[start:end])
                start = None
        elif not line.strip():
            pass
        elif start is not None:
            end = next_pos
        else:
            raise ER7Error(
                "content before the first MSH segment is not an HL7 message",
                location="MSH",
            )
        pos = next_pos
    if start is not None:
        messages.append(data[start:end])
    return messages
