"""Catch-up after a gap, a silence or an ``error`` status, and resolving id-only and empty
payloads into resources. Flows (see :mod:`subscriptions.flow`): they yield requests, the caller
executes them with ``adapters.fhir``.

Catch-up (:func:`catch_up_flow`), for a :class:`~subscriptions.tracking.CatchUp` decision:

1. Where the server has ``$events`` (:class:`ServerCapabilities`, from its
   CapabilityStatement), ask ``Subscription/id/$events?eventsSinceNumber=a&eventsUntilNumber=b``
   for each missing range. Servers keep a limited number of past events; numbers the answer
   lacks are not assumed delivered.
2. Otherwise, or for what ``$events`` could not return, search each resource type for
   ``_lastUpdated`` after the last good point minus an overlap window, all pages. Without a
   good point the search is unbounded (a full resync of the types).

Resolution (:func:`resolve_flow`) turns events into resources: full-resource payloads are
used as sent; id-only focus references are read in batches (``GET Type?_id=a,b,c``); a focus
given only by identifier (athenahealth) is searched by ``identifier=system|value`` in the type
that the topic maps to; empty payloads (numbers only) become a ``_lastUpdated`` search from the
earliest event's timestamp minus the overlap. A focus a read cannot find (deleted, or not
visible to careloop's scopes) is reported, not guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from adapters.fhir import FatalFHIRError, FHIRRequest
from subscriptions._json import Reference, format_instant, parse_instant
from subscriptions.flow import Flow
from subscriptions.notifications import (
    NotificationError,
    NotificationEvent,
    PayloadContent,
    parse_notification,
)
from subscriptions.polling import DEFAULT_OVERLAP, Change, changes_in, search_pages
from subscriptions.tracking import CatchUp, EventRange

__all__ = [
    "BACKPORT_EVENTS_OPERATION",
    "CatchUpResult",
    "Resolved",
    "ServerCapabilities",
    "catch_up_flow",
    "events_request",
    "resolve_flow",
    "since_search_request",
]

_BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
BACKPORT_EVENTS_OPERATION = f"{_BACKPORT}/OperationDefinition/backport-subscription-events"
_STATUS_OPERATION = f"{_BACKPORT}/OperationDefinition/backport-subscription-status"
_TOPIC_EXTENSION = (f"{_BACKPORT}/StructureDefinition/"
                    "capabilitystatement-subscriptiontopic-canonical")


@dataclass(frozen=True)
class ServerCapabilities:
    """What one EHR's subscription support offers careloop."""

    events_operation: bool = False
    status_operation: bool = False
    topics: frozenset[str] = frozenset()

    @classmethod
    def from_capability_statement(cls, statement: Mapping[str, Any]) -> ServerCapabilities:
        """Read ``$events``/``$status`` support and the topic canonicals advertised on
        Subscription (the backport IG's CapabilityStatement shape)."""
        events = status = False
        topics: set[str] = set()
        for rest in statement.get("rest") or []:
            if not isinstance(rest, Mapping):
                continue
            for resource in rest.get("resource") or []:
                if not isinstance(resource, Mapping) or resource.get("type") != "Subscription":
                    continue
                for op in resource.get("operation") or []:
                    if not isinstance(op, Mapping):
                        continue
                    name = str(op.get("name", "")).lstrip("$")
                    definition = str(op.get("definition", ""))
                    events |= name == "events" or definition == BACKPORT_EVENTS_OPERATION
                    status |= name == "status" or definition == _STATUS_OPERATION
                for ext in resource.get("extension") or []:
                    if isinstance(ext, Mapping) and ext.get("url") == _TOPIC_EXTENSION:
                        value = ext.get("valueCanonical") or ext.get("valueUri")
                        if isinstance(value, str):
                            topics.add(value)
        return cls(events, status, frozenset(topics))


@dataclass(frozen=True)
class CatchUpResult:
    """What a catch-up found. ``events``: from ``$events`` (resolve them with
    :func:`resolve_flow`); ``changes``: from searches. ``through``: record with
    :func:`~subscriptions.tracking.caught_up`. ``good_timestamp``: the newest server time seen."""

    method: str
    events: tuple[NotificationEvent, ...]
    changes: tuple[Change, ...]
    through: int
    good_timestamp: str | None

    @property
    def resources(self) -> tuple[dict[str, Any], ...]:
        return tuple(c.resource for c in self.changes if c.resource is not None)


def events_request(subscription_id: str, missing: EventRange,
                   content: PayloadContent | None = None) -> FHIRRequest:
    """``$events`` for one range of event numbers."""
    params = [("eventsSinceNumber", str(missing.first))]
    if missing.last is not None:
        params.append(("eventsUntilNumber", str(missing.last)))
    if content is not None:
        params.append(("content", content))
    return FHIRRequest("GET", f"Subscription/{subscription_id}/$events", tuple(params),
                       retry_safe=True)


def since_search_request(resource_type: str, since: str | None, *,
                         overlap: timedelta = DEFAULT_OVERLAP,
                         page_size: int = 200) -> FHIRRequest:
    """``GET Type?_lastUpdated=ge{since - overlap}&_sort=_lastUpdated&_count=n``."""
    params = [("_sort", "_lastUpdated"), ("_count", str(page_size))]
    if since is not None:
        start = parse_instant(since) - overlap
        params.insert(0, ("_lastUpdated", f"ge{format_instant(start)}"))
    return FHIRRequest("GET", resource_type, tuple(params))


def _newest(*stamps: str | None) -> str | None:
    known = [s for s in stamps if s]
    return max(known, key=parse_instant) if known else None


