"""The FHIR client: retries and Retry-After, errors with OperationOutcome text, paging,
batched reads, conditional create, If-Match updates and operations."""

from __future__ import annotations

import email.utils
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from adapters.fhir import (
    FatalFHIRError,
    FHIRApi,
    FHIRClient,
    FHIRRequest,
    InvalidResponse,
    PreconditionFailed,
    ResourceNotFound,
    RetryableFHIRError,
    RetryPolicy,
    SigningKey,
    parse_retry_after,
    save_private_key,
)
from tests.adapters import test_fhir_fakes as fakes
from tests.adapters.test_fhir_fakes import BASE, CLIENT_ID, FakeEHR, bundle, outcome

ehr = fakes.ehr
es_key = fakes.es_key

APPT = {"resourceType": "Appointment", "id": "a1", "status": "booked",
        "meta": {"versionId": "3"}, "participant": []}


class TestRetries:
    async def test_retry_after_seconds_is_honoured(self, ehr: FakeEHR) -> None:
        """503 with Retry-After: 7 waits 7 s (not the shorter backoff), then succeeds."""
        ehr.router.get(f"{BASE}/Appointment/a1", name="a").mock(side_effect=[
            httpx.Response(503, headers={"Retry-After": "7"}, json=outcome("maintenance")),
            httpx.Response(200, json=APPT),
        ])
        assert await ehr.client.read("Appointment", "a1") == APPT
        assert ehr.sleeps.delays == [7.0]

    async def test_retry_after_http_date_is_honoured(self, ehr: FakeEHR) -> None:
        """Retry-After as an HTTP date counts from now."""
        when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=12),
                                           usegmt=True)
        ehr.router.get(f"{BASE}/Appointment/a1", name="a").mock(side_effect=[
            httpx.Response(429, headers={"Retry-After": when}),
            httpx.Response(200, json=APPT),
        ])
        await ehr.client.read("Appointment", "a1")
        assert 9.0 <= ehr.sleeps.delays[0] <= 12.0

    async def test_retry_after_is_capped(self, ehr: FakeEHR) -> None:
        """An hour-long Retry-After waits the cap (30 s), not an hour."""
        ehr.router.get(f"{BASE}/Appointment/a1", name="a").mock(side_effect=[
            httpx.Response(429, headers={"Retry-After": "3600"}),
            httpx.Response(200, json=APPT),
        ])
        await ehr.client.read("Appointment", "a1")
        assert ehr.sleeps.delays == [30.0]

    async def test_backoff_is_exponential_and_bounded(self, ehr: FakeEHR) -> None:
        """Without Retry-After: 0.5, 1, 2, 4 s (jitter at its maximum), then the error."""
        ehr.router.get(f"{BASE}/Appointment/a1", name="a").respond(
            502, json=outcome("upstream down"))
        with pytest.raises(RetryableFHIRError, match="upstream down") as info:
            await ehr.client.read("Appointment", "a1")
        assert info.value.status == 502
        assert ehr.router["a"].call_count == 5
        assert ehr.sleeps.delays == [0.5, 1.0, 2.0, 4.0]

    def test_jitter_spreads_the_wait(self) -> None:
        """Full jitter: the wait is a random fraction of the exponential step."""
        policy = RetryPolicy()
        assert policy.delay(3, None, lambda: 0.25) == 0.5
        assert policy.delay(10, None, lambda: 1.0) == policy.max_delay_s
        assert policy.delay(1, 4.0, lambda: 0.1) == 4.0

    async def test_connection_errors_are_retried(self, ehr: FakeEHR) -> None:
        """A refused or dropped connection is retried for a read."""
        ehr.router.get(f"{BASE}/Appointment/a1", name="a").mock(side_effect=[
            httpx.ConnectError("refused"), httpx.ReadError("reset"),
            httpx.Response(200, json=APPT),
        ])
        assert await ehr.client.read("Appointment", "a1") == APPT
        assert len(ehr.sleeps.delays) == 2

    async def test_plain_create_is_not_repeated_after_an_ambiguous_failure(
            self, ehr: FakeEHR) -> None:
        """A 500 or a dropped connection after POST may have created it: no blind retry."""
        ehr.router.post(f"{BASE}/Communication", name="c").mock(side_effect=[
            httpx.ReadError("reset after send")])
        with pytest.raises(RetryableFHIRError):
            await ehr.client.create({"resourceType": "Communication", "status": "completed"})
        assert ehr.router["c"].call_count == 1
        ehr.router.post(f"{BASE}/Task", name="t").respond(500)
        with pytest.raises(RetryableFHIRError):
            await ehr.client.create({"resourceType": "Task", "status": "requested"})
        assert ehr.router["t"].call_count == 1

    async def test_plain_create_is_repeated_after_a_refusal(self, ehr: FakeEHR) -> None:
        """429 and 503 mean the server did not act: a plain create is repeated."""
        ehr.router.post(f"{BASE}/Communication", name="c").mock(side_effect=[
            httpx.Response(503, headers={"Retry-After": "1"}),
            httpx.Response(201, json={"resourceType": "Communication", "id": "c1"}),
        ])
        result = await ehr.client.create({"resourceType": "Communication"})
        assert result.created and result.id == "c1"

    async def test_conditional_create_is_idempotent_so_retried(self, ehr: FakeEHR) -> None:
        """With If-None-Exist a repeat cannot duplicate, so a 500 is retried."""
        ehr.router.post(f"{BASE}/Communication", name="c").mock(side_effect=[
            httpx.Response(500),
            httpx.Response(200, json={"resourceType": "Communication", "id": "c1"}),
        ])
        result = await ehr.client.create({"resourceType": "Communication"},
                                         if_none_exist="identifier=urn:x|1")
        assert not result.created
        assert ehr.router["c"].call_count == 2


