"""How many SMS segments a text costs (3GPP TS 23.038).

A text made only of GSM-7 characters travels 160 characters in one segment, 153 per segment
when split; characters of the GSM-7 extension table (``{ } [ ] ~ \\ | ^ €`` and form feed)
count twice. Any other character switches the whole text to UCS-2: 70 UTF-16 code units in one
segment, 67 per segment when split (an emoji outside the BMP counts two).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SmsLength", "sms_length"]

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("\f^{}\\[~]|€")


@dataclass(frozen=True)
class SmsLength:
    encoding: str  # "GSM-7" or "UCS-2"
    units: int
    segments: int


def sms_length(text: str) -> SmsLength:
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        units = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in text)
        single, multi, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi, encoding = 70, 67, "UCS-2"
    if units == 0:
        return SmsLength(encoding, 0, 0)
    segments = 1 if units <= single else -(-units // multi)
    return SmsLength(encoding, units, segments)