def catch_up_flow(
    decision: CatchUp,
    *,
    subscription_id: str,
    resource_types: Sequence[str],
    capabilities: ServerCapabilities,
    content: PayloadContent | None = None,
    overlap: timedelta = DEFAULT_OVERLAP,
    page_size: int = 200,
) -> Flow[CatchUpResult]:
    """Recover what ``decision`` says is missing (see the module docstring)."""
    found: dict[int, NotificationEvent] = {}
    wanted = list(decision.missing)
    need_search = not (capabilities.events_operation and wanted)
    upper = decision.through
    if not need_search:
        for missing in wanted:
            try:
                response = yield events_request(subscription_id, missing, content)
            except FatalFHIRError:
                # 400/404/501...: $events refused here after all; search instead.
                need_search = True
                break
            try:
                answer = parse_notification(response.body if isinstance(response.body, dict)
                                            else {})
            except NotificationError:
                need_search = True
                break
            for event in answer.events:
                if event.number in missing:
                    found.setdefault(event.number, event)
            if missing.last is None:
                upper = max(upper, answer.events_since_start or 0,
                            max(answer.event_numbers, default=0))
        if not need_search:
            for missing in wanted:
                last = missing.last if missing.last is not None else upper
                if any(n not in found for n in range(missing.first, last + 1)):
                    need_search = True  # the server no longer keeps some of them
                    break
    events = tuple(found[n] for n in sorted(found))
    if not need_search:
        good = _newest(decision.since, *(e.timestamp for e in events))
        return CatchUpResult("events", events, (), upper, good)
    changes: list[Change] = []
    for rtype in resource_types:
        bundles = yield from search_pages(since_search_request(
            rtype, decision.since, overlap=overlap, page_size=page_size))
        changes.extend(c for b in bundles for c in changes_in(b, rtype))
    good = _newest(decision.since, *(c.last_updated for c in changes))
    method = "events+search" if events else "search"
    return CatchUpResult(method, events, tuple(changes), upper, good)


@dataclass(frozen=True)
class Resolved:
    """Resources behind a set of events: ``resources`` (read, searched or sent in full),
    ``deleted`` (focus of a DELETE event), ``not_found`` (read found nothing)."""

    resources: tuple[dict[str, Any], ...]
    deleted: tuple[Reference, ...]
    not_found: tuple[Reference, ...]


def resolve_flow(
    events: Iterable[NotificationEvent],
    *,
    topic: str | None = None,
    topic_types: Mapping[str, str] | None = None,
    default_types: Sequence[str] = (),
    chunk_size: int = 50,
    overlap: timedelta = DEFAULT_OVERLAP,
) -> Flow[Resolved]:
    """Turn events into resources (see the module docstring). ``topic_types`` maps topic
    canonicals to resource types (the connection's ``topics``), for identifier-only focus and
    empty payloads; ``default_types`` is used when the topic is unknown."""
    resources: dict[str, dict[str, Any]] = {}
    deleted: list[Reference] = []
    by_type: dict[str, dict[str, Reference]] = {}
    by_identifier: list[tuple[str, Reference]] = []
    empty_since: str | None = None
    types = ([topic_types[topic]] if topic and topic_types and topic in topic_types
             else list(default_types))
    for event in events:
        focus = event.focus
        if event.resource is not None:
            key = f"{event.resource.get('resourceType')}/{event.resource.get('id')}"
            resources[key] = event.resource
        elif focus is not None and event.deleted:
            deleted.append(focus)
        elif focus is not None and focus.resource_type and focus.id:
            by_type.setdefault(focus.resource_type, {})[focus.id] = focus
        elif focus is not None and focus.identifier is not None:
            rtype = focus.resource_type or (types[0] if len(types) == 1 else None)
            if rtype is None:
                raise ValueError(f"event {event.number}: focus by identifier only and no single "
                                 "resource type for its topic; map the topic in topic_types")
            by_identifier.append((rtype, focus))
        elif event.timestamp:
            empty_since = min(filter(None, (empty_since, event.timestamp)), key=parse_instant)
        else:
            empty_since = empty_since or "0001-01-01T00:00:00Z"
    not_found: list[Reference] = []
    for rtype, refs in by_type.items():
        ids = list(refs)
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start:start + chunk_size]
            bundles = yield from search_pages(FHIRRequest.get(
                rtype, {"_id": ",".join(chunk), "_count": str(len(chunk))}))
            got = {c.id: c.resource for b in bundles for c in changes_in(b, rtype)
                   if c.resource is not None}
            for rid in chunk:
                if rid in got:
                    resources[f"{rtype}/{rid}"] = got[rid]
                else:
                    not_found.append(refs[rid])
    for rtype, ref in by_identifier:
        assert ref.identifier is not None
        system, value = ref.identifier
        token = f"{system}|{value}" if system else value
        bundles = yield from search_pages(FHIRRequest.get(rtype, {"identifier": token}))
        hits = [c.resource for b in bundles for c in changes_in(b, rtype) if c.resource]
        if not hits:
            not_found.append(ref)
        for hit in hits:
            resources[f"{rtype}/{hit.get('id')}"] = hit
    if empty_since is not None:
        if not types:
            raise ValueError("empty payloads need the topic's resource type (topic_types) or "
                             "default_types to search")
        for rtype in types:
            bundles = yield from search_pages(since_search_request(rtype, empty_since,
                                                                   overlap=overlap))
            for change in (c for b in bundles for c in changes_in(b, rtype)):
                if change.resource is not None:
                    resources[f"{rtype}/{change.id}"] = change.resource
    return Resolved(tuple(resources.values()), tuple(deleted), tuple(not_found))
