"""Building Subscriptions (backport and classic), reading existing ones, the channel secret."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B.subscription import Subscription

from subscriptions import (
    SubscriptionSpec,
    SubscriptionSpecError,
    build_subscription,
    notification_secret,
    read_subscription,
    secret_matches,
)
from tests.subscriptions.corpus_paths import FIXTURES, SUBSCRIPTIONS

NOW = datetime(2024, 3, 5, 9, 0, tzinfo=UTC)
SECRET = "s3cr3t-0123456789abcdef"
ENDPOINT = "https://careloop.example.org/fhir/notify/main-ehr"
TOPIC = "http://example.org/topics/appointment-change"


def spec(**changes: Any) -> SubscriptionSpec:
    values: dict[str, Any] = {"resource_type": "Appointment", "endpoint": ENDPOINT,
                              "secret": SECRET, "topic": TOPIC}
    values.update(changes)
    return SubscriptionSpec(**values)


class TestBackport:
    def test_matches_the_ig_shape(self) -> None:
        """Profile, topic criteria, filter, heartbeat/timeout/max-count, payload content,
        header and end, as in the IG and inferno's Subscription samples."""
        resource = build_subscription(spec(filters=("Appointment?patient=Patient/1",),
                                           timeout_s=30, max_count=10, payload="full-resource"),
                                      now=NOW)
        base = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
        assert resource == {
            "resourceType": "Subscription",
            "meta": {"profile": [f"{base}/backport-subscription"]},
            "status": "requested",
            "end": "2024-04-04T09:00:00.000Z",
            "reason": "careloop follows Appointment changes",
            "criteria": TOPIC,
            "_criteria": {"extension": [{"url": f"{base}/backport-filter-criteria",
                                         "valueString": "Appointment?patient=Patient/1"}]},
            "channel": {
                "type": "rest-hook",
                "endpoint": ENDPOINT,
                "header": [f"Authorization: Bearer {SECRET}"],
                "extension": [
                    {"url": f"{base}/backport-heartbeat-period", "valueUnsignedInt": 60},
                    {"url": f"{base}/backport-timeout", "valueUnsignedInt": 30},
                    {"url": f"{base}/backport-max-count", "valuePositiveInt": 10}],
                "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": f"{base}/backport-payload-content",
                                            "valueCode": "full-resource"}]},
            },
        }

    @pytest.mark.parametrize("payload", ["empty", "id-only", "full-resource"])
    def test_same_structure_as_the_inferno_samples(self, payload: str) -> None:
        """Each payload: the same element paths as inferno's docs sample for it."""
        path = (SUBSCRIPTIONS / "inferno-subscriptions-test-kit" / "docs-samples"
                / f"Subscription_{payload}.json")
        if not path.exists():
            pytest.skip("shared corpus not found")
        sample = json.loads(path.read_text())
        ours = build_subscription(spec(payload=payload, timeout_s=60, max_count=20,
                                       heartbeat_s=None,
                                       filters=("Appointment?patient=Patient/123",)), now=NOW)
        assert set(ours) == set(sample)
        assert set(ours["channel"]) == set(sample["channel"])
        assert ours["channel"]["_payload"] == sample["channel"]["_payload"]
        assert [e["url"] for e in ours["channel"]["extension"]] == \
            [e["url"] for e in sample["channel"]["extension"]]
        assert read_subscription(ours).payload == read_subscription(sample).payload == payload

    def test_validates_as_fhir(self) -> None:
        """The built resources are valid Subscriptions (fhir.resources R4B model, whose
        Subscription is the R4 one)."""
        for s in (spec(), spec(mode="classic", topic=None, payload="empty"),
                  spec(mode="classic", topic=None, payload="full-resource",
                       criteria="Appointment?status=booked")):
            Subscription.model_validate(build_subscription(s, now=NOW))

    def test_x_careloop_secret_style(self) -> None:
        """The secret can go in X-Careloop-Secret instead."""
        resource = build_subscription(spec(secret_style="x-careloop-secret"), now=NOW)
        assert resource["channel"]["header"] == [f"X-Careloop-Secret: {SECRET}"]


