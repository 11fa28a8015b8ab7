"""A tolerant, lazy ER7 tokenizer for whole messages: the hot path of every conversion.

:mod:`mappings.er7` finds the message, its delimiters and its segments; this module splits what a
mapping asks for, when it asks: a segment is split into fields on first access, a field into
repetitions, a repetition into components and subcomponents, and only the leaf strings a mapping
reads are unescaped. Most of a 40-segment ADT is never split past the field level.

Numbering is the standard's, 1-based: ``seg.get(3)`` is PID-3, ``seg.get(3, 4, 2)`` is PID-3.4.2
(assigning authority universal id) of the first repetition. ``MSH-1`` is the field separator and
``MSH-2`` the encoding characters, as in the standard.

Values are read leniently (see ``shared/corpus/NOTES.md`` for the shapes real feeds send):

* surrounding whitespace is stripped from leaf values;
* ``""`` (the explicit null, "delete this value") reads as empty, and :meth:`Segment.is_null`
  tells it apart from an absent field;
* escape sequences decode per HL7 v2 chapter 2.7: ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\`` to the
  delimiter, ``\\Xhh..\\`` to the bytes it spells (UTF-8, else Latin-1), ``\\.br\\`` and
  ``\\.sp\\`` to a line break; highlighting (``\\H\\ \\N\\``), character-set switches
  (``\\Cxxyy\\ \\Mxxyyzz\\``), other formatting commands and local ``\\Z..\\`` escapes are
  dropped; an unterminated escape is kept as literal text.

Nothing here raises on odd content; only an unreadable MSH does (:class:`mappings.er7.ER7Error`).
"""

from __future__ import annotations

from collections.abc import Iterator

from mappings.er7 import Delimiters, Header, decode, read_header, split_segments

__all__ = ["NULL", "Component", "Message", "Segment", "unescape"]

NULL = '""'

# Formatting commands (v2 ch. 2.7.6) that carry no text of their own.
_LINE_BREAKS = frozenset({".br", ".sp"})


def unescape(text: str, d: Delimiters) -> str:
    """Decode the escape sequences in one leaf value (no delimiters left in it)."""
    e = d.escape
    if not e or e not in text:
        return text
    parts = text.split(e)
    # parts at odd positions are escape sequences when the escape is closed
    n = len(parts)
    out: list[str] = [parts[0]]
    i = 1
    while i < n:
        if i + 1 >= n:
            # an escape character without a closing one: literal text (LFH files end
            # segments with a typed "\r", for example)
            out.append(e + parts[i])
            break
        seq = parts[i]
        out.append(_escape_value(seq, d))
        out.append(parts[i + 1])
        i += 2
    return "".join(out)


def _escape_value(seq: str, d: Delimiters) -> str:
    if seq == "F":
        return d.field
    if seq == "S":
        return d.component
    if seq == "T":
        return d.subcomponent
    if seq == "R":
        return d.repetition
    if seq == "E":
        return d.escape
    if seq == "P":
        return d.truncation
    if seq in ("H", "N", ""):
        return ""
    if seq in _LINE_BREAKS:
        return "\n"
    head = seq[:1]
    if head == "X":
        return _hex_text(seq[1:])
    if head in ("C", "M", "Z", "."):
        return ""
    # not an escape we know: keep what was sent
    return d.escape + seq + d.escape


def _hex_text(digits: str) -> str:
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _leaf(text: str, d: Delimiters) -> str:
    text = text.strip()
    if text == NULL:
        return ""
    if d.escape and d.escape in text:
        return unescape(text, d).strip()
    return text


class Component:
    """One repetition of a field (or one component of it), split into parts on demand.

    At repetition level the parts are components (``^``) and each part may hold subcomponents
    (``&``); :meth:`part` gives a component as a :class:`Component` whose parts are its
    subcomponents, so datatype readers work the same on a field or on a component.
    """

    __slots__ = ("_d", "_parts", "_seps", "raw")

    def __init__(self, raw: str, d: Delimiters, seps: str) -> None:
        self.raw = raw
        self._d = d
        self._seps = seps  # separators still to split on, outermost first
        self._parts: list[str] | None = None

    def __bool__(self) -> bool:
        raw = self.raw.strip()
        return bool(raw) and raw != NULL and bool(raw.strip(self._seps + " "))

    def __repr__(self) -> str:
        return f"Component({self.raw!r})"

    def _split(self) -> list[str]:
        parts = self._parts
        if parts is None:
            sep = self._seps[:1]
            parts = self.raw.split(sep) if sep else [self.raw]
            self._parts = parts
        return parts

    def get(self, c: int = 1, s: int = 1) -> str:
        """Part ``c`` (1-based), subpart ``s``, decoded and stripped; ``""`` when absent."""
        parts = self._split()
        if c > len(parts) or c < 1:
            return ""
        value = parts[c - 1]
        sub = self._seps[1:2]
        if sub and sub in value:
            subs = value.split(sub)
            value = subs[s - 1] if s <= len(subs) else ""
        elif s != 1:
            return ""
        return _leaf(value, self._d)

    def part(self, c: int) -> Component:
        """Part ``c`` as a :class:`Component` over its subparts."""
        parts = self._split()
        raw = parts[c - 1] if 0 < c <= len(parts) else ""
        return Component(raw, self._d, self._seps[1:])

    def text(self) -> str:
        """The whole value decoded, delimiters kept (for free text fields such as TX/FT)."""
        return _leaf(self.raw, self._d)

    def __len__(self) -> int:
        return len(self._split())


