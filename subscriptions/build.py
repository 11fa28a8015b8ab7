"""Subscription resources careloop asks EHRs for, and reading the ones they hold.

Two kinds, per connection ``mode``:

* **backport** (R4 topic-based, http://hl7.org/fhir/uv/subscriptions-backport, profile
  backport-subscription): ``criteria`` is the topic canonical; filters go in
  ``_criteria.extension`` (backport-filter-criteria, e.g. ``Appointment?patient=Patient/1``);
  ``channel.type`` rest-hook; ``channel.payload`` ``application/fhir+json`` with the content
  (empty | id-only | full-resource) in ``channel._payload`` (backport-payload-content);
  heartbeat, timeout and max-count as channel extensions; ``end`` for renewal.
* **classic** (R4 criteria-based): ``criteria`` is a search (``Appointment?status=booked``);
  ``channel.payload`` ``application/fhir+json`` makes the server PUT the resource (full-resource),
  no payload makes it POST an empty body (empty). R4 classic has no id-only content, no
  heartbeat and no event numbers, so a classic subscription relies on catch-up searches.

The channel secret. Each connection has its own secret, sent back by the EHR on every
notification as ``Authorization: Bearer <secret>`` (``channel.header``). Chosen over a custom
``X-Careloop-Secret`` header because it is what the IG's examples, the Inferno test kit and the
stand-in EHR show, what vendor consoles that restrict custom headers still allow, and what
proxies and HTTP servers already keep out of their logs. :func:`secret_matches` accepts either
header (compared in constant time), so a connection can be moved from one to the other.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from subscriptions._json import format_instant, load_json_object, parse_instant
from subscriptions.notifications import PayloadContent

__all__ = [
    "BACKPORT_PROFILE",
    "EXT",
    "SECRET_HEADER",
    "SubscriptionInfo",
    "SubscriptionSpec",
    "SubscriptionSpecError",
    "build_subscription",
    "notification_secret",
    "read_subscription",
    "secret_header_line",
    "secret_matches",
]

_BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
BACKPORT_PROFILE = f"{_BACKPORT}/backport-subscription"
EXT = {
    "filter": f"{_BACKPORT}/backport-filter-criteria",
    "heartbeat": f"{_BACKPORT}/backport-heartbeat-period",
    "timeout": f"{_BACKPORT}/backport-timeout",
    "max_count": f"{_BACKPORT}/backport-max-count",
    "content": f"{_BACKPORT}/backport-payload-content",
}
FHIR_JSON = "application/fhir+json"
SECRET_HEADER = "X-Careloop-Secret"  # noqa: S105 (a header name, not a secret)
Mode = Literal["backport", "classic"]
SecretStyle = Literal["authorization", "x-careloop-secret"]
_SECRET = re.compile(r"^[\x21-\x7e]{16,512}$")
_PAYLOADS = ("empty", "id-only", "full-resource")


class SubscriptionSpecError(ValueError):
    """A desired subscription that cannot be built; the message names the setting."""


@dataclass(frozen=True)
class SubscriptionSpec:
    """The subscription careloop wants for one connection and resource type.

    ``endpoint``: careloop's notification URL for the connection
    (``{base_url}/fhir/notify/{connection}``). ``lifetime``: how far ahead ``end`` is set
    (None: no end). ``filters``: backport filter criteria; ``criteria``: the classic search
    (default: every resource of the type)."""

    resource_type: str
    endpoint: str
    secret: str
    mode: Mode = "backport"
    topic: str | None = None
    filters: tuple[str, ...] = ()
    criteria: str | None = None
    payload: PayloadContent = "id-only"
    heartbeat_s: int | None = 60
    timeout_s: int | None = None
    max_count: int | None = None
    lifetime: timedelta | None = timedelta(days=30)
    reason: str = ""
    secret_style: SecretStyle = "authorization"  # noqa: S105 (which header carries it)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z][A-Za-z]+", self.resource_type):
            raise SubscriptionSpecError(f"resource type {self.resource_type!r} is not a FHIR "
                                        "resource type")
        if not self.endpoint.startswith(("https://", "http://")):
            raise SubscriptionSpecError(f"endpoint {self.endpoint!r} must be an http(s) URL "
                                        "(set CARELOOP_BASE_URL)")
        if not _SECRET.match(self.secret):
            raise SubscriptionSpecError("the channel secret must be 16 to 512 printable ASCII "
                                        "characters without spaces")
        if self.payload not in _PAYLOADS:
            raise SubscriptionSpecError(f"payload {self.payload!r} is not one of {_PAYLOADS}")
        if self.mode == "backport":
            if not self.topic:
                raise SubscriptionSpecError(f"mode backport needs a topic for "
                                            f"{self.resource_type} (topics.{self.resource_type})")
            for f in self.filters:
                if not f.startswith(f"{self.resource_type}?"):
                    raise SubscriptionSpecError(
                        f"filter {f!r} must be a search on {self.resource_type} "
                        f"('{self.resource_type}?...')")
        elif self.mode == "classic":
            if self.payload == "id-only":
                raise SubscriptionSpecError("R4 classic subscriptions carry no id-only payload; "
                                            "use payload 'empty' or 'full-resource'")
            if self.criteria and not self.criteria.startswith(f"{self.resource_type}?"):
                raise SubscriptionSpecError(f"criteria {self.criteria!r} must be a search on "
                                            f"{self.resource_type}")
        else:
            raise SubscriptionSpecError(f"mode {self.mode!r} is not backport or classic")
        for name in ("heartbeat_s", "timeout_s", "max_count"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SubscriptionSpecError(f"{name} must be positive")

    @property
    def classic_criteria(self) -> str:
        return self.criteria or f"{self.resource_type}?"

    @property
    def match_criteria(self) -> str:
        """``Subscription.criteria`` as sent: the topic (backport) or the search (classic)."""
        return (self.topic or "") if self.mode == "backport" else self.classic_criteria


def secret_header_line(secret: str, style: SecretStyle = "authorization") -> str:
    """The ``channel.header`` entry carrying the secret."""
    if style == "authorization":
        return f"Authorization: Bearer {secret}"
    return f"{SECRET_HEADER}: {secret}"


def build_subscription(spec: SubscriptionSpec, *, now: datetime,
                       status: str = "requested") -> dict[str, Any]:
    """The Subscription resource for ``spec`` (no id: add one to update)."""
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": spec.endpoint,
        "header": [secret_header_line(spec.secret, spec.secret_style)],
    }
    resource: dict[str, Any] = {"resourceType": "Subscription", "status": status}
    if spec.lifetime is not None:
        resource["end"] = format_instant(now + spec.lifetime)
    resource["reason"] = spec.reason or f"careloop follows {spec.resource_type} changes"
    if spec.mode == "backport":
        resource["meta"] = {"profile": [BACKPORT_PROFILE]}
        resource["criteria"] = spec.topic
        if spec.filters:
            resource["_criteria"] = {"extension": [
                {"url": EXT["filter"], "valueString": f} for f in spec.filters]}
        extensions = []
        if spec.heartbeat_s:
            extensions.append({"url": EXT["heartbeat"], "valueUnsignedInt": spec.heartbeat_s})
        if spec.timeout_s:
            extensions.append({"url": EXT["timeout"], "valueUnsignedInt": spec.timeout_s})
        if spec.max_count:
            extensions.append({"url": EXT["max_count"], "valuePositiveInt": spec.max_count})
        if extensions:
            channel["extension"] = extensions
        channel["payload"] = FHIR_JSON
        channel["_payload"] = {"extension": [{"url": EXT["content"],
                                              "valueCode": spec.payload}]}
    else:
        resource["criteria"] = spec.classic_criteria
        if spec.payload == "full-resource":
            channel["payload"] = FHIR_JSON
    # Key order as in the IG examples (meta, status, end, reason, criteria, channel).
    order = ["resourceType", "meta", "status", "end", "reason", "criteria", "_criteria"]
    out = {k: resource[k] for k in order if k in resource}
    out["channel"] = channel
    return out


@dataclass(frozen=True)
class SubscriptionInfo:
    """A Subscription as found on a server, normalized over R4 backport, R4 classic and R5."""

    id: str | None
    status: str | None
    mode: Literal["backport", "classic", "r5"]
    criteria: str | None
    topic: str | None
    filters: tuple[str, ...]
    endpoint: str | None
    headers: tuple[str, ...]
    payload: PayloadContent | None
    mime: str | None
    heartbeat_s: int | None
    timeout_s: int | None
    max_count: int | None
    end: datetime | None
    error: str | None
    version_id: str | None
    resource: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)


def _ext(extensions: Any, url: str) -> list[Mapping[str, Any]]:
    return [e for e in extensions or [] if isinstance(e, Mapping) and e.get("url") == url]


def _int_value(extensions: Any, url: str) -> int | None:
    # fhir-candle writes the heartbeat as valueInteger where the IG has valueUnsignedInt.
    for e in _ext(extensions, url):
        for key in ("valueUnsignedInt", "valuePositiveInt", "valueInteger"):
            if isinstance(e.get(key), int) and not isinstance(e.get(key), bool):
                return int(e[key])
    return None


def read_subscription(body: bytes | str | Mapping[str, Any]) -> SubscriptionInfo:
    """Normalize a Subscription (bytes with a BOM, text or parsed JSON)."""
    res = load_json_object(body, "the Subscription", SubscriptionSpecError)
    if res.get("resourceType") != "Subscription":
        raise SubscriptionSpecError(f"expected a Subscription, got {res.get('resourceType')!r}")
    meta = res.get("meta") or {}
    end = None
    if isinstance(res.get("end"), str):
        try:
            end = parse_instant(res["end"])
        except ValueError:
            raise SubscriptionSpecError(f"Subscription.end {res['end']!r} is not a date-time") \
                from None
    common: dict[str, Any] = {"id": res.get("id"), "status": res.get("status"), "end": end,
              "error": res.get("error") if isinstance(res.get("error"), str) else None,
              "version_id": meta.get("versionId"), "resource": res}
    if "topic" in res and "channel" not in res:  # R5
        filters = tuple(f"{f.get('resourceType', '')}?{f.get('filterParameter')}={f.get('value')}"
                        for f in res.get("filterBy") or [] if isinstance(f, Mapping))
        headers = tuple(f"{p.get('name')}: {p.get('value')}" for p in res.get("parameter") or []
                        if isinstance(p, Mapping))
        content = res.get("content")
        return SubscriptionInfo(
            mode="r5", criteria=None, topic=res.get("topic"), filters=filters,
            endpoint=res.get("endpoint"), headers=headers,
            payload=content if content in _PAYLOADS else None, mime=res.get("contentType"),
            heartbeat_s=res.get("heartbeatPeriod"), timeout_s=res.get("timeout"),
            max_count=res.get("maxCount"), **common)
    channel = res.get("channel") or {}
    criteria = res.get("criteria")
    content_ext = _ext((channel.get("_payload") or {}).get("extension"), EXT["content"])
    is_topic = isinstance(criteria, str) and (
        bool(content_ext) or bool(re.match(r"^[a-z][a-z0-9+.-]*:", criteria)))
    if is_topic:
        content = content_ext[0].get("valueCode") if content_ext else None
        return SubscriptionInfo(
            mode="backport", criteria=criteria, topic=criteria,
            filters=tuple(str(e.get("valueString")) for e in _ext(
                (res.get("_criteria") or {}).get("extension"), EXT["filter"])),
            endpoint=channel.get("endpoint"), headers=tuple(channel.get("header") or []),
            payload=content if content in _PAYLOADS else None, mime=channel.get("payload"),
            heartbeat_s=_int_value(channel.get("extension"), EXT["heartbeat"]),
            timeout_s=_int_value(channel.get("extension"), EXT["timeout"]),
            max_count=_int_value(channel.get("extension"), EXT["max_count"]), **common)
    mime = channel.get("payload")
    return SubscriptionInfo(
        mode="classic", criteria=criteria, topic=None, filters=(),
        endpoint=channel.get("endpoint"), headers=tuple(channel.get("header") or []),
        payload="full-resource" if mime else "empty", mime=mime, heartbeat_s=None,
        timeout_s=None, max_count=None, **common)


def notification_secret(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """The secret a notification carries: ``Authorization: Bearer`` first, else
    ``X-Careloop-Secret``; None when neither is there."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    found: dict[str, str] = {}
    for name, value in pairs:
        found.setdefault(name.lower(), value)
    auth = found.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    custom = found.get(SECRET_HEADER.lower(), "").strip()
    return custom or None


def secret_matches(headers: Mapping[str, str] | Iterable[tuple[str, str]],
                   expected: str) -> bool:
    """Whether the notification carries ``expected`` (constant-time comparison)."""
    given = notification_secret(headers)
    if given is None or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())
