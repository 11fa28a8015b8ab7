"""The ER7 tokenizer: numbering, lazy splitting, escapes, nulls, tolerance."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mappings.er7 import Delimiters, ER7Error
from mappings.message import Message, unescape
from tests.mappings.strategies_mappings import delimiters, plain_text

ADT = (
    "MSH|^~\\&|SND|FAC|RCV|RFAC|20240131093000||ADT^A01^ADT_A01|CTL1|P|2.5.1\r"
    "EVN|A01|20240131093000\r"
    "PID|1||123^^^HOSP^MR~456^^^NHS^NH||Doe&van^John^Q~Roe^Jane||19700101|M|||"
    '1 Main St^^Town^^12345||555-1234^PRN^PH|""|\r'
    "PV1|1|I|W1^101^A\r"
)


class TestMessageParse:
    def test_numbering_follows_the_standard(self) -> None:
        """MSH-1 is the separator, MSH-2 the encoding characters, PID-3.4 the authority."""
        msg = Message.parse(ADT)
        msh = msg.segments("MSH")[0]
        assert msh.get(1) == "|"
        assert msh.get(2) == "^~\\&"
        assert msh.get(9, 2) == "A01"
        pid = msg.segment("PID")
        assert pid is not None
        assert pid.get(3) == "123"
        assert pid.get(3, 4) == "HOSP"
        assert pid.get(5, 1, 2) == "van"

    def test_repetitions_are_listed_without_empties(self) -> None:
        """reps() yields each non-empty repetition of a field."""
        pid = Message.parse(ADT).segment("PID")
        assert pid is not None
        assert [r.get(1) for r in pid.reps(3)] == ["123", "456"]
        assert [r.get(1) for r in pid.reps(5)] == ["Doe", "Roe"]

    def test_explicit_null_reads_empty_and_is_detectable(self) -> None:
        """A field of "" reads as empty, and is_null tells it from an absent field."""
        pid = Message.parse(ADT).segment("PID")
        assert pid is not None
        assert pid.get(14) == ""
        assert pid.is_null(14)
        assert not pid.is_null(15)
        assert not pid.has(14)

    def test_missing_fields_and_components_read_empty(self) -> None:
        """Reading past the end of a segment, field or component never raises."""
        pv1 = Message.parse(ADT).segment("PV1")
        assert pv1 is not None
        assert pv1.get(99) == ""
        assert pv1.get(3, 9, 4) == ""
        assert pv1.reps(50) == []

    def test_bytes_with_bom_and_lf_endings_parse(self) -> None:
        """A UTF-8 BOM and LF line ends (as in the MSFC samples) are tolerated."""
        msg = Message.parse(b"\xef\xbb\xbf" + ADT.replace("\r", "\n").encode())
        assert [s.id for s in msg] == ["MSH", "EVN", "PID", "PV1"]

    def test_doubled_escape_in_msh2_is_tolerated(self) -> None:
        """MSH-2 written as ^~\\\\& (Java string escaping) still yields the right delimiters."""
        msg = Message.parse(ADT.replace("^~\\&", "^~\\\\&", 1))
        assert msg.delimiters.escape == "\\"
        assert msg.delimiters.subcomponent == "&"

    def test_no_msh_raises_er7error(self) -> None:
        """Bytes without an MSH raise the tokenizer's own error, not an IndexError."""
        with pytest.raises(ER7Error):
            Message.parse("PID|1||123\r")

    def test_group_members_follow_their_parent(self) -> None:
        """after() lists the NTEs of one OBX and stops at the next OBX."""
        msg = Message.parse(
            "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rOBX|1|ST|X||a\rNTE|1||one\r"
            "NTE|2||two\rOBX|2|ST|Y||b\rNTE|1||three\r"
        )
        first = msg.segments("OBX")[0]
        assert [n.get(3) for n in msg.after(first, "NTE")] == ["one", "two"]

    def test_whitespace_around_values_is_stripped(self) -> None:
        """Padded fields (NextGen whitespace sample) read without the padding."""
        msg = Message.parse("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPID|1||  42^^^X^MR |")
        pid = msg.segment("PID")
        assert pid is not None
        assert pid.get(3) == "42"
        assert pid.get(3, 5) == "MR"


class TestUnescape:
    D = Delimiters()

    @pytest.mark.parametrize(
        ("raw", "text"),
        [
            ("A\\F\\B", "A|B"),
            ("A\\S\\B", "A^B"),
            ("A\\T\\E", "A&E"),
            ("A\\R\\B", "A~B"),
            ("C:\\E\\temp", "C:\\temp"),
            ("line1\\.br\\line2", "line1\nline2"),
            ("\\H\\bold\\N\\", "bold"),
            ("\\X0D0A\\", "\r\n"),
            ("caf\\XC3A9\\", "café"),
            ("\\XE9\\", "é"),
            ("odd \\Q\\ one", "odd \\Q\\ one"),
            ("ends with \\r", "ends with \\r"),
        ],
    )
    def test_escape_sequences_decode(self, raw: str, text: str) -> None:
        """Each v2 ch. 2.7 escape decodes; unknown ones and unterminated ones stay literal."""
        assert unescape(raw, self.D) == text

    def test_escapes_decode_inside_fields(self) -> None:
        """A field value with \\T\\ (92 uses in the MSFC samples) reads decoded."""
        msg = Message.parse("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPV1|1|I||||||||A\\T\\E")
        pv1 = msg.segment("PV1")
        assert pv1 is not None
        assert pv1.get(10) == "A&E"

    @settings(max_examples=200, deadline=None)
    @given(d=delimiters(), text=plain_text)
    def test_escape_then_unescape_round_trips(self, d: Delimiters, text: str) -> None:
        """Any text escaped for any delimiters reads back unchanged."""
        assert unescape(d.escape_text(text), d) == text

    @settings(max_examples=100, deadline=None)
    @given(d=delimiters(), values=st.lists(plain_text.map(str.strip), min_size=1, max_size=5))
    def test_escaped_values_survive_a_field_split(self, d: Delimiters, values: list[str]) -> None:
        """Escaped values joined by the component separator split back into the same values."""
        field = d.component.join(d.escape_text(v) for v in values)
        msh = (
            f"MSH{d.field}{d.component}{d.repetition}{d.escape}{d.subcomponent}"
            f"{d.field}A{d.field}B{d.field}C{d.field}D{d.field}20240101{d.field}{d.field}"
            f"ADT{d.component}A01{d.field}1{d.field}P{d.field}2.5"
        )
        msg = Message.parse(f"{msh}\rZZZ{d.field}{field}\r")
        zzz = msg.segment("ZZZ")
        assert zzz is not None
        got = [zzz.get(1, i + 1) for i in range(len(values))]
        assert got == ["" if v == '""' else v for v in values]