class Segment:
    """One segment; fields are split on first access."""

    __slots__ = ("_d", "_fields", "id", "index", "raw")

    def __init__(self, raw: str, d: Delimiters, index: int) -> None:
        self.raw = raw
        self._d = d
        self.id = raw[:3]
        self.index = index  # position in the message, 0 = MSH
        self._fields: list[str] | None = None

    def __repr__(self) -> str:
        return f"Segment({self.id}, #{self.index})"

    @property
    def delimiters(self) -> Delimiters:
        return self._d

    def _split(self) -> list[str]:
        fields = self._fields
        if fields is None:
            fields = self.raw.split(self._d.field)
            if self.id == "MSH":
                # MSH-1 is the separator itself, so MSH-n sits at index n
                fields.insert(1, self._d.field)
            self._fields = fields
        return fields

    def raw_field(self, n: int) -> str:
        """Field ``n`` as sent (escaped, all repetitions); ``""`` when absent."""
        fields = self._split()
        return fields[n] if 0 < n < len(fields) else ""

    def __len__(self) -> int:
        """The number of fields present (the highest field number)."""
        return len(self._split()) - 1

    def has(self, n: int) -> bool:
        """Whether field ``n`` has a value (``""`` and blanks do not count)."""
        raw = self.raw_field(n).strip()
        if not raw or raw == NULL:
            return False
        d = self._d
        return bool(raw.strip(d.component + d.repetition + d.subcomponent + " "))

    def is_null(self, n: int) -> bool:
        """Whether field ``n`` is the explicit null ``""`` (the sender asks to delete it)."""
        return self.raw_field(n).strip() == NULL

    def reps(self, n: int) -> list[Component]:
        """The non-empty repetitions of field ``n``."""
        raw = self.raw_field(n)
        if not raw:
            return []
        d = self._d
        seps = d.component + d.subcomponent
        if self.id == "MSH" and n in (1, 2):
            return [Component(raw, d, "")]
        if d.repetition in raw:
            out = [Component(r, d, seps) for r in raw.split(d.repetition)]
            return [c for c in out if c]
        comp = Component(raw, d, seps)
        return [comp] if comp else []

    def first(self, n: int) -> Component:
        """The first repetition of field ``n`` (empty when absent)."""
        raw = self.raw_field(n)
        d = self._d
        if self.id == "MSH" and n in (1, 2):
            return Component(raw, d, "")
        rep = d.repetition
        if rep in raw:
            raw = raw.split(rep, 1)[0]
        return Component(raw, d, d.component + d.subcomponent)

    def get(self, n: int, c: int = 1, s: int = 1) -> str:
        """Field ``n``, component ``c``, subcomponent ``s`` of the first repetition, decoded."""
        if self.id == "MSH" and n in (1, 2):
            return self.raw_field(n)
        raw = self.raw_field(n)
        if not raw:
            return ""
        d = self._d
        if c == 1 and s == 1 and d.component not in raw and d.repetition not in raw:
            if d.subcomponent in raw:
                raw = raw.split(d.subcomponent, 1)[0]
            return _leaf(raw, d)
        return self.first(n).get(c, s)

    def text(self, n: int) -> str:
        """Field ``n`` as one decoded string, repetitions joined by line breaks (TX, FT)."""
        return "\n".join(r.text() for r in self.reps(n))


class Message:
    """A parsed message: its header, delimiters and segments, with lookup by segment id."""

    __slots__ = ("_by_id", "delimiters", "header", "segments_list")

    def __init__(self, header: Header, segments: list[Segment]) -> None:
        self.header = header
        self.delimiters = header.delimiters
        self.segments_list = segments
        by_id: dict[str, list[Segment]] = {}
        for seg in segments:
            by_id.setdefault(seg.id, []).append(seg)
        self._by_id = by_id

    @classmethod
    def parse(cls, raw: bytes | str) -> Message:
        """Tokenize one message. Bytes are decoded by MSH-18 (see :func:`mappings.er7.decode`).

        Raises :class:`mappings.er7.ER7Error` when there is no readable MSH.
        """
        text = decode(raw) if isinstance(raw, bytes) else raw.lstrip("\ufeff")
        header = read_header(text)
        d = header.delimiters
        lines = split_segments(text.lstrip("\ufeff\r\n\t "))
        return cls(header, [Segment(line, d, i) for i, line in enumerate(lines)])

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments_list)

    def __len__(self) -> int:
        return len(self.segments_list)

    def segments(self, sid: str) -> list[Segment]:
        """Every segment with id ``sid``, in message order."""
        return self._by_id.get(sid, [])

    def segment(self, sid: str) -> Segment | None:
        """The first segment with id ``sid``, or None."""
        found = self._by_id.get(sid)
        return found[0] if found else None

    def has(self, sid: str) -> bool:
        return sid in self._by_id

    def after(self, seg: Segment, sid: str, stop: frozenset[str] = frozenset()) -> list[Segment]:
        """Segments ``sid`` that follow ``seg`` before the next segment whose id is in ``stop``
        (or ``seg``'s own id): the members of a group such as the NTEs of an OBX."""
        out: list[Segment] = []
        segs = self.segments_list
        for other in segs[seg.index + 1 :]:
            if other.id == seg.id or other.id in stop:
                break
            if other.id == sid:
                out.append(other)
        return out
