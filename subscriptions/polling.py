"""Polling: follow changes with a ``_lastUpdated`` cursor, for EHRs without subscriptions and
for catch-up searches.

A :class:`PollCursor` per (connection, resource type) holds the highest ``meta.lastUpdated``
seen (server clock, never careloop's) and the versions seen near it. Each poll asks

    GET Type?_lastUpdated=gt{cursor - overlap}&_sort=_lastUpdated&_count=N

and follows ``next`` links. The overlap window re-reads a little of the past on purpose:
servers commit concurrent writes out of ``lastUpdated`` order and clocks step, so a resource
can appear with a ``lastUpdated`` just below a cursor already advanced past it. What the
overlap re-reads is dropped by key (type, id, versionId; ``lastUpdated`` where a server sends
no versionId), so each version is reported once. The cursor moves to the highest
``lastUpdated`` seen, and only keys inside the window are kept, so the state stays small.

Deletes do not show in a search; callers that must see them read ``Type/_history?_since=``
(``history=True``), whose entries carry ``request.method`` ``DELETE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from adapters.fhir import FHIRRequest, next_link
from subscriptions._json import Reference, format_instant, parse_instant
from subscriptions.flow import Flow

__all__ = [
    "DEFAULT_OVERLAP",
    "Change",
    "PollCursor",
    "PollResult",
    "advance",
    "changes_in",
    "poll_flow",
    "poll_request",
    "search_pages",
]

DEFAULT_OVERLAP = timedelta(minutes=2)
VersionKey = tuple[str, str, str]


@dataclass(frozen=True)
class Change:
    """One resource version found by a poll: the resource, or only its key for a delete."""

    resource_type: str
    id: str
    version: str
    last_updated: str | None
    resource: dict[str, Any] | None
    deleted: bool = False

    @property
    def key(self) -> VersionKey:
        return (self.resource_type, self.id, self.version)


@dataclass(frozen=True)
class PollCursor:
    """Where polling of one resource type stands (see the module docstring)."""

    resource_type: str
    since: str | None = None
    seen: frozenset[VersionKey] = field(default_factory=frozenset)
    seen_at: Mapping[VersionKey, str] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "resource_type": self.resource_type, "since": self.since,
                "seen": [[*k, self.seen_at.get(k)] for k in sorted(self.seen)]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PollCursor:
        if data.get("v") != 1:
            raise ValueError(f"poll cursor version {data.get('v')!r} is not 1")
        seen: dict[VersionKey, str] = {}
        for t, i, v, at in data.get("seen") or []:
            seen[(t, i, v)] = at
        return cls(str(data["resource_type"]), data.get("since"), frozenset(seen),
                   {k: a for k, a in seen.items() if a})


@dataclass(frozen=True)
class PollResult:
    """A poll's new cursor (store it once the changes are stored) and the fresh changes."""

    cursor: PollCursor
    changes: tuple[Change, ...]

    @property
    def resources(self) -> tuple[dict[str, Any], ...]:
        return tuple(c.resource for c in self.changes if c.resource is not None)


def poll_request(cursor: PollCursor, *, overlap: timedelta = DEFAULT_OVERLAP,
                 page_size: int = 100, start: datetime | None = None,
                 history: bool = False, params: Sequence[tuple[str, str]] = ()) -> FHIRRequest:
    """The first request of a poll. Without a cursor, ``start`` bounds it (None: everything)."""
    since = parse_instant(cursor.since) - overlap if cursor.since else start
    if history:
        query = [("_count", str(page_size))]
        if since is not None:
            query.insert(0, ("_since", format_instant(since)))
        return FHIRRequest("GET", f"{cursor.resource_type}/_history", tuple(query))
    query = [*params, ("_sort", "_lastUpdated"), ("_count", str(page_size))]
    if since is not None:
        query.insert(0, ("_lastUpdated", f"gt{format_instant(since)}"))
    return FHIRRequest("GET", cursor.resource_type, tuple(query))


