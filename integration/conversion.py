"""What the processing stage hands to :mod:`mappings`: a :class:`MappingContext` per sender,
built from the settings (``[[hl7_senders]]`` time zone and identifier systems, the default time
zone) and cached, since every message of a sender shares it."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from integration.settings import Settings
from mappings import MappingContext
from mappings.er7 import Header

__all__ = ["ContextFactory"]


def _namespace(hd: str, component: str) -> str:
    return hd.split(component, 1)[0]


class ContextFactory:
    """MSH-3/MSH-4 → the mapping context for that sender."""

    def __init__(self, settings: Settings | None = None, *, validate: bool = True) -> None:
        self._settings = settings
        self._validate = validate
        self._default_tz = ZoneInfo(settings.timezone if settings else "UTC")
        self._cache: dict[tuple[str, str], MappingContext] = {}

    @property
    def settings(self) -> Settings | None:
        """The settings the contexts come from (None: defaults)."""
        return self._settings

    def for_header(self, header: Header, now: datetime | None = None) -> MappingContext:
        comp = header.delimiters.component
        key = (
            _namespace(header.sending_application, comp),
            _namespace(header.sending_facility, comp),
        )
        base = self._cache.get(key)
        if base is None:
            rule = self._settings.sender(*key) if self._settings else None
            base = MappingContext(
                sender_timezone=ZoneInfo(rule.timezone) if rule and rule.timezone else None,
                default_timezone=self._default_tz,
                identifier_systems=rule.identifier_systems if rule else {},
                validate=self._validate,
            )
            self._cache[key] = base
        if now is None:
            return base
        return MappingContext(
            sender_timezone=base.sender_timezone,
            default_timezone=base.default_timezone,
            identifier_systems=base.identifier_systems,
            validate=base.validate,
            now=now,
        )
