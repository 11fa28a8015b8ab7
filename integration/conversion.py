"""What the processing stage hands to :mod:`mappings`: a :class:`MappingContext` per sender,
built from the sender rules in effect (:mod:`integration.senders`: ``[[hl7_senders]]`` and the
console's, time zone and identifier systems) and the default time zone, and cached, since every
message of a sender shares it. The cache is dropped whenever the rules change."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from integration.senders import SenderRegistry, SenderSnapshot, unregistered_error
from integration.settings import Settings
from mappings import MappingContext
from mappings.er7 import Header

__all__ = ["ContextFactory"]


def _namespace(hd: str, component: str) -> str:
    return hd.split(component, 1)[0]


class ContextFactory:
    """MSH-3/MSH-4 → the mapping context for that sender.

    The rules come from ``registry`` (by default one of its own, checked on every
    :meth:`refresh`: the processing stage calls it once per batch, so a sender saved in the
    console applies from the next batch in every process).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        validate: bool = True,
        registry: SenderRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._validate = validate
        self._default_tz = ZoneInfo(settings.timezone if settings else "UTC")
        self.registry = registry or SenderRegistry(settings, refresh_s=0.0)
        self._cache: dict[tuple[str, str], MappingContext] = {}
        self._cache_token = self.registry.token

    @property
    def settings(self) -> Settings | None:
        """The settings the contexts come from (None: defaults)."""
        return self._settings

    def refresh(self, engine: Engine) -> None:
        """Catch up with the console's sender rules (one small query; see
        :meth:`integration.senders.SenderRegistry.refresh`)."""
        self.registry.refresh(engine)

    def snapshot(self) -> SenderSnapshot:
        """The console's rules held here, for a work process (:meth:`adopt`)."""
        return self.registry.snapshot()

    def adopt(self, snapshot: SenderSnapshot) -> None:
        """Use the rules another process loaded (a work process reads no database)."""
        self.registry.adopt(snapshot)

    def _contexts(self) -> dict[tuple[str, str], MappingContext]:
        token = self.registry.token
        if token != self._cache_token:
            self._cache = {}
            self._cache_token = token
        return self._cache

    def unregistered(self, header: Header) -> str | None:
        """With ``hl7_unregistered_senders = "hold"``: the error for a message whose sender no
        rule names; None when it may be processed."""
        if not self.registry.hold_unregistered:
            return None
        comp = header.delimiters.component
        application = _namespace(header.sending_application, comp)
        facility = _namespace(header.sending_facility, comp)
        if self.registry.find(application, facility) is not None:
            return None
        return unregistered_error(application, facility)

    def for_header(self, header: Header, now: datetime | None = None) -> MappingContext:
        comp = header.delimiters.component
        key = (
            _namespace(header.sending_application, comp),
            _namespace(header.sending_facility, comp),
        )
        cache = self._contexts()
        base = cache.get(key)
        if base is None:
            rule = self.registry.find(*key)
            base = MappingContext(
                sender_timezone=ZoneInfo(rule.timezone) if rule and rule.timezone else None,
                default_timezone=self._default_tz,
                identifier_systems=rule.identifier_systems if rule else {},
                validate=self._validate,
            )
            cache[key] = base
        if now is None:
            return base
        return MappingContext(
            sender_timezone=base.sender_timezone,
            default_timezone=base.default_timezone,
            identifier_systems=base.identifier_systems,
            validate=base.validate,
            now=now,
        )