class TestErrors:
    async def test_operation_outcome_text_is_surfaced(self, ehr: FakeEHR) -> None:
        """A 422 names the request, the status and every issue's text."""
        oo = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "required", "diagnostics": "status is required",
             "expression": ["Appointment.status"]},
            {"severity": "error", "code": "invalid", "details": {"text": "bad participant"}}]}
        ehr.router.post(f"{BASE}/Appointment", name="a").respond(422, json=oo)
        with pytest.raises(FatalFHIRError) as info:
            await ehr.client.create({"resourceType": "Appointment"})
        err = info.value
        assert err.status == 422 and err.outcome == oo and not err.retryable
        assert str(err) == ("POST Appointment: HTTP 422: status is required "
                            "(at Appointment.status); bad participant")
        assert ehr.router["a"].call_count == 1

    async def test_not_found_and_gone(self, ehr: FakeEHR) -> None:
        """404 and 410 are ResourceNotFound; 410 says the resource was deleted."""
        ehr.router.get(f"{BASE}/Appointment/x", name="x").respond(404, json=outcome("no"))
        ehr.router.get(f"{BASE}/Appointment/y", name="y").respond(410, json=outcome("deleted"))
        with pytest.raises(ResourceNotFound) as missing:
            await ehr.client.read("Appointment", "x")
        with pytest.raises(ResourceNotFound) as gone:
            await ehr.client.read("Appointment", "y")
        assert not missing.value.gone and gone.value.gone

    async def test_non_json_answers_are_invalid_responses(self, ehr: FakeEHR) -> None:
        """An HTML page where JSON was expected is reported, not parsed."""
        ehr.router.get(f"{BASE}/Appointment/a1").respond(200, text="<html>login</html>",
                                                         headers={"Content-Type": "text/html"})
        with pytest.raises(InvalidResponse, match="not JSON"):
            await ehr.client.read("Appointment", "a1")

    async def test_a_bom_is_tolerated(self, ehr: FakeEHR) -> None:
        """A UTF-8 BOM before the JSON is skipped."""
        ehr.router.get(f"{BASE}/Appointment/a1").respond(
            200, content=b"\xef\xbb\xbf" + json.dumps(APPT).encode())
        assert await ehr.client.read("Appointment", "a1") == APPT

    def test_retry_after_parsing(self) -> None:
        """Seconds, dates, garbage and negatives."""
        now = datetime(2024, 1, 1, tzinfo=UTC)
        assert parse_retry_after("5") == 5.0
        assert parse_retry_after("Mon, 01 Jan 2024 00:00:10 GMT", now=now) == 10.0
        assert parse_retry_after("Mon, 01 Jan 2023 00:00:10 GMT", now=now) == 0.0
        assert parse_retry_after("soon") is None
        assert parse_retry_after(None) is None


