"""Acknowledgements (mappings.ack)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from mappings.ack import AckCode, AckError, application_ack_wanted, build_ack
from mappings.er7 import read_header, split_segments

NOW = datetime(2024, 3, 1, 9, 30, 0, tzinfo=ZoneInfo("Asia/Dubai"))
MSG = (
    "MSH|^~\\&#|LAB|NORTH|CARELOOP|HOSP|20240301||ORU^R01^ORU_R01|C123|P|2.7|||AL|ER|"
    "|UNICODE UTF-8\r"
    "PID|1||9^^^MRN\r"
)


class TestBuildAck:
    def test_swaps_sender_and_receiver_and_echoes_control_id(self) -> None:
        """MSH-3/4 and MSH-5/6 swap; MSA-2 is the message's MSH-10; delimiters, version and
        character set are kept."""
        ack = build_ack(read_header(MSG), AckCode.CA, control_id="A1", now=NOW)
        msh, msa = split_segments(ack)
        fields = msh.split("|")
        assert fields[1] == "^~\\&#"
        assert fields[2:6] == ["CARELOOP", "HOSP", "LAB", "NORTH"]
        assert fields[6] == "20240301093000+0400"
        assert fields[8] == "ACK^R01^ACK"
        assert fields[9] == "A1"
        assert fields[11] == "2.7"
        assert fields[17] == "UNICODE UTF-8"
        assert msa == "MSA|CA|C123"

    def test_err_segment_v25_layout(self) -> None:
        """ERR carries location, table 0357 code, severity and the text, escaped."""
        err = AckError("PID-3 is empty | no identifier", "PID-3", "101")
        ack = build_ack(read_header(MSG), AckCode.AE, control_id="A2", now=NOW, errors=(err,))
        segment = split_segments(ack)[2]
        fields = segment.split("|")
        assert fields[2] == "PID^1^3"
        assert fields[3] == "101^Required field missing^HL70357"
        assert fields[4] == "E"
        assert fields[8] == "PID-3 is empty \\F\\ no identifier"

    def test_err_segment_v23_has_err1(self) -> None:
        """Versions before 2.5 also get ERR-1, the only ERR field they define."""
        msg = MSG.replace("|2.7|", "|2.3|")
        err = AckError("bad", "PID-3", "101")
        ack = build_ack(read_header(msg), AckCode.AE, control_id="A3", now=NOW, errors=(err,))
        assert split_segments(ack)[2].split("|")[1].startswith("PID^1^3^101&")

    @given(st.text(max_size=60))
    def test_error_text_never_breaks_the_segment(self, text: str) -> None:
        """Any error text is escaped: the ACK keeps exactly three segments and 9 ERR fields."""
        err = AckError(text, "PID-3", "207")
        ack = build_ack(read_header(MSG), AckCode.AE, control_id="A", now=NOW, errors=(err,))
        segments = ack.rstrip("\r").split("\r")
        assert len(segments) == 3
        assert len(segments[2].split("|")) == 9


class TestApplicationAckWanted:
    def test_table_0155(self) -> None:
        """AL always, NE never, ER only on error, SU only on success; none in original mode."""
        h = read_header(MSG)  # MSH-16 = ER
        assert not application_ack_wanted(h, ok=True)
        assert application_ack_wanted(h, ok=False)
        original = read_header(MSG.replace("|||AL|ER|", "||||||"))
        assert not application_ack_wanted(original, ok=False)
