"""What a conversion needs from outside: the sender's time zone, identifier systems, and
whether to validate. Built once per sender connection by the caller (from settings), passed in;
``mappings`` never reads settings or the clock itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from types import MappingProxyType

__all__ = ["MappingContext"]


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class MappingContext:
    """Settings for one conversion.

    * ``sender_timezone``: the zone the sender's local times are in (times without an offset);
      falls back to ``default_timezone``.
    * ``identifier_systems``: assigning authority → identifier system URI. Keys are matched
      against the authority's namespace id (CX-4.1), its universal id (CX-4.2), or both as
      ``namespace^universal id``. Example: ``{"RAJ12": "https://fhir.example.nhs.uk/Id/raj12"}``.
    * ``validate``: validate every produced resource with the fhir.resources R4B models (the
      storing path keeps this on; about a third of a conversion's time, see docs/mappings.md).
    * ``now``: the time the conversion is for (Bundle.timestamp); None leaves it out, so the
      output depends on the message alone.
    """

    sender_timezone: tzinfo | None = None
    default_timezone: tzinfo = UTC
    identifier_systems: Mapping[str, str] = field(default_factory=_empty)
    validate: bool = True
    now: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.identifier_systems, MappingProxyType):
            object.__setattr__(
                self, "identifier_systems", MappingProxyType(dict(self.identifier_systems))
            )
        if self.now is not None and self.now.tzinfo is None:
            raise ValueError("MappingContext.now must be timezone-aware")

    @property
    def timezone(self) -> tzinfo:
        """The zone local times are read in."""
        return self.sender_timezone or self.default_timezone
