"""Subscription notifications: a notification Bundle in, a :class:`Notification` out.

Three shapes of the same content are read (http://hl7.org/fhir/uv/subscriptions-backport):

* **R4 backport**: Bundle ``history`` whose first entry is a ``Parameters`` resource
  (profile backport-subscription-status-r4) with parameters ``subscription``, ``topic``,
  ``status``, ``type``, ``events-since-subscription-start``, ``notification-event`` (parts
  ``event-number``, ``timestamp``, ``focus``, ``additional-context``) and ``error``;
* **R4B**: the first entry is a ``SubscriptionStatus`` resource (``eventsSinceSubscriptionStart``,
  ``notificationEvent[]`` with ``eventNumber``, ``timestamp``, ``focus``, ``additionalContext``);
* **R5**: the same ``SubscriptionStatus`` in a Bundle of type ``subscription-notification``.

Notification types: ``handshake``, ``heartbeat``, ``event-notification``, ``query-status``
(``$status``) and ``query-event`` (``$events``). Payloads: ``full-resource`` (the focus
resources are entries of the Bundle), ``id-only`` (a focus reference to read) and ``empty``
(event numbers only: what changed must be searched).

Leniency, each motivated by a sample in ``../shared/corpus/subscriptions/`` (docs/subscriptions.md
lists them): a UTF-8 BOM; numbers as strings or as JSON numbers; ``subscription`` or ``focus``
sent as a string instead of a Reference (fhir-candle ``r4/Bundle-notification-id.json``);
focus given only by identifier (athenahealth ``bundle.json``); entries with neither resource
nor fullUrl (athenahealth); an R4 server sending the R4B ``SubscriptionStatus`` (athenahealth);
a status entry without ``request``/``response`` (inferno ``…_non_conformant_example.json``);
either Bundle type for either shape. Anything else that is missing or malformed is a
:class:`NotificationError` naming the element.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from subscriptions._json import Reference, load_json_object

__all__ = [
    "NOTIFICATION_TYPES",
    "Notification",
    "NotificationError",
    "NotificationEvent",
    "NotificationType",
    "PayloadContent",
    "parse_notification",
    "parse_status_bundle",
]

NotificationType = Literal["handshake", "heartbeat", "event-notification", "query-status",
                           "query-event"]
PayloadContent = Literal["empty", "id-only", "full-resource"]
Shape = Literal["r4-backport", "r4b", "r5"]
NOTIFICATION_TYPES: frozenset[str] = frozenset(get_args(NotificationType))
_STATUSES = frozenset({"requested", "active", "error", "off", "entered-in-error"})
_BUNDLE_TYPES = frozenset({"history", "subscription-notification"})
_DIGITS = re.compile(r"^\s*\+?\d{1,18}\s*$")


class NotificationError(ValueError):
    """A notification that cannot be read; ``element`` names where (FHIRPath-like)."""

    def __init__(self, message: str, element: str = "") -> None:
        super().__init__(f"{element}: {message}" if element else message)
        self.element = element


@dataclass(frozen=True)
class NotificationEvent:
    """One event: its number, when it happened, what it is about, and what came with it.

    ``resource`` is the focus resource when the payload carried it (full-resource); ``method``
    is the focus entry's ``request.method`` (``POST`` create, ``PUT`` update, ``DELETE``)."""

    number: int
    timestamp: str | None
    focus: Reference | None
    additional_context: tuple[Reference, ...] = ()
    resource: dict[str, Any] | None = None
    method: str | None = None

    @property
    def deleted(self) -> bool:
        return self.method == "DELETE"

    @property
    def content(self) -> PayloadContent:
        """What this event carries: the resource, a reference to read, or nothing."""
        if self.resource is not None:
            return "full-resource"
        return "id-only" if self.focus is not None else "empty"


