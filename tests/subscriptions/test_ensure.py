"""`careloop subscriptions ensure` planning: create, keep, repair, renew, reactivate after
catch-up, remove duplicates; idempotent."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from subscriptions import (
    Action,
    CatchUpFirst,
    Create,
    Delete,
    Keep,
    SubscriptionSpec,
    Update,
    build_subscription,
    find_request,
    plan_ensure,
)

NOW = datetime(2024, 3, 5, 9, 0, tzinfo=UTC)
ENDPOINT = "https://careloop.example.org/fhir/notify/main-ehr"
SPEC = SubscriptionSpec("Appointment", ENDPOINT, "s3cr3t-0123456789abcdef",
                        topic="http://example.org/topics/appointment-change")
_ids = itertools.count(1)


def stored(spec: SubscriptionSpec = SPEC, *, status: str = "active", when: datetime = NOW,
           **channel_changes: Any) -> dict[str, Any]:
    resource = build_subscription(spec, now=when, status=status)
    resource["id"] = f"sub-{next(_ids)}"
    resource["meta"] = {**resource.get("meta", {}), "versionId": "1"}
    resource["channel"].update(channel_changes)
    return resource


def apply(server: dict[str, dict[str, Any]], actions: list[Action]) -> None:
    """A tiny EHR: what executing the actions does to the stored Subscriptions."""
    for action in actions:
        if isinstance(action, Create):
            server[f"new-{len(server)}"] = {**action.resource, "id": f"new-{len(server)}"}
        elif isinstance(action, Update):
            status = action.resource["status"]
            server[action.subscription_id] = {**action.resource,
                                              "status": "active" if status == "requested"
                                              else status}
        elif isinstance(action, Delete):
            del server[action.subscription_id]


class TestPlan:
    def test_nothing_there_creates(self) -> None:
        """No Subscription for the endpoint and topic: create one."""
        (action,) = plan_ensure(SPEC, [], now=NOW)
        assert isinstance(action, Create) and action.resource["status"] == "requested"

    def test_someone_elses_subscription_is_left_alone(self) -> None:
        """Another endpoint or another topic is not ours."""
        other_endpoint = stored(endpoint="https://elsewhere.example/hook")
        other_topic = stored(SubscriptionSpec("CarePlan", ENDPOINT, "s3cr3t-0123456789abcdef",
                                              topic="http://example.org/topics/careplan"))
        actions = plan_ensure(SPEC, [other_endpoint, other_topic], now=NOW)
        assert [type(a) for a in actions] == [Create]

    def test_up_to_date_is_kept(self) -> None:
        """Active, same settings, end far away: keep."""
        existing = stored()
        assert plan_ensure(SPEC, [existing], now=NOW) == [Keep(existing["id"])]

    def test_changed_settings_are_repaired(self) -> None:
        """A different secret or payload: update (requested, so the server handshakes)."""
        existing = stored(header=["Authorization: Bearer old-secret-0000000000"])
        (action,) = plan_ensure(SPEC, [existing], now=NOW)
        assert isinstance(action, Update) and action.reasons == ("secret header",)
        assert action.resource["id"] == existing["id"] and action.if_match == "1"
        assert action.resource["status"] == "requested"

    def test_renewed_before_end(self) -> None:
        """Ending within the renewal window: a new end; an active one stays active."""
        existing = stored(when=NOW - timedelta(days=25))
        (action,) = plan_ensure(SPEC, [existing], now=NOW)
        assert isinstance(action, Update) and action.reasons == ("renew",)
        assert action.resource["status"] == "active"
        assert action.resource["end"] == "2024-04-04T09:00:00.000Z"

    def test_error_needs_catch_up_before_reactivation(self) -> None:
        """In error: catch up first; once caught up, reactivate as requested."""
        existing = stored(status="error")
        assert plan_ensure(SPEC, [existing], now=NOW) == [CatchUpFirst(existing["id"], "error")]
        (action,) = plan_ensure(SPEC, [existing], now=NOW, caught_up={existing["id"]})
        assert isinstance(action, Update) and action.reasons == ("reactivate",)
        assert action.resource["status"] == "requested"

    def test_off_after_end_is_reactivated_with_a_new_end(self) -> None:
        """Ended (off): after catch-up, reactivated with a fresh end."""
        existing = stored(status="off", when=NOW - timedelta(days=40))
        (action,) = plan_ensure(SPEC, [existing], now=NOW, caught_up=[existing["id"]])
        assert isinstance(action, Update) and action.resource["end"] > existing["end"]

    def test_duplicates_are_removed_keeping_the_best(self) -> None:
        """Two of ours: keep the active one, delete the other."""
        active, requested = stored(), stored(status="requested")
        actions = plan_ensure(SPEC, [requested, active], now=NOW)
        assert actions == [Keep(active["id"]), Delete(requested["id"])]

    def test_classic_mode(self) -> None:
        """Classic: matched on criteria; kept when equal."""
        classic = SubscriptionSpec("Appointment", ENDPOINT, "s3cr3t-0123456789abcdef",
                                   mode="classic", payload="full-resource")
        existing = stored(classic)
        assert plan_ensure(classic, [existing], now=NOW) == [Keep(existing["id"])]
        assert isinstance(plan_ensure(classic, [stored()], now=NOW)[0], Create)

    def test_find_request_searches_by_endpoint(self) -> None:
        """R4's `url` search parameter is channel.endpoint."""
        assert dict(find_request(SPEC).params)["url"] == ENDPOINT


class TestIdempotent:
    def test_applying_the_plan_then_planning_again_keeps_everything(self) -> None:
        """From any starting point, one round of actions leads to a plan of Keep only."""
        starts: list[list[dict[str, Any]]] = [
            [], [stored()], [stored(status="error")], [stored(when=NOW - timedelta(days=29))],
            [stored(), stored(status="requested"), stored(status="off")],
            [stored(header=["Authorization: Bearer other-0000000000000"])],
        ]
        for start in starts:
            server = {r["id"]: r for r in start}
            caught = set(server)
            apply(server, plan_ensure(SPEC, list(server.values()), now=NOW, caught_up=caught))
            again = plan_ensure(SPEC, list(server.values()), now=NOW, caught_up=caught)
            assert [type(a) for a in again] == [Keep], start