class TestPaging:
    async def test_search_follows_next_links(self, ehr: FakeEHR) -> None:
        """Three pages, every match once; included resources left out."""
        page2, page3 = f"{BASE}/Appointment?_page=2", f"{BASE}/Appointment?_page=3"
        first = bundle([{"resourceType": "Appointment", "id": "1"}], page2)
        first["entry"].append({"resource": {"resourceType": "Patient", "id": "p"},
                               "search": {"mode": "include"}})
        ehr.router.get(f"{BASE}/Appointment", params={"status": "booked"}).respond(json=first)
        ehr.router.get(page2).respond(json=bundle([{"resourceType": "Appointment", "id": "2"}],
                                                  page3))
        ehr.router.get(page3).respond(json=bundle([{"resourceType": "Appointment", "id": "3"}]))
        ids = [r["id"] async for r in ehr.client.search("Appointment", {"status": "booked"})]
        assert ids == ["1", "2", "3"]

    async def test_a_paging_loop_is_stopped(self, ehr: FakeEHR) -> None:
        """A server that keeps sending the same next link does not spin forever."""
        page2 = f"{BASE}/Appointment?_page=2"
        ehr.router.get(f"{BASE}/Appointment").mock(
            side_effect=lambda request: httpx.Response(200, json=bundle([], page2)))
        with pytest.raises(InvalidResponse, match="paging loop"):
            async for _ in ehr.client.search("Appointment"):
                pass

    async def test_next_links_to_another_origin_are_refused(self, ehr: FakeEHR) -> None:
        """The bearer token never follows a link off the server."""
        ehr.router.get(f"{BASE}/Appointment").respond(
            json=bundle([], "https://evil.example.com/fhir/Appointment?page=2"))
        with pytest.raises(FatalFHIRError, match=r"not on https://ehr\.example\.org"):
            async for _ in ehr.client.search("Appointment"):
                pass

    async def test_read_many_batches_ids(self, ehr: FakeEHR) -> None:
        """120 ids: three `_id` searches of at most 50; missing ids are simply absent."""
        asked: list[list[str]] = []

        def answer(request: httpx.Request) -> httpx.Response:
            ids = parse_qs(urlsplit(str(request.url)).query)["_id"][0].split(",")
            asked.append(ids)
            return httpx.Response(200, json=bundle(
                [{"resourceType": "Appointment", "id": i} for i in ids if i != "7"]))

        ehr.router.get(f"{BASE}/Appointment").mock(side_effect=answer)
        found = await ehr.client.read_many("Appointment", [str(i) for i in range(120)] + ["1"])
        assert [len(a) for a in asked] == [50, 50, 20]
        assert len(found) == 119 and "7" not in found


