"""The FHIR client and the subscription planning against the stand-in EHR (../shared/ehr):
a real FHIR R4 server with SMART Backend Services required, backport subscriptions, $status,
$events and fault injection.

The harness is copied to a temporary folder and installed once per session (its folder may be
read-only); each test resets it. Skipped when node/npm or the harness are missing, unless
CARELOOP_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.fhir import (
    FHIRClient,
    PreconditionFailed,
    RetryableFHIRError,
    SigningKey,
    generate_signing_key,
    save_private_key,
)
from subscriptions import (
    CatchUp,
    Keep,
    ServerCapabilities,
    SubscriptionSpec,
    TrackerState,
    build_subscription,
    catch_up_flow,
    caught_up,
    find_request,
    observe,
    parse_notification,
    parse_status_bundle,
    plan_ensure,
    resolve_flow,
    run_flow,
    secret_matches,
)
from tests.e2e.ehr import APPOINTMENT_TOPIC, CLIENT_ID, install, running_ehr

pytestmark = pytest.mark.slow

TOPIC = APPOINTMENT_TOPIC
SECRET = "e2e-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def harness_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private, installed copy of the harness (npm ci once per session)."""
    return install(tmp_path_factory)


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return generate_signing_key("ES384")


@pytest.fixture(scope="session")
def ehr_origin(harness_dir: Path, signing_key: SigningKey,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The EHR on a free loopback port, auth required, careloop registered by JWKS."""
    folder = tmp_path_factory.mktemp("ehr-run")
    with running_ehr(harness_dir, signing_key, folder, EHR_NOTIFY_RETRIES="0") as origin:
        yield origin


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def ehr(ehr_origin: str, signing_key: SigningKey,
              tmp_path: Path) -> AsyncIterator[tuple[FHIRClient, httpx.AsyncClient, Sleeps]]:
    """A reset EHR, careloop's client (sleeps recorded, not slept) and an admin client."""
    async with httpx.AsyncClient(base_url=ehr_origin) as admin:
        (await admin.post("/_admin/reset")).raise_for_status()
        pem = save_private_key(signing_key, tmp_path / "careloop.pem")
        sleeps = Sleeps()
        client = FHIRClient.connect(fhir_base=f"{ehr_origin}/fhir/R4", client_id=CLIENT_ID,
                                    private_key=pem, scopes=["system/*.*"], sleep=sleeps)
        async with client:
            yield client, admin, sleeps


def _appointment(patient: str, minute: int = 0) -> dict[str, Any]:
    return {"resourceType": "Appointment", "status": "booked",
            "start": f"2030-01-01T10:{minute:02d}:00Z", "end": f"2030-01-01T11:{minute:02d}:00Z",
            "participant": [{"actor": {"reference": f"Patient/{patient}"},
                             "status": "accepted"}]}


class Receiver:
    """Careloop's notification endpoint, reduced to recording what arrives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir/notify/main-ehr"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} notifications, wanted {count}")
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class TestRest:
    async def test_create_read_search_and_paging(self, ehr: Any) -> None:
        """With auth required: create, read, a search over three pages, one token."""
        client, admin, _ = ehr
        patient = await client.create({"resourceType": "Patient"})
        assert patient.created and patient.id
        for i in range(5):
            await client.create(_appointment(patient.id, i))
        assert (await client.read("Patient", patient.id))["id"] == patient.id
        found = [r async for r in client.search("Appointment", {"patient": patient.id,
                                                                "_count": "2"})]
        assert len(found) == 5
        tokens = (await admin.get("/_admin/tokens")).json()
        assert len(tokens if isinstance(tokens, list) else tokens["tokens"]) == 1

    async def test_conditional_create_and_if_match(self, ehr: Any) -> None:
        """If-None-Exist creates once, then returns the match; a stale If-Match is 412."""
        client, _, _ = ehr
        body = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "7"}]}
        first = await client.create(body, if_none_exist={"identifier": "urn:mrn|7"})
        second = await client.create(body, if_none_exist={"identifier": "urn:mrn|7"})
        assert first.created and not second.created and first.id == second.id
        assert first.resource is not None
        updated = await client.update({**first.resource, "gender": "female"}, if_match=True)
        assert updated.version_id != first.version_id
        with pytest.raises(PreconditionFailed):
            await client.update({**first.resource, "gender": "male"}, if_match=True)


class TestFaults:
    async def test_503_with_retry_after_is_retried(self, ehr: Any) -> None:
        """Two 503s with Retry-After: 2, then success; the waits follow the header."""
        client, admin, sleeps = ehr
        await client.capabilities()
        await admin.post("/_admin/faults", json={"kind": "error", "status": 503, "count": 2,
                                                 "retryAfter": 2})
        patient = await client.create({"resourceType": "Patient"})
        assert patient.created
        assert sleeps.delays == [2.0, 2.0]

    async def test_429_on_the_token_endpoint(self, ehr: Any) -> None:
        """A busy token endpoint is waited out like any 429."""
        client, admin, sleeps = ehr
        await admin.post("/_admin/faults", json={"kind": "error", "target": "token",
                                                 "status": 429, "count": 1, "retryAfter": 3})
        await client.create({"resourceType": "Patient"})
        assert sleeps.delays == [3.0]

    async def test_disconnect_is_retried(self, ehr: Any) -> None:
        """A dropped connection on a read is retried."""
        client, admin, sleeps = ehr
        patient = await client.create({"resourceType": "Patient"})
        await admin.post("/_admin/faults", json={"kind": "disconnect", "count": 1})
        assert (await client.read("Patient", patient.id or ""))["id"] == patient.id
        assert len(sleeps.delays) == 1

    async def test_persistent_errors_end_in_a_retryable_error(self, ehr: Any) -> None:
        """Bounded: five tries, then the error with the server's OperationOutcome text."""
        client, admin, _ = ehr
        await client.capabilities()
        await admin.post("/_admin/faults", json={"kind": "error", "status": 503, "count": 10})
        with pytest.raises(RetryableFHIRError) as info:
            await client.create({"resourceType": "Patient"})
        assert info.value.status == 503 and info.value.outcome is not None

    async def test_tokens_expiring_early(self, ehr: Any) -> None:
        """Tokens revoked server-side: one 401, one new token, the request goes through."""
        client, admin, _ = ehr
        patient = await client.create({"resourceType": "Patient"})
        await admin.post("/_admin/faults", json={"kind": "expire-tokens"})
        assert (await client.read("Patient", patient.id or ""))["id"] == patient.id
        tokens = (await admin.get("/_admin/tokens")).json()
        assert len(tokens if isinstance(tokens, list) else tokens["tokens"]) == 2


class TestSubscriptions:
    async def test_handshake_events_gap_and_catch_up(self, ehr: Any,
                                                     receiver: Receiver) -> None:
        """Builder → handshake with our secret → events tracked → two dropped notifications
        found as a gap → $events catch-up → resources read back."""
        client, admin, _ = ehr
        caps = ServerCapabilities.from_capability_statement(await client.capabilities())
        assert caps.events_operation and TOPIC in caps.topics
        spec = SubscriptionSpec("Appointment", receiver.url, SECRET, topic=TOPIC,
                                payload="id-only", heartbeat_s=60)
        now = datetime.now(UTC)
        created = await client.create(build_subscription(spec, now=now))
        sub_id = created.id or ""
        await receiver.wait_for(1)
        headers, body = receiver.received[0]
        assert secret_matches(headers, SECRET)
        handshake = parse_notification(body)
        assert (handshake.type, handshake.subscription_id) == ("handshake", sub_id)
        (status,) = parse_status_bundle(await client.subscription_status(sub_id))
        assert status.status == "active"

        found = [r async for r in client.search("Subscription", dict(find_request(spec).params))]
        assert plan_ensure(spec, found, now=now) == [Keep(sub_id)]

        state = TrackerState.new(sub_id, now=now)
        patient = await client.create({"resourceType": "Patient"})
        first = await client.create(_appointment(patient.id or "", 0))
        await receiver.wait_for(2)
        state, decision = observe(state, parse_notification(receiver.received[1][1]), now=now)
        assert decision is None and state.contiguous == 1

        await admin.post("/_admin/faults", json={"kind": "drop-notifications", "count": 2})
        created_ids = [(await client.create(_appointment(patient.id or "", m))).id
                       for m in (1, 2, 3)]
        await receiver.wait_for(3)
        state, decision = observe(state, parse_notification(receiver.received[2][1]), now=now,
                                  grace=timedelta(0))
        assert isinstance(decision, CatchUp) and decision.through == 4
        assert [(r.first, r.last) for r in decision.missing] == [(2, 3)]

        result = await run_flow(catch_up_flow(decision, subscription_id=sub_id,
                                              resource_types=["Appointment"],
                                              capabilities=caps), client)
        assert result.method == "events" and [e.number for e in result.events] == [2, 3]
        resolved = await run_flow(resolve_flow(result.events), client)
        assert sorted(r["id"] for r in resolved.resources) == sorted(created_ids[:2])
        state = caught_up(state, through=result.through, at=now,
                          good_timestamp=result.good_timestamp)
        assert state.contiguous == 4 and not state.missing()
        assert first.id not in {r["id"] for r in resolved.resources}
