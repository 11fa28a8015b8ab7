"""Catch-up and resolution flows, driven against an in-memory FHIR API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.fhir import FHIRApi, FHIRRequest, ResourceNotFound
from subscriptions import (
    CatchUp,
    EventRange,
    NotificationEvent,
    Reference,
    ServerCapabilities,
    catch_up_flow,
    parse_notification,
    resolve_flow,
    run_flow,
)
from tests.subscriptions.corpus_paths import FIXTURES
from tests.subscriptions.fake_api import FakeApi, appt, searchset

WITH_EVENTS = ServerCapabilities(events_operation=True, status_operation=True)
NO_EVENTS = ServerCapabilities()
BASE = "http://127.0.0.1:8090/fhir/R4"


def events_bundle(numbers: list[int], since_start: int) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{BASE}/Subscription/s1"}},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": "query-event"},
        {"name": "events-since-subscription-start", "valueString": str(since_start)},
    ]
    for n in numbers:
        params.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(n)},
            {"name": "timestamp", "valueInstant": f"2024-03-05T10:00:{n:02d}.000Z"},
            {"name": "focus", "valueReference": {"reference": f"{BASE}/Appointment/a{n}"}}]})
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"resource": {"resourceType": "Parameters", "parameter": params}}]}


def events_server(retained_from: int, count: int) -> FakeApi:
    def handler(request: FHIRRequest, params: dict[str, str]) -> Any:
        if request.path.endswith("$events"):
            first = int(params["eventsSinceNumber"])
            last = int(params.get("eventsUntilNumber", count))
            return events_bundle([n for n in range(max(first, retained_from), last + 1)
                                  if n <= count], count)
        return searchset([appt("a9", "2024-03-05T10:05:00.000Z")])
    return FakeApi(handler)


class TestCatchUp:
    async def test_events_operation_fills_the_missing_ranges(self) -> None:
        """$events per range; no search when every number came back."""
        api = events_server(1, 9)
        decision = CatchUp("gap", (EventRange(2, 3), EventRange(5, 5)),
                           "2024-03-05T10:00:01.000Z", 6)
        result = await run_flow(catch_up_flow(decision, subscription_id="s1",
                                              resource_types=["Appointment"],
                                              capabilities=WITH_EVENTS), api)
        assert result.method == "events"
        assert [e.number for e in result.events] == [2, 3, 5] and result.through == 6
        assert [dict(r.params) for r in api.requests] == [
            {"eventsSinceNumber": "2", "eventsUntilNumber": "3"},
            {"eventsSinceNumber": "5", "eventsUntilNumber": "5"}]
        assert result.good_timestamp == "2024-03-05T10:00:05.000Z"

    async def test_open_range_reads_up_to_the_server_count(self) -> None:
        """Heartbeat overdue: $events from contiguous+1 with no end; the answer's count
        becomes the new 'through'."""
        api = events_server(1, 9)
        decision = CatchUp("heartbeat-overdue", (EventRange(7, None),), None, 6)
        result = await run_flow(catch_up_flow(decision, subscription_id="s1",
                                              resource_types=["Appointment"],
                                              capabilities=WITH_EVENTS), api)
        assert [e.number for e in result.events] == [7, 8, 9] and result.through == 9

    async def test_events_no_longer_retained_fall_back_to_search(self) -> None:
        """The server kept only events from 4: search since the good point minus overlap."""
        api = events_server(4, 9)
        decision = CatchUp("gap", (EventRange(2, 5),), "2024-03-05T10:00:01.000Z", 9)
        result = await run_flow(catch_up_flow(decision, subscription_id="s1",
                                              resource_types=["Appointment"],
                                              capabilities=WITH_EVENTS), api)
        assert result.method == "events+search" and result.through == 9
        search = api.requests[-1]
        assert search.path == "Appointment"
        assert dict(search.params)["_lastUpdated"] == "ge2024-03-05T09:58:01.000Z"
        assert [r["id"] for r in result.resources] == ["a9"]

    async def test_refused_events_operation_falls_back_to_search(self) -> None:
        """A 404 on $events (not supported after all) is not fatal to the catch-up."""
        def handler(request: FHIRRequest, params: dict[str, str]) -> Any:
            if request.path.endswith("$events"):
                raise ResourceNotFound(404, "no such operation")
            return searchset([])
        api = FakeApi(handler)
        decision = CatchUp("gap", (EventRange(2, 2),), None, 2)
        result = await run_flow(catch_up_flow(decision, subscription_id="s1",
                                              resource_types=["Appointment", "CarePlan"],
                                              capabilities=WITH_EVENTS), api)
        assert result.method == "search"
        assert [r.path for r in api.requests[1:]] == ["Appointment", "CarePlan"]
        assert "_lastUpdated" not in dict(api.requests[1].params)

    async def test_without_events_operation_search_pages_everything(self) -> None:
        """No $events: search each type, following next links."""
        page2 = f"{BASE}/Appointment?page=2"

        def handler(request: FHIRRequest, params: dict[str, str]) -> Any:
            if params.get("page") == "2":
                return searchset([appt("b", "2024-03-05T11:00:00.000Z")])
            return searchset([appt("a", "2024-03-05T10:30:00.000Z")], page2)
        result = await run_flow(catch_up_flow(
            CatchUp("status-error", (EventRange(3, None),), "2024-03-05T10:00:00Z", 5),
            subscription_id="s1", resource_types=["Appointment"], capabilities=NO_EVENTS),
            FakeApi(handler))
        assert [r["id"] for r in result.resources] == ["a", "b"]
        assert result.good_timestamp == "2024-03-05T11:00:00.000Z"


class TestResolve:
    async def test_id_only_events_are_read_in_batches(self) -> None:
        """Focus references become `_id` searches of at most chunk_size; absent ones are
        reported, deleted ones are not read."""
        events = [NotificationEvent(n, None, Reference.parse(f"{BASE}/Appointment/a{n}"))
                  for n in range(1, 6)]
        events.append(NotificationEvent(6, None, Reference.parse("Appointment/gone"),
                                        method="DELETE"))

        def handler(request: FHIRRequest, params: dict[str, str]) -> Any:
            return searchset([appt(i, "2024-03-05T10:00:00Z") for i in params["_id"].split(",")
                              if i != "a3"])
        api = FakeApi(handler)
        resolved = await run_flow(resolve_flow(events, chunk_size=2), api)
        assert [dict(r.params)["_id"] for r in api.requests] == ["a1,a2", "a3,a4", "a5"]
        assert sorted(r["id"] for r in resolved.resources) == ["a1", "a2", "a4", "a5"]
        assert [r.key for r in resolved.not_found] == ["Appointment/a3"]
        assert [r.key for r in resolved.deleted] == ["Appointment/gone"]

    async def test_identifier_focus_is_searched_in_the_topic_type(self) -> None:
        """athenahealth: identifier only; the topic maps to Appointment."""
        n = parse_notification((FIXTURES / "athenahealth_id_only_identifier_focus.json")
                               .read_bytes())
        api = FakeApi(lambda request, params: searchset([appt("1", "2023-04-14T09:22:56Z")]))
        resolved = await run_flow(resolve_flow(
            n.events, topic=n.topic, topic_types={n.topic or "": "Appointment"}), api)
        assert api.requests[0].path == "Appointment"
        assert dict(api.requests[0].params) == {
            "identifier": "urn:athenahealth:athenanet:api:appointments:195900|1"}
        assert [r["id"] for r in resolved.resources] == ["1"]

    async def test_identifier_focus_without_a_type_is_refused(self) -> None:
        """No topic mapping and several candidate types: say so instead of guessing."""
        n = parse_notification((FIXTURES / "athenahealth_id_only_identifier_focus.json")
                               .read_bytes())
        with pytest.raises(ValueError, match="topic_types"):
            await run_flow(resolve_flow(n.events, default_types=["Appointment", "CarePlan"]),
                           FakeApi(lambda r, p: searchset([])))

    async def test_empty_payload_searches_from_the_earliest_event(self) -> None:
        """Empty payloads: a _lastUpdated search from the first event's time minus overlap."""
        events = [NotificationEvent(2, "2024-03-05T10:10:00Z", None),
                  NotificationEvent(1, "2024-03-05T10:05:00Z", None)]
        api = FakeApi(lambda r, p: searchset([appt("x", "2024-03-05T10:06:00Z")]))
        resolved = await run_flow(resolve_flow(events, default_types=["Appointment"]), api)
        assert dict(api.requests[0].params)["_lastUpdated"] == "ge2024-03-05T10:03:00.000Z"
        assert [r["id"] for r in resolved.resources] == ["x"]

    async def test_full_resource_needs_no_request(self) -> None:
        """Full-resource events resolve without any call."""
        n = parse_notification((FIXTURES / "r5_full_resource.json").read_bytes())
        api = FakeApi(lambda r, p: pytest.fail("no request expected"))
        resolved = await run_flow(resolve_flow(n.events), api)
        assert [r["id"] for r in resolved.resources] == ["mr-1"] and not api.requests


class TestCapabilities:
    def test_the_stand_in_ehr_style_statement(self) -> None:
        """$events and topics read from Subscription's operations and extensions."""
        caps = ServerCapabilities.from_capability_statement({"rest": [{"resource": [{
            "type": "Subscription",
            "operation": [{"name": "events"}],
            "extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/"
                           "StructureDefinition/capabilitystatement-subscriptiontopic-canonical",
                           "valueCanonical": "http://example.org/topics/appointment-change"}]}]}]})
        assert caps.events_operation and not caps.status_operation
        assert caps.topics == {"http://example.org/topics/appointment-change"}

    def test_nothing_advertised(self) -> None:
        """A plain R4 server: no $events, catch-up searches."""
        assert ServerCapabilities.from_capability_statement(
            json.loads('{"rest": [{"resource": [{"type": "Patient"}]}]}')) == NO_EVENTS

    def test_fake_api_is_an_fhir_api(self) -> None:
        """The fake honours the port the flows are run against."""
        assert isinstance(FakeApi(lambda r, p: None), FHIRApi)
