"""Notification parsing: every corpus sample, the fixtures, the leniencies and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from subscriptions import (
    Notification,
    NotificationError,
    Reference,
    ServerCapabilities,
    parse_notification,
    parse_status_bundle,
    read_subscription,
)
from tests.subscriptions.corpus_paths import FIXTURES, SUBSCRIPTIONS, corpus_files

# What each corpus notification must parse to:
# (shape, type, subscription id, status, events-since-start, [(number, focus key, content)]).
EXPECTED: dict[str, tuple[str, str, str, str, int, list[tuple[int, str | None, str]]]] = {
    "inferno-subscriptions-test-kit/handshake_bundle_example.json":
        ("r4-backport", "handshake", "123", "requested", 0, []),
    "inferno-subscriptions-test-kit/heartbeat_bundle_example.json":
        ("r4-backport", "heartbeat", "123", "active", 2, []),
    "inferno-subscriptions-test-kit/empty_notification_bundle_example.json":
        ("r4-backport", "event-notification", "123", "active", 1, [(1, None, "empty")]),
    "inferno-subscriptions-test-kit/empty_notification_bundle_non_conformant_example.json":
        ("r4-backport", "event-notification", "admission", "active", 1, [(1, None, "empty")]),
    "inferno-subscriptions-test-kit/id_only_notification_bundle_example.json":
        ("r4-backport", "event-notification", "123", "active", 1,
         [(1, "Encounter/86009987-eabe-42bf-8c02-b112b18cb616", "id-only")]),
    "inferno-subscriptions-test-kit/full_resource_notification_bundle_example.json":
        ("r4-backport", "event-notification", "123", "active", 1,
         [(1, "Encounter/86009987-eabe-42bf-8c02-b112b18cb616", "full-resource")]),
    "fhir-candle/tests-data/r4/Bundle-notification-handshake.json":
        ("r4-backport", "handshake", "383c610b-8a8b-4173-b363-7b811509aadd", "active", 0, []),
    "fhir-candle/tests-data/r4/Bundle-notification-id.json":
        ("r4-backport", "event-notification", "383c610b-8a8b-4173-b363-7b811509aadd", "active",
         1, [(1, "Encounter/36e1c9d9-6878-4ef0-b1ff-9f5986e2def6", "id-only")]),
    "fhir-candle/tests-data/r4b/Bundle-notification-handshake.json":
        ("r4b", "handshake", "db4ce0bb-fa9c-4092-9f75-34772dc85590", "active", 0, []),
    "fhir-candle/tests-data/r5/Bundle-notification-handshake.json":
        ("r5", "handshake", "e1f461cb-f41c-470e-aa75-d5223b2c943a", "active", 0, []),
    "athenahealth-aone-fhir-subscriptions/bundle.json":
        ("r4b", "event-notification", "62865e96-3fe4-3f6f-b476-b8eb87b90892", "active", 1,
         [(1, None, "id-only")]),
}
STATUS_RESULTS = {"inferno-subscriptions-test-kit/subscription_status_example.json"}


def _summary(n: Notification) -> tuple[Any, ...]:
    return (n.shape, n.type, n.subscription_id, n.status, n.events_since_start,
            [(e.number, e.focus.key if e.focus else None, e.content) for e in n.events])


def _corpus_params() -> list[Any]:
    files = corpus_files()
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason="shared corpus not found"))]
    return [pytest.param(p, id=str(p.relative_to(SUBSCRIPTIONS))) for p in files]


@pytest.mark.corpus
class TestEveryCorpusSample:
    @pytest.mark.parametrize("path", _corpus_params())
    def test_sample_is_read_for_what_it_is(self, path: Path) -> None:
        """Notifications parse to the expected summary, $status answers to statuses,
        Subscriptions and CapabilityStatements to their readers; topics are refused as
        notifications with a message naming the element."""
        name = str(path.relative_to(SUBSCRIPTIONS))
        data = path.read_bytes()
        kind = json.loads(data.decode("utf-8-sig"))["resourceType"]
        if name in EXPECTED:
            assert _summary(parse_notification(data)) == EXPECTED[name]
        elif name in STATUS_RESULTS:
            (status,) = parse_status_bundle(data)
            assert (status.subscription_id, status.events_since_start) == ("123", 2)
            assert status.events[0].focus is not None
            with pytest.raises(NotificationError, match="parse_status_bundle"):
                parse_notification(data)
        elif kind == "Subscription":
            info = read_subscription(data)
            assert info.status in ("requested", "active", "error")
            assert info.endpoint and info.endpoint.startswith(("http://", "https://"))
            assert info.mode in ("backport", "classic", "r5")
        elif kind == "CapabilityStatement":
            caps = ServerCapabilities.from_capability_statement(json.loads(data))
            assert caps.events_operation and caps.status_operation
            assert "http://fhirserver.org/topics/patient-admission" in caps.topics
        else:
            assert kind in ("Basic", "SubscriptionTopic"), name
            with pytest.raises(NotificationError, match="not a Bundle"):
                parse_notification(data)

    def test_every_notification_in_the_corpus_is_expected(self) -> None:
        """A new corpus notification sample fails here until it is added to EXPECTED."""
        files = corpus_files()
        if not files:
            pytest.skip("shared corpus not found")
        bundles = {str(p.relative_to(SUBSCRIPTIONS)) for p in files
                   if json.loads(p.read_bytes().decode("utf-8-sig"))["resourceType"] == "Bundle"}
        assert bundles == set(EXPECTED) | STATUS_RESULTS


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _mutated(name: str, change: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_fixture(name))
    change(data)
    return data


class TestShapes:
    def test_r4b_two_events_with_update_and_delete(self) -> None:
        """Two events in one notification: the update carries its resource, the delete its
        method; additional context and included resources are kept."""
        n = parse_notification(_fixture("r4b_full_resource_two_events.json"))
        assert n.event_numbers == (3, 4) and n.events_since_start == 4
        update, delete = n.events
        assert update.resource is not None and update.resource["status"] == "cancelled"
        assert update.focus == Reference(
            "https://ehr.example.org/fhir/Appointment/apt-1/_history/2", "Appointment", "apt-1",
            "2")
        assert update.method == "PUT" and not update.deleted
        assert update.additional_context[0].key == "Patient/pat-1"
        assert delete.deleted and delete.resource is None and delete.content == "id-only"
        assert {r["resourceType"] for r in n.resources} == {"Appointment", "Patient"}
        assert n.payload == "full-resource"

    def test_r5_full_resource(self) -> None:
        """R5: Bundle type subscription-notification, focus matched by Type/id."""
        n = parse_notification(_fixture("r5_full_resource.json"))
        assert (n.shape, n.subscription_id, n.event_numbers) == ("r5", "r5-sub", (12,))
        assert n.events[0].resource is not None
        assert n.events[0].resource["id"] == "mr-1"

    def test_error_status_and_reason(self) -> None:
        """A heartbeat in error: status, count and the error text are read."""
        n = parse_notification(_fixture("r4_backport_heartbeat_error.json"))
        assert (n.type, n.status, n.events_since_start) == ("heartbeat", "error", 7)
        assert n.errors == ("event-notification delivery failed after 3 attempt(s): "
                            "endpoint answered HTTP 503",)

    def test_query_event(self) -> None:
        """An $events answer is a notification of type query-event."""
        n = parse_notification(_fixture("r4_backport_query_event_id_only.json"))
        assert n.type == "query-event" and n.event_numbers == (5, 6)
        assert [e.focus.key for e in n.events if e.focus] == ["Appointment/a5", "Appointment/a6"]


class TestLeniency:
    def test_bom_is_skipped(self) -> None:
        """A UTF-8 BOM before the Bundle is fine."""
        n = parse_notification(b"\xef\xbb\xbf" + _fixture("inferno_r4_full_resource.json"))
        assert n.event_numbers == (1,)

    def test_subscription_as_value_string(self) -> None:
        """fhir-candle sends the subscription as valueString."""
        n = parse_notification(_fixture("fhir_candle_r4_id_only_value_string.json"))
        assert n.subscription.key == "Subscription/383c610b-8a8b-4173-b363-7b811509aadd"
        assert n.events[0].additional_context[0].key == "Patient/example"

    def test_focus_by_identifier_only(self) -> None:
        """athenahealth: an identifier and no reference; the empty second entry is ignored."""
        n = parse_notification(_fixture("athenahealth_id_only_identifier_focus.json"))
        focus = n.events[0].focus
        assert focus is not None and focus.key is None
        assert focus.identifier == ("urn:athenahealth:athenanet:api:appointments:195900", "1")
        assert n.topic == "https://api.fhir.athena.io/fhir/r4/SubscriptionTopic/Appointment.create"

    @pytest.mark.parametrize("value", [3, "3", " 3 ", 3.0])
    def test_numbers_as_strings_or_numbers(self, value: Any) -> None:
        """Event numbers may be strings (as the IG has them) or JSON numbers."""
        def change(d: dict[str, Any]) -> None:
            d["entry"][0]["resource"]["parameter"][5]["part"][0] = {
                "name": "event-number", "valueString" if isinstance(value, str)
                else "valueUnsignedInt": value}
        n = parse_notification(_mutated("inferno_r4_full_resource.json", change))
        assert n.event_numbers == (3,)

    def test_focus_as_value_string(self) -> None:
        """A focus sent as a string reference is read as a reference."""
        def change(d: dict[str, Any]) -> None:
            d["entry"][0]["resource"]["parameter"][5]["part"][2] = {
                "name": "focus", "valueString": "Encounter/86009987-eabe-42bf-8c02-b112b18cb616"}
        n = parse_notification(_mutated("inferno_r4_full_resource.json", change))
        assert n.events[0].content == "full-resource"

    def test_r4b_status_in_a_history_bundle_from_an_r4_server(self) -> None:
        """R4 server, R4B SubscriptionStatus: read as the R4B shape."""
        assert parse_notification(
            _fixture("athenahealth_id_only_identifier_focus.json")).shape == "r4b"


class TestRefusals:
    @pytest.mark.parametrize(("body", "message"), [
        (b"not json", "is not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "not an object"),
        (b'{"resourceType": "Parameters"}', "not a Bundle"),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": [{}]}', "Bundle.type"),
        (b'{"resourceType": "Bundle", "type": "history"}', "Bundle.entry"),
        (b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": '
         b'{"resourceType": "Patient"}}]}', "is a Patient"),
    ])
    def test_not_a_notification(self, body: bytes, message: str) -> None:
        """Bodies that are not notifications say why."""
        with pytest.raises(NotificationError, match=message):
            parse_notification(body)

    @pytest.mark.parametrize(("change", "message"), [
        (lambda p: p.__setitem__(0, {"name": "x"}), "names no subscription"),
        (lambda p: p.__setitem__(3, {"name": "type", "valueCode": "ping"}), "'ping'"),
        (lambda p: p.__setitem__(3, {"name": "x"}), "no notification type"),
        (lambda p: p.__setitem__(2, {"name": "status", "valueCode": "on"}), "status 'on'"),
        (lambda p: p[5]["part"].pop(0), "no event-number"),
        (lambda p: p[5]["part"].__setitem__(0, {"name": "event-number", "valueString": "1a"}),
         r"notification-event'\)\[0\]\.event-number"),
        (lambda p: p[5]["part"].__setitem__(0, {"name": "event-number", "valueInteger": -1}),
         "non-negative"),
        (lambda p: p.append(dict(p[0])), "'subscription' appears 2 times"),
        (lambda p: p[4].__setitem__("valueString", "many"),
         "events-since-subscription-start"),
    ])
    def test_broken_backport_status(self, change: Any, message: str) -> None:
        """A broken status Parameters names the element."""
        data = _mutated("inferno_r4_full_resource.json",
                        lambda d: change(d["entry"][0]["resource"]["parameter"]))
        with pytest.raises(NotificationError, match=message):
            parse_notification(data)

    def test_broken_r4b_event_number(self) -> None:
        """R4B: the element path names the notificationEvent."""
        def change(d: dict[str, Any]) -> None:
            d["entry"][0]["resource"]["notificationEvent"][1]["eventNumber"] = True
        with pytest.raises(NotificationError, match=r"notificationEvent\[1\]\.eventNumber"):
            parse_notification(_mutated("r4b_full_resource_two_events.json", change))
