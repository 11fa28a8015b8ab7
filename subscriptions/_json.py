"""Small readers shared by the subscription modules: lenient JSON loading, FHIR instants and
references. Private: the public names are re-exported where they belong."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["Reference", "format_instant", "load_json_object", "parse_instant"]

# Type/id[/_history/vid] at the end of a relative or absolute reference (FHIR R4 3.1.3.1:
# ids are [A-Za-z0-9\-\.]{1,64}).
_REF = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?/?$"
)


def load_json_object(body: bytes | str | Mapping[str, Any], what: str,
                     error: type[ValueError]) -> dict[str, Any]:
    """A JSON object from bytes, text or an already parsed mapping. A UTF-8 BOM is skipped
    (fhir-candle's r4 Subscription sample starts with one; Windows tools add them)."""
    if isinstance(body, Mapping):
        return dict(body)
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 (byte {exc.start})") from None
    text = body.removeprefix("\ufeff")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise error(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{what} is JSON but not an object")
    return value


def parse_instant(value: str) -> datetime:
    """A FHIR instant/dateTime as an aware datetime (no offset: UTC; a bare date: midnight)."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_instant(value: datetime) -> str:
    """An aware datetime as a FHIR instant in UTC with milliseconds (``...T10:00:00.000Z``)."""
    if value.tzinfo is None:
        raise ValueError("instants must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Reference:
    """A FHIR reference as careloop reads it: the text sent, and ``Type``/``id``/version when
    the text ends like one; or only a business ``identifier`` (system, value), which
    athenahealth sends as the notification focus."""

    reference: str | None = None
    resource_type: str | None = None
    id: str | None = None
    version: str | None = None
    identifier: tuple[str | None, str] | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        m = _REF.search(text.strip())
        if m is None:
            return cls(reference=text)
        return cls(text, m["type"], m["id"], m["version"])

    @classmethod
    def from_json(cls, value: Any) -> Reference | None:
        """From a Reference datatype (``reference`` and/or ``identifier``) or a bare string."""
        if isinstance(value, str) and value.strip():
            return cls.parse(value)
        if not isinstance(value, Mapping):
            return None
        text = value.get("reference")
        ident = value.get("identifier")
        identifier = None
        if isinstance(ident, Mapping) and isinstance(ident.get("value"), str):
            system = ident.get("system")
            identifier = (system if isinstance(system, str) else None, ident["value"])
        if isinstance(text, str) and text.strip():
            ref = cls.parse(text)
            return cls(ref.reference, ref.resource_type, ref.id, ref.version, identifier)
        if identifier is not None:
            rtype = value.get("type")
            return cls(resource_type=rtype if isinstance(rtype, str) else None,
                       identifier=identifier)
        return None

    @property
    def key(self) -> str | None:
        """``Type/id`` when both are known."""
        if self.resource_type and self.id:
            return f"{self.resource_type}/{self.id}"
        return None
