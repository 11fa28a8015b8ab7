"""Hypothesis strategies for HL7 v2 values: delimiters, escaped text, DTM, XPN, XAD, XTN, CWE."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import strategies as st

from mappings.er7 import Delimiters

# delimiter characters real senders use; escape and subcomponent may be any of these
_DELIM_CHARS = "|^~\\&#!$%*"


@st.composite
def delimiters(draw: st.DrawFn) -> Delimiters:
    chars = draw(st.permutations(_DELIM_CHARS))
    return Delimiters(chars[0], chars[1], chars[2], chars[3], chars[4])


# text without control characters (CR/LF end segments); any printable Unicode otherwise
plain_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
)
word = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'-", min_size=1, max_size=12
)


@st.composite
def dtm_values(draw: st.DrawFn) -> tuple[str, datetime, int, int | None]:
    """(DTM text, the instant it names, precision in characters, offset minutes or None)."""
    moment = draw(
        st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2099, 12, 31))
    ).replace(microsecond=0)
    precision = draw(st.sampled_from([4, 6, 8, 10, 12, 14]))
    text = moment.strftime("%Y%m%d%H%M%S")[:precision]
    offset = None
    if precision >= 10 and draw(st.booleans()):
        offset = draw(st.integers(min_value=-12 * 60, max_value=14 * 60).map(lambda m: m - m % 15))
        sign = "-" if offset < 0 else "+"
        text += f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    return text, moment, precision, offset


def shifted(moment: datetime, minutes: int) -> datetime:
    return moment - timedelta(minutes=minutes)