@dataclass(frozen=True)
class Notification:
    """A parsed notification (or one ``$status`` entry): normalized over R4/R4B/R5."""

    shape: Shape
    type: NotificationType
    subscription: Reference
    status: str | None
    topic: str | None
    events_since_start: int | None
    events: tuple[NotificationEvent, ...]
    errors: tuple[str, ...] = ()
    bundle_id: str | None = None
    timestamp: str | None = None
    resources: tuple[dict[str, Any], ...] = ()

    @property
    def subscription_id(self) -> str | None:
        """The Subscription's logical id (last path segment of its reference)."""
        if self.subscription.id:
            return self.subscription.id
        text = (self.subscription.reference or "").rstrip("/")
        return text.rsplit("/", 1)[-1] or None if text else None

    @property
    def event_numbers(self) -> tuple[int, ...]:
        return tuple(e.number for e in self.events)

    @property
    def payload(self) -> PayloadContent | None:
        """The payload content the events show (None without events)."""
        if not self.events:
            return None
        kinds = {e.content for e in self.events}
        order: tuple[PayloadContent, ...] = ("full-resource", "id-only", "empty")
        return next(k for k in order if k in kinds)


# -- values -----------------------------------------------------------------------------------
def _number(value: Any, element: str) -> int:
    """A non-negative event count: the backport IG sends ``valueString`` ("1"), R4B/R5 a
    string-typed integer64; some servers send JSON numbers. Anything else is refused."""
    if isinstance(value, bool):
        raise NotificationError(f"expected a number, got {value!r}", element)
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and _DIGITS.match(value):
        return int(value)
    raise NotificationError(f"expected a non-negative whole number, got {value!r}", element)


_NUMBER_KEYS = ("valueString", "valueInteger64", "valueUnsignedInt", "valueInteger",
                "valuePositiveInt", "valueDecimal")
_TEXT_KEYS = ("valueCanonical", "valueUri", "valueUrl", "valueString", "valueCode")
_REF_KEYS = ("valueReference", "valueString", "valueUri", "valueCanonical")


