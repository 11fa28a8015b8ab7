"""Reading MSH, decoding by MSH-18 and splitting bodies into messages (mappings.er7)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mappings.er7 import ER7Error, decode, read_header, split_messages, split_segments

ADT = (
    "MSH|^~\\&|EPIC|MAIN|CARELOOP|HOSP|20240131093000-0500||ADT^A01^ADT_A01|MSG001|P|2.5.1\r"
    "EVN|A01|20240131093000\r"
    "PID|1||123^^^MRN||Doe^Jane\r"
)


class TestReadHeader:
    def test_fields_numbered_as_the_standard(self) -> None:
        """MSH-3, MSH-9, MSH-10 and MSH-12 come back by their standard numbers."""
        h = read_header(ADT)
        assert h.sending_application == "EPIC"
        assert h.message_type == "ADT^A01"
        assert h.message_structure == "ADT_A01"
        assert h.control_id == "MSG001"
        assert h.version == "2.5.1"
        assert not h.enhanced_mode

    def test_doubled_escape_in_msh2_tolerated(self) -> None:
        """MSH-2 written as ^~\\\\& (Java escaping, seen in LinuxForHealth samples) still reads."""
        h = read_header(ADT.replace("^~\\&", "^~\\\\&", 1))
        assert h.delimiters.escape == "\\"
        assert h.delimiters.subcomponent == "&"
        assert h.control_id == "MSG001"

    def test_truncation_character(self) -> None:
        """The v2.7+ five-character MSH-2 keeps the truncation character."""
        h = read_header(ADT.replace("^~\\&", "^~\\&#", 1))
        assert h.delimiters.truncation == "#"
        assert h.delimiters.encoding_characters == "^~\\&#"

    def test_missing_trigger_gives_code_only(self) -> None:
        """ORU^^ORU_R01 (no trigger, seen in ReportStream) reads as ORU."""
        h = read_header(ADT.replace("ADT^A01^ADT_A01", "ORU^^ORU_R01"))
        assert h.message_type == "ORU"

    @pytest.mark.parametrize(
        ("text", "location"),
        [
            ("PID|1||x\r", "MSH"),
            ("MSH", "MSH-2"),
            ("MSH|^~\\&|A|B|C|D|20240101||^A01|X|P|2.5\r", "MSH-9"),
            ("MSH|^~\\&|A|B|C|D|20240101||ADT^A01||P|2.5\r", "MSH-10"),
            ("MSHA^~\\&|A\r", "MSH-1"),
        ],
    )
    def test_broken_msh_names_the_field(self, text: str, location: str) -> None:
        """A broken MSH raises ER7Error naming the field."""
        with pytest.raises(ER7Error) as info:
            read_header(text)
        assert info.value.location == location

    def test_enhanced_mode_from_msh15(self) -> None:
        h = read_header(ADT.replace("|P|2.5.1", "|P|2.5.1|||AL|NE"))
        assert h.enhanced_mode
        assert h.accept_ack_type == "AL"
        assert h.application_ack_type == "NE"


class TestDecode:
    def test_bom_dropped(self) -> None:
        assert decode(b"\xef\xbb\xbf" + ADT.encode()).startswith("MSH|")

    def test_latin1_by_msh18(self) -> None:
        """Bytes are decoded by the character set MSH-18 declares."""
        msg = ADT.replace("|P|2.5.1", "|P|2.5.1||||||8859/1").replace("Jane", "Jos\xe9")
        assert "Jos\xe9" in decode(msg.encode("latin-1"))

    def test_utf8_by_msh18(self) -> None:
        msg = ADT.replace("|P|2.5.1", "|P|2.5.1||||||UNICODE UTF-8").replace("Jane", "Zo\u00eb")
        assert "Zo\u00eb" in decode(msg.encode("utf-8"))

    def test_invalid_bytes_for_declared_charset(self) -> None:
        msg = ADT.replace("|P|2.5.1", "|P|2.5.1||||||ASCII").encode() + b"\xff"
        with pytest.raises(ER7Error) as info:
            decode(msg)
        assert info.value.location == "MSH-18"

    def test_unknown_charset_rejected(self) -> None:
        msg = ADT.replace("|P|2.5.1", "|P|2.5.1||||||EBCDIC").encode()
        with pytest.raises(ER7Error, match="not supported"):
            decode(msg)

    def test_no_charset_falls_back_to_cp1252(self) -> None:
        """Without MSH-18, bytes that are not UTF-8 are read as Windows-1252."""
        assert "Jos\xe9" in decode(ADT.replace("Jane", "Jos\xe9").encode("cp1252"))


class TestSplit:
    def test_any_line_ending(self) -> None:
        for sep in ("\r", "\n", "\r\n"):
            assert len(split_segments(ADT.replace("\r", sep))) == 3

    def test_hard_wrap_joined(self) -> None:
        """A line that is not a segment continues the previous one (hard-wrapped exports)."""
        segs = split_segments("MSH|^~\\&|A\rPID|1||12\n34^^^MRN\r")
        assert segs == ["MSH|^~\\&|A", "PID|1||1234^^^MRN"]

    def test_several_messages_and_batch_envelope(self) -> None:
        """FHS/BHS/BTS/FTS are dropped; each message's exact bytes are kept."""
        body = (
            b"FHS|^~\\&|X\r\nBHS|^~\\&|X\r\n" + ADT.encode() + b"\r\n"
            + ADT.replace("MSG001", "MSG002").encode() + b"BTS|2\r\nFTS|1\r\n"
        )
        messages = split_messages(body)
        assert [read_header(decode(m)).control_id for m in messages] == ["MSG001", "MSG002"]
        assert messages[1] == ADT.replace("MSG001", "MSG002").encode()

    def test_text_before_msh_rejected(self) -> None:
        with pytest.raises(ER7Error):
            split_messages(b"hello\r" + ADT.encode())

    @given(st.binary(max_size=500))
    @settings(max_examples=300)
    def test_arbitrary_bytes_raise_only_er7error(self, data: bytes) -> None:
        """Garbage raises ER7Error or yields messages; never another exception."""
        try:
            for message in split_messages(data):
                read_header(decode(message))
        except ER7Error:
            pass

    @given(
        st.sampled_from(list("|#!@")),
        st.permutations(list("^~\\&")),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    )
    @settings(max_examples=200)
    def test_random_delimiters_round_trip(
        self, field_sep: str, encoding: list[str], control: str
    ) -> None:
        """Any legal delimiter set reads back MSH-9 and MSH-10."""
        enc = "".join(encoding)
        control = "".join(ch for ch in control if ch not in enc + field_sep).strip() or "C1"
        comp = enc[0]
        text = field_sep.join(
            ["MSH", enc, "A", "B", "C", "D", "20240101", "", f"ADT{comp}A01", control, "P", "2.5"]
        )
        h = read_header(text + "\r")
        assert h.message_type == "ADT^A01"
        assert h.control_id == control


class TestSpaceJoinedSegments:
    def test_one_line_message_split_at_space_before_segment_id(self) -> None:
        """Segments joined by spaces on one line (a real export) are split again, and MSH-15
        is not mistaken for the next segment's id."""
        text = "MSH|^~\\&|A|1|||2005||ADT^A01|599102|P|2.3||| EVN|A01|2005| PID|1||10006^^^1^MRN"
        assert [s[:3] for s in split_segments(text)] == ["MSH", "EVN", "PID"]
        h = read_header(text)
        assert h.version == "2.3"
        assert not h.enhanced_mode

    def test_spaces_inside_text_left_alone(self) -> None:
        text = "MSH|^~\\&|A|1|||2005||ADT^A01|1|P|2.3\rNTE|1||see ABC|here\r"
        assert split_segments(text)[1] == "NTE|1||see ABC|here"
