"""Small builders shared by tests."""

from __future__ import annotations

from typing import Any

from integration.settings import Settings, load_settings


def adt(control_id: str = "MSG001", *, sender: str = "EPIC", extra_msh: str = "",
        pid: bool = True, trigger: str = "A01") -> bytes:
    """A small ADT message (CR segment ends)."""
    segments = [
        f"MSH|^~\\&|{sender}|MAIN|CARELOOP|HOSP|20240131093000-0500||ADT^{trigger}^ADT_A01|"
        f"{control_id}|P|2.5.1{extra_msh}",
        "EVN|A01|20240131093000",
    ]
    if pid:
        segments.append("PID|1||123^^^MRN||Doe^Jane||19800101|F")
    segments.append("PV1|1|O")
    return ("\r".join(segments) + "\r").encode()


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "auth": "disabled",
        "mllp_port": 0,
        "http_port": 0,
        "sweep_interval_s": 0.2,
        "log_level": "warning",
    }
    values.update(overrides)
    return load_settings(**values)


def msa(ack: bytes | str) -> list[str]:
    """MSA fields of an ACK: [MSA, code, control id, ...]."""
    text = ack.decode() if isinstance(ack, bytes) else ack
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            return seg.split(seg[3])
    raise AssertionError(f"no MSA in {text!r}")


def err(ack: bytes | str) -> list[str]:
    text = ack.decode() if isinstance(ack, bytes) else ack
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith("ERR"):
            return seg.split(seg[3])
    raise AssertionError(f"no ERR in {text!r}")