class TestClassic:
    def test_empty_and_full_resource(self) -> None:
        """Classic: criteria is the search; payload mime only for full-resource."""
        empty = build_subscription(spec(mode="classic", topic=None, payload="empty",
                                        lifetime=None), now=NOW)
        assert empty["criteria"] == "Appointment?" and "payload" not in empty["channel"]
        assert "end" not in empty and "meta" not in empty
        full = build_subscription(spec(mode="classic", topic=None, payload="full-resource",
                                       criteria="Appointment?status=booked"), now=NOW)
        assert full["criteria"] == "Appointment?status=booked"
        assert full["channel"]["payload"] == "application/fhir+json"


class TestSpecRefusals:
    @pytest.mark.parametrize(("changes", "message"), [
        ({"mode": "classic", "topic": None}, "no id-only payload"),
        ({"topic": None}, "needs a topic"),
        ({"secret": "short"}, "16 to 512"),
        ({"secret": "has a space in it ok"}, "without spaces"),
        ({"secret": "line\r\nX-Evil: 1 padding"}, "printable"),
        ({"endpoint": "/fhir/notify/x"}, "CARELOOP_BASE_URL"),
        ({"filters": ("CarePlan?patient=1",)}, "search on Appointment"),
        ({"payload": "everything"}, "payload"),
        ({"resource_type": "appointment"}, "not a FHIR resource type"),
        ({"heartbeat_s": 0}, "heartbeat_s must be positive"),
    ])
    def test_bad_specs_name_the_setting(self, changes: dict[str, Any], message: str) -> None:
        """Configuration mistakes are caught before anything reaches the EHR."""
        with pytest.raises(SubscriptionSpecError, match=message):
            spec(**changes)


class TestReading:
    def test_bom_and_value_integer_heartbeat(self) -> None:
        """fhir-candle's r4 sample: BOM, heartbeat as valueInteger."""
        info = read_subscription((FIXTURES / "fhir_candle_r4_subscription_bom.json").read_bytes())
        assert (info.mode, info.heartbeat_s, info.payload) == ("backport", 120, "id-only")
        assert info.filters == ("Encounter?patient=Patient/example",)
        assert info.end == datetime(2023, 8, 30, 17, 6, 34, 743172, tzinfo=UTC)

    def test_classic_error(self) -> None:
        """The core example in error: classic, full-resource, the error text kept."""
        path = SUBSCRIPTIONS / "hl7-fhir-r4-examples" / "Subscription-example-error.json"
        if not path.exists():
            pytest.skip("shared corpus not found")
        info = read_subscription(path.read_bytes())
        assert (info.mode, info.status, info.payload) == ("classic", "error", "full-resource")
        assert info.error == "Socket Error 10060 - can't connect to host"

    def test_r5(self) -> None:
        """R5 Subscriptions: topic, filterBy and parameter headers."""
        path = (SUBSCRIPTIONS / "fhir-candle" / "tests-data" / "r5"
                / "subscription-encounter-create-interaction.json")
        if not path.exists():
            pytest.skip("shared corpus not found")
        info = read_subscription(path.read_bytes())
        assert info.mode == "r5" and info.heartbeat_s == 600 and info.max_count == 100
        assert info.headers == ("Authorization: Bearer secret-token-abc-123",)

    def test_round_trip(self) -> None:
        """What careloop builds reads back as its spec."""
        info = read_subscription(build_subscription(spec(timeout_s=5), now=NOW))
        assert (info.topic, info.payload, info.heartbeat_s, info.timeout_s) == \
            (TOPIC, "id-only", 60, 5)
        assert info.end == NOW + timedelta(days=30)


class TestSecret:
    @pytest.mark.parametrize("headers", [
        {"Authorization": f"Bearer {SECRET}"},
        {"authorization": f"bearer   {SECRET}"},
        [("X-Careloop-Secret", SECRET)],
        {"Authorization": "Basic abc", "X-Careloop-Secret": SECRET},
    ])
    def test_accepted(self, headers: Any) -> None:
        """Either header, any case, extra spaces."""
        assert secret_matches(headers, SECRET)

    @pytest.mark.parametrize("headers", [
        {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"},
        {"X-Careloop-Secret": SECRET[:-1]},
    ])
    def test_refused(self, headers: Any) -> None:
        """Missing or wrong secrets do not match."""
        assert not secret_matches(headers, SECRET)

    def test_empty_expected_never_matches(self) -> None:
        """A connection without a secret configured accepts nothing."""
        assert notification_secret({"X-Careloop-Secret": "x"}) == "x"
        assert not secret_matches({"X-Careloop-Secret": ""}, "")