def changes_in(bundle: Mapping[str, Any], resource_type: str | None = None) -> list[Change]:
    """The resource versions in a searchset or history Bundle (included resources and
    OperationOutcomes left out; ``resource_type`` filters)."""
    out = []
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, Mapping):
            continue
        if (entry.get("search") or {}).get("mode") in ("include", "outcome"):
            continue
        resource = entry.get("resource")
        request = entry.get("request") or {}
        deleted = isinstance(request, Mapping) and request.get("method") == "DELETE"
        if isinstance(resource, Mapping) and resource.get("resourceType") != "OperationOutcome":
            meta = resource.get("meta") or {}
            rtype, rid = str(resource.get("resourceType")), str(resource.get("id", ""))
            updated = meta.get("lastUpdated")
            version = meta.get("versionId") or updated or ""
            out.append(Change(rtype, rid, str(version), updated, dict(resource), deleted))
        elif deleted:
            ref = Reference.parse(str(request.get("url", "")))
            full = Reference.parse(str(entry.get("fullUrl", "")))
            response = entry.get("response") or {}
            updated = response.get("lastModified") if isinstance(response, Mapping) else None
            gone_type = ref.resource_type or full.resource_type
            gone_id = ref.id or full.id
            if gone_type and gone_id:
                etag = str(response.get("etag", "")) if isinstance(response, Mapping) else ""
                version = etag.removeprefix("W/").strip('"') or full.version or updated or ""
                out.append(Change(gone_type, gone_id, version, updated, None, True))
    return [c for c in out if resource_type is None or c.resource_type == resource_type]


def advance(cursor: PollCursor, changes: Iterable[Change], *,
            overlap: timedelta = DEFAULT_OVERLAP) -> PollResult:
    """Drop versions already seen, move the cursor to the highest ``lastUpdated``, and keep
    only the keys that the next poll's overlap window can return again."""
    fresh: list[Change] = []
    seen_at = dict(cursor.seen_at)
    seen = set(cursor.seen)
    newest = parse_instant(cursor.since) if cursor.since else None
    newest_text = cursor.since
    for change in changes:
        if change.key in seen:
            continue
        seen.add(change.key)
        fresh.append(change)
        if change.last_updated:
            seen_at[change.key] = change.last_updated
            when = parse_instant(change.last_updated)
            if newest is None or when > newest:
                newest, newest_text = when, change.last_updated
    if newest is not None:
        floor = newest - overlap
        # Versions without lastUpdated cannot match a _lastUpdated search again: not kept.
        seen = {k for k in seen if k in seen_at and parse_instant(seen_at[k]) >= floor}
    kept_at = {k: v for k, v in seen_at.items() if k in seen}
    return PollResult(PollCursor(cursor.resource_type, newest_text, frozenset(seen), kept_at),
                      tuple(fresh))


def search_pages(first: FHIRRequest) -> Flow[list[dict[str, Any]]]:
    """Every Bundle of a search, following ``next`` links."""
    bundles = []
    request = first
    seen: set[str] = set()
    while True:
        response = yield request
        bundle = response.body if isinstance(response.body, dict) else {}
        bundles.append(bundle)
        link = next_link(bundle)
        if link is None or link in seen:
            return bundles
        seen.add(link)
        request = FHIRRequest.get(link)


def poll_flow(cursor: PollCursor, *, overlap: timedelta = DEFAULT_OVERLAP,
              page_size: int = 100, start: datetime | None = None,
              history: bool = False) -> Flow[PollResult]:
    """One poll of one resource type: the search, all its pages, then :func:`advance`."""
    first = poll_request(cursor, overlap=overlap, page_size=page_size, start=start,
                         history=history)
    bundles = yield from search_pages(first)
    changes = [c for b in bundles for c in changes_in(b, cursor.resource_type)]
    if history:
        # History is newest first; report in time order like the search.
        changes.sort(key=lambda c: parse_instant(c.last_updated) if c.last_updated
                     else parse_instant("0001-01-01T00:00:00Z"))
    return advance(cursor, changes, overlap=overlap)