class TestWrites:
    async def test_conditional_create_sends_if_none_exist(self, ehr: FakeEHR) -> None:
        """If-None-Exist carries the criteria; 201 created, Location gives the id."""
        route = ehr.router.post(f"{BASE}/Communication").respond(
            201, headers={"Location": f"{BASE}/Communication/c9/_history/1", "ETag": 'W/"1"'})
        result = await ehr.client.create(
            {"resourceType": "Communication"},
            if_none_exist={"identifier": "https://careloop.example/touch|t-1"})
        sent = route.calls[0].request
        assert sent.headers["If-None-Exist"] == \
            "identifier=https%3A%2F%2Fcareloop.example%2Ftouch%7Ct-1"
        assert sent.headers["Content-Type"] == "application/fhir+json"
        assert result.created and result.id == "c9" and result.version_id == "1"

    async def test_conditional_create_with_several_matches(self, ehr: FakeEHR) -> None:
        """412: PreconditionFailed with the server's words."""
        ehr.router.post(f"{BASE}/Communication").respond(
            412, json=outcome("2 resources match identifier=x"))
        with pytest.raises(PreconditionFailed, match="2 resources match"):
            await ehr.client.create({"resourceType": "Communication"}, if_none_exist="x=1")

    async def test_update_with_if_match(self, ehr: FakeEHR) -> None:
        """If-Match takes the resource's own version, or the one given."""
        route = ehr.router.put(f"{BASE}/Appointment/a1").respond(200, json=APPT)
        await ehr.client.update(APPT, if_match=True)
        await ehr.client.update(APPT, if_match="7")
        await ehr.client.update(APPT, if_match='W/"8"')
        assert [c.request.headers["If-Match"] for c in route.calls] == \
            ['W/"3"', 'W/"7"', 'W/"8"']

    async def test_events_operation(self, ehr: FakeEHR) -> None:
        """$events with the event-number range and content."""
        route = ehr.router.get(f"{BASE}/Subscription/s1/$events").respond(
            json={"resourceType": "Bundle", "type": "history", "entry": []})
        await ehr.client.subscription_events("s1", since=4, until=9, content="id-only")
        assert dict(route.calls[0].request.url.params) == {
            "eventsSinceNumber": "4", "eventsUntilNumber": "9", "content": "id-only"}

    async def test_operations_are_retried_as_reads(self, ehr: FakeEHR) -> None:
        """$status is safe to repeat after a dropped connection."""
        ehr.router.get(f"{BASE}/Subscription/s1/$status").mock(side_effect=[
            httpx.ReadError("reset"), httpx.Response(200, json={"resourceType": "Bundle"})])
        assert (await ehr.client.subscription_status("s1"))["resourceType"] == "Bundle"


class TestConstruction:
    def test_the_client_implements_the_port(self) -> None:
        """FHIRClient is a FHIRApi."""
        assert isinstance(FHIRClient(BASE), FHIRApi)

    async def test_connect_from_a_connection_config(self, ehr: FakeEHR, es_key: SigningKey,
                                                    tmp_path: Path) -> None:
        """fhir_base, client_id, private key path and scopes are all it takes."""
        pem = save_private_key(es_key, tmp_path / "keys" / "careloop.pem")
        ehr.router.get(f"{BASE}/Appointment/a1").respond(json=APPT)
        async with FHIRClient.connect(fhir_base=BASE + "/", client_id=CLIENT_ID,
                                      private_key=pem, scopes=["system/Appointment.rs"]) as c:
            assert await c.read("Appointment", "a1") == APPT
        assert ehr.token.headers[0]["kid"] == es_key.kid

    def test_a_bad_base_is_refused(self) -> None:
        """fhir_base must be an http(s) URL."""
        with pytest.raises(ValueError, match="fhir_base"):
            FHIRClient("ehr.example.org/fhir")

    def test_requests_know_whether_they_may_be_repeated(self) -> None:
        """GET/PUT/DELETE, conditional create and _search are idempotent; plain POST is not."""
        assert FHIRRequest.get("Patient").idempotent
        assert not FHIRRequest.post("Patient", {}).idempotent
        assert FHIRRequest.post("Patient", {}, headers={"If-None-Exist": "x=1"}).idempotent
        assert FHIRRequest.post("Patient/_search").idempotent
        assert FHIRRequest.post("Patient", {}, retry_safe=True).idempotent