def _value(param: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in param:
            return param[key]
    return None


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _concept_text(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return _text(value)
    if _text(value.get("text")):
        return _text(value.get("text"))
    for coding in value.get("coding") or []:
        if isinstance(coding, Mapping):
            text = _text(coding.get("display")) or _text(coding.get("code"))
            if text:
                return text
    return None


# -- R4 backport Parameters ---------------------------------------------------------------------
def _single(params: list[Mapping[str, Any]], name: str, element: str) -> Mapping[str, Any] | None:
    found = [p for p in params if p.get("name") == name]
    if len(found) > 1:
        raise NotificationError(f"parameter {name!r} appears {len(found)} times", element)
    return found[0] if found else None


def _from_parameters(resource: Mapping[str, Any], base: str) -> dict[str, Any]:
    raw = resource.get("parameter")
    if not isinstance(raw, list):
        raise NotificationError("has no parameter list", f"{base}.parameter")
    params = [p for p in raw if isinstance(p, Mapping)]
    where = f"{base}.parameter"
    out: dict[str, Any] = {}
    sub = _single(params, "subscription", where)
    out["subscription"] = Reference.from_json(_value(sub, _REF_KEYS)) if sub else None
    topic = _single(params, "topic", where)
    out["topic"] = _text(_value(topic, _TEXT_KEYS)) if topic else None
    status = _single(params, "status", where)
    out["status"] = _text(_value(status, ("valueCode", "valueString"))) if status else None
    kind = _single(params, "type", where)
    out["type"] = _text(_value(kind, ("valueCode", "valueString"))) if kind else None
    since = _single(params, "events-since-subscription-start", where)
    out["since"] = (_number(_value(since, _NUMBER_KEYS),
                            f"{where}('events-since-subscription-start')")
                    if since and _value(since, _NUMBER_KEYS) is not None else None)
    events = []
    for i, p in enumerate(q for q in params if q.get("name") == "notification-event"):
        el = f"{where}('notification-event')[{i}]"
        parts = [q for q in p.get("part") or [] if isinstance(q, Mapping)]
        number = _single(parts, "event-number", el)
        if number is None or _value(number, _NUMBER_KEYS) is None:
            raise NotificationError("has no event-number", el)
        ts = _single(parts, "timestamp", el)
        focus = _single(parts, "focus", el)
        events.append({
            "number": _number(_value(number, _NUMBER_KEYS), f"{el}.event-number"),
            "timestamp": _text(_value(ts, ("valueInstant", "valueDateTime", "valueString")))
            if ts else None,
            "focus": Reference.from_json(_value(focus, _REF_KEYS)) if focus else None,
            "context": [r for q in parts if q.get("name") == "additional-context"
                        if (r := Reference.from_json(_value(q, _REF_KEYS))) is not None],
        })
    out["events"] = events
    out["errors"] = [t for p in params if p.get("name") == "error"
                     if (t := _concept_text(_value(p, ("valueCodeableConcept", "valueCoding",
                                                        "valueString")))) is not None]
    return out


# -- R4B / R5 SubscriptionStatus ----------------------------------------------------------------
def _from_status_resource(resource: Mapping[str, Any], base: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "subscription": Reference.from_json(resource.get("subscription")),
        "topic": _text(resource.get("topic")),
        "status": _text(resource.get("status")),
        "type": _text(resource.get("type")),
        "since": None,
    }
    if resource.get("eventsSinceSubscriptionStart") is not None:
        out["since"] = _number(resource["eventsSinceSubscriptionStart"],
                               f"{base}.eventsSinceSubscriptionStart")
    events = []
    for i, e in enumerate(resource.get("notificationEvent") or []):
        el = f"{base}.notificationEvent[{i}]"
        if not isinstance(e, Mapping):
            raise NotificationError("is not an object", el)
        if e.get("eventNumber") is None:
            raise NotificationError("has no eventNumber", el)
        events.append({
            "number": _number(e["eventNumber"], f"{el}.eventNumber"),
            "timestamp": _text(e.get("timestamp")),
            "focus": Reference.from_json(e.get("focus")),
            "context": [r for c in e.get("additionalContext") or []
                        if (r := Reference.from_json(c)) is not None],
        })
    out["events"] = events
    out["errors"] = [t for c in resource.get("error") or []
                     if (t := _concept_text(c)) is not None]
    return out


def _status_fields(resource: Any, element: str, bundle_type: str | None) -> tuple[Shape,
                                                                                dict[str, Any]]:
    if not isinstance(resource, Mapping):
        raise NotificationError("has no resource: the first entry must be the subscription "
                                "status", element)
    rtype = resource.get("resourceType")
    if rtype == "Parameters":
        return "r4-backport", _from_parameters(resource, f"{element}(Parameters)")
    if rtype == "SubscriptionStatus":
        shape: Shape = "r5" if bundle_type == "subscription-notification" else "r4b"
        return shape, _from_status_resource(resource, f"{element}(SubscriptionStatus)")
    raise NotificationError(f"is a {rtype}; expected the subscription status (Parameters in "
                            "R4, SubscriptionStatus in R4B/R5)", element)


def _validate(fields: dict[str, Any], element: str) -> None:
    if fields["subscription"] is None:
        raise NotificationError("names no subscription", element)
    kind = fields["type"]
    if kind is None:
        raise NotificationError("has no notification type", element)
    if kind not in NOTIFICATION_TYPES:
        raise NotificationError(f"type {kind!r} is not one of {sorted(NOTIFICATION_TYPES)}",
                                element)
    status = fields["status"]
    if status is not None and status not in _STATUSES:
        raise NotificationError(f"status {status!r} is not one of {sorted(_STATUSES)}", element)


def _entry_keys(entry: Mapping[str, Any]) -> list[str]:
    keys = []
    full = entry.get("fullUrl")
    if isinstance(full, str) and full:
        keys.append(full)
        ref = Reference.parse(full)
        if ref.key:
            keys.append(ref.key)
    resource = entry.get("resource")
    if isinstance(resource, Mapping) and resource.get("resourceType") and resource.get("id"):
        keys.append(f"{resource['resourceType']}/{resource['id']}")
    request = entry.get("request")
    if isinstance(request, Mapping) and isinstance(request.get("url"), str):
        ref = Reference.parse(request["url"])
        if ref.key:
            keys.append(ref.key)
    return keys


def _build(shape: Shape, fields: dict[str, Any], entries: list[Mapping[str, Any]],
           bundle: Mapping[str, Any]) -> Notification:
    index: dict[str, Mapping[str, Any]] = {}
    for item in entries:
        for key in _entry_keys(item):
            index.setdefault(key, item)
    events = []
    for e in fields["events"]:
        focus: Reference | None = e["focus"]
        entry: Mapping[str, Any] | None = None
        if focus is not None:
            entry = index.get(focus.reference or "") or index.get(focus.key or "")
        resource = entry.get("resource") if entry else None
        request = entry.get("request") if entry else None
        method = request.get("method") if isinstance(request, Mapping) else None
        events.append(NotificationEvent(
            number=e["number"], timestamp=e["timestamp"], focus=focus,
            additional_context=tuple(e["context"]),
            resource=dict(resource) if isinstance(resource, Mapping) else None,
            method=str(method).upper() if isinstance(method, str) else None,
        ))
    resources = tuple(dict(r) for entry in entries
                      if isinstance(r := entry.get("resource"), Mapping))
    return Notification(
        shape=shape, type=cast(NotificationType, fields["type"]),
        subscription=fields["subscription"], status=fields["status"], topic=fields["topic"],
        events_since_start=fields["since"], events=tuple(events),
        errors=tuple(fields["errors"]),
        bundle_id=_text(bundle.get("id")), timestamp=_text(bundle.get("timestamp")),
        resources=resources,
    )


def _entries(bundle: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = bundle.get("entry")
    if not isinstance(raw, list) or not raw:
        raise NotificationError("has no entries: the first entry must be the subscription "
                                "status", "Bundle.entry")
    return [e for e in raw if isinstance(e, Mapping)]


def _bundle(body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    bundle = load_json_object(body, "the notification", NotificationError)
    if bundle.get("resourceType") != "Bundle":
        raise NotificationError(f"is a {bundle.get('resourceType')!r}, not a Bundle",
                                "resourceType")
    return bundle


def parse_notification(body: bytes | str | Mapping[str, Any]) -> Notification:
    """Read a notification Bundle (rest-hook body, or a ``$events`` answer)."""
    bundle = _bundle(body)
    btype = bundle.get("type")
    if btype not in _BUNDLE_TYPES:
        hint = " (a $status answer: use parse_status_bundle)" if btype == "searchset" else ""
        raise NotificationError(f"Bundle.type is {btype!r}; a notification is 'history' (R4, "
                                f"R4B) or 'subscription-notification' (R5){hint}", "Bundle.type")
    entries = _entries(bundle)
    first = entries[0]
    shape, fields = _status_fields(first.get("resource"), "Bundle.entry[0].resource", btype)
    _validate(fields, "Bundle.entry[0].resource")
    return _build(shape, fields, entries[1:], bundle)


def parse_status_bundle(body: bytes | str | Mapping[str, Any]) -> tuple[Notification, ...]:
    """Read a ``$status`` answer: a searchset with one subscription status per entry (other
    entries, such as an OperationOutcome, are skipped). The ``type`` is kept as the server
    sent it (inferno's sample says ``event-notification`` where the IG has ``query-status``)."""
    bundle = _bundle(body)
    out = []
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping) or resource.get("resourceType") not in (
                "Parameters", "SubscriptionStatus"):
            continue
        element = f"Bundle.entry[{i}].resource"
        shape, fields = _status_fields(resource, element, bundle.get("type"))
        _validate(fields, element)
        out.append(_build(shape, fields, [], bundle))
    return tuple(out)

