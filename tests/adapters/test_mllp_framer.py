"""The sans-I/O MLLP framer."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.mllp import Framer, FrameTooLarge, ack_control_id, frame

# Payloads never contain the MLLP control bytes.
payloads = st.binary(min_size=0, max_size=300).map(
    lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class TestFramer:
    def test_one_frame_in_one_read(self) -> None:
        """A whole frame in one read yields its payload."""
        assert Framer().feed(frame(b"MSH|x")) == [b"MSH|x"]

    def test_partial_frame_kept_across_reads(self) -> None:
        """A frame split over reads is returned once its end block arrives."""
        f = Framer()
        assert f.feed(b"\x0bMSH|") == []
        assert f.in_frame
        assert f.feed(b"abc\x1c") == [b"MSH|abc"]
        assert f.feed(b"\r\x0bNEXT\x1c\r") == [b"NEXT"]
        assert f.skipped_bytes == 0

    def test_bytes_between_frames_skipped_and_counted(self) -> None:
        """Noise outside frames is skipped and counted, never returned."""
        f = Framer()
        assert f.feed(b"junk" + frame(b"A") + b"\r\n" + frame(b"B")) == [b"A", b"B"]
        assert f.skipped_bytes == 6

    def test_end_block_without_cr_accepted(self) -> None:
        """Some engines omit the CR after FS; the frame still ends."""
        assert Framer().feed(b"\x0bA\x1c\x0bB\x1c\r") == [b"A", b"B"]

    def test_restart_abandons_unfinished_frame(self) -> None:
        """A start block inside an open frame drops the unfinished one."""
        f = Framer()
        assert f.feed(b"\x0bhalf\x0bwhole\x1c\r") == [b"whole"]
        assert f.skipped_bytes == 5

    def test_oversized_frame_raises_then_recovers(self) -> None:
        """A frame past the limit raises once, is skipped, and the next frame is read."""
        f = Framer(max_frame_bytes=10)
        with pytest.raises(FrameTooLarge) as info:
            f.feed(b"\x0bMSH|" + b"x" * 20)
        assert info.value.head.startswith(b"MSH|")
        assert f.feed(b"more\x1c\r" + frame(b"ok")) == [b"ok"]

    def test_empty_frame(self) -> None:
        """An empty frame is a frame with an empty payload (the server answers AR)."""
        assert Framer().feed(b"\x0b\x1c\r") == [b""]

    @given(st.lists(payloads, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
    @settings(max_examples=300)
    def test_round_trip_at_any_chunk_boundary(self, messages: list[bytes], cuts: list[int]) -> None:
        """Framed payloads come back unchanged however the stream is cut into reads."""
        stream = b"".join(frame(m) for m in messages)
        f = Framer()
        out: list[bytes] = []
        for piece in chunked(stream, cuts):
            out += f.feed(piece)
        assert out == messages
        assert f.skipped_bytes == 0

    @given(st.binary(max_size=2000), st.lists(st.integers(0, 5000), max_size=10))
    @settings(max_examples=300)
    def test_arbitrary_bytes_never_crash(self, data: bytes, cuts: list[int]) -> None:
        """Any byte stream raises nothing but FrameTooLarge."""
        f = Framer(max_frame_bytes=256)
        for piece in chunked(data, cuts):
            with contextlib.suppress(FrameTooLarge):
                f.feed(piece)


class TestAckControlId:
    def test_reads_msa_2(self) -> None:
        """MSA-2 is found whatever the segment terminator."""
        assert ack_control_id(b"MSH|^~\\&|A\nMSA|AA|123\n") == b"123"
        assert ack_control_id(b"MSH#^~\\&#A\rMSA#AE#X9\r") == b"X9"

    def test_none_without_msa(self) -> None:
        assert ack_control_id(b"MSH|^~\\&|A\r") == b""
        assert ack_control_id(b"") == b""
