"""``careloop subscriptions ensure``: compare the wanted subscription with what the EHR holds
and say what to do. Pure; the caller searches (:func:`find_request`), plans
(:func:`plan_ensure`) and executes the actions with ``adapters.fhir``. Running it again after
the actions succeeded plans only :class:`Keep`: the plan is idempotent.

Which existing Subscriptions are careloop's for a spec: same ``channel.endpoint`` (the
connection's notification URL) and the same topic (backport) or criteria (classic). Among
those:

* none → :class:`Create`;
* several → the best one (active, then requested, error, off; then the latest ``end``) is kept
  and the others are deleted (:class:`Delete`): each would notify every event again;
* different filters, payload, heartbeat, timeout, max-count or secret header →
  :class:`Update` (``repair``), sent as ``requested`` so the server handshakes again;
* status ``error`` or ``off`` → :class:`CatchUpFirst` until the caller says the subscription
  is caught up (its id in ``caught_up``), then :class:`Update` (``reactivate``, ``requested``
  and a new ``end``): events raised while it was down are fetched before new ones arrive;
* ``end`` passed or within ``renew_before`` → :class:`Update` (``renew``, a new ``end``; an
  active subscription stays ``active`` so the server need not handshake again);
* otherwise → :class:`Keep`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from adapters.fhir import FHIRRequest
from subscriptions.build import (
    SubscriptionInfo,
    SubscriptionSpec,
    build_subscription,
    read_subscription,
    secret_header_line,
)

__all__ = [
    "DEFAULT_RENEW_BEFORE",
    "Action",
    "CatchUpFirst",
    "Create",
    "Delete",
    "Keep",
    "Update",
    "find_request",
    "matches_spec",
    "plan_ensure",
]

DEFAULT_RENEW_BEFORE = timedelta(days=7)
_RANK = {"active": 0, "requested": 1, "error": 2, "off": 3}


@dataclass(frozen=True)
class Create:
    """POST ``resource`` (a new Subscription, status requested)."""

    resource: dict[str, Any]
    reason: str = "missing"


@dataclass(frozen=True)
class Update:
    """PUT ``resource`` (it carries the id) with ``If-Match: if_match`` when known."""

    subscription_id: str
    resource: dict[str, Any]
    if_match: str | None
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Delete:
    """DELETE a duplicate of the Subscription kept."""

    subscription_id: str
    reason: str = "duplicate"


@dataclass(frozen=True)
class Keep:
    """Nothing to do for this Subscription."""

    subscription_id: str
    reason: str = "up to date"


@dataclass(frozen=True)
class CatchUpFirst:
    """The subscription is in ``status``: catch up on its events, then plan again with its id
    in ``caught_up``."""

    subscription_id: str
    status: str


Action = Create | Update | Delete | Keep | CatchUpFirst


def find_request(spec: SubscriptionSpec) -> FHIRRequest:
    """Search the EHR for Subscriptions notifying this endpoint (R4 ``url`` parameter is
    ``channel.endpoint``); :func:`plan_ensure` picks the ones matching the spec."""
    return FHIRRequest.get("Subscription", {"url": spec.endpoint, "_count": "100"})


def _same_url(a: str | None, b: str | None) -> bool:
    return (a or "").rstrip("/") == (b or "").rstrip("/")


def matches_spec(info: SubscriptionInfo, spec: SubscriptionSpec) -> bool:
    """Whether an existing Subscription is the one careloop keeps for ``spec``."""
    if info.status == "entered-in-error" or not _same_url(info.endpoint, spec.endpoint):
        return False
    if spec.mode == "backport":
        return info.mode in ("backport", "r5") and info.topic == spec.topic
    return info.mode == "classic" and (info.criteria or "").rstrip("?") == \
        spec.classic_criteria.rstrip("?")


def _differences(info: SubscriptionInfo, spec: SubscriptionSpec) -> list[str]:
    diffs = []
    if secret_header_line(spec.secret, spec.secret_style) not in info.headers:
        diffs.append("secret header")
    if info.payload != spec.payload:
        diffs.append(f"payload {info.payload} → {spec.payload}")
    if spec.mode == "backport":
        if tuple(info.filters) != tuple(spec.filters):
            diffs.append("filters")
        if info.heartbeat_s != spec.heartbeat_s:
            diffs.append(f"heartbeat {info.heartbeat_s} → {spec.heartbeat_s}")
        if info.timeout_s != spec.timeout_s:
            diffs.append("timeout")
        if info.max_count != spec.max_count:
            diffs.append("max-count")
    return diffs


def _best(infos: list[SubscriptionInfo]) -> SubscriptionInfo:
    def key(i: SubscriptionInfo) -> tuple[int, float, str]:
        lives = i.end.timestamp() if i.end else float("inf")
        return (_RANK.get(i.status or "", 9), -lives, i.id or "")
    return min(infos, key=key)


def plan_ensure(
    spec: SubscriptionSpec,
    existing: Iterable[Mapping[str, Any] | SubscriptionInfo],
    *,
    now: datetime,
    caught_up: Collection[str] = (),
    renew_before: timedelta = DEFAULT_RENEW_BEFORE,
) -> list[Action]:
    """The actions that make the EHR hold exactly one Subscription for ``spec``."""
    infos = [e if isinstance(e, SubscriptionInfo) else read_subscription(e) for e in existing]
    ours = [i for i in infos if i.id and matches_spec(i, spec)]
    if not ours:
        return [Create(build_subscription(spec, now=now))]
    keep = _best(ours)
    assert keep.id is not None
    actions: list[Action] = [Delete(i.id) for i in ours if i is not keep and i.id]
    reasons = _differences(keep, spec)
    status = keep.status or "requested"
    if status in ("error", "off"):
        if keep.id not in caught_up:
            actions.insert(0, CatchUpFirst(keep.id, status))
            return actions
        reasons.insert(0, "reactivate")
    ending = keep.end is not None and keep.end - now <= renew_before
    if ending and "reactivate" not in reasons:
        reasons.append("renew")
    if spec.lifetime is None and keep.end is not None and not reasons:
        reasons.append("renew")  # an end careloop did not ask for
    if not reasons:
        actions.insert(0, Keep(keep.id))
        return actions
    new_status = "active" if reasons == ["renew"] and status == "active" else "requested"
    if spec.mode == "classic":
        new_status = "active" if status == "active" and "reactivate" not in reasons \
            else "requested"
    resource = build_subscription(spec, now=now, status=new_status)
    resource = {"resourceType": "Subscription", "id": keep.id,
                **{k: v for k, v in resource.items() if k != "resourceType"}}
    actions.insert(0, Update(keep.id, resource, keep.version_id, tuple(reasons)))
    return actions
