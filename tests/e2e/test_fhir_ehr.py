"""FHIR in, end to end: the stand-in EHR (auth required) notifies a running ``careloop
serve`` after ``careloop subscriptions ensure``; the timeline follows creates, updates and
cancels, and a dropped notification is found as a gap and caught up."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from adapters.fhir import FHIRClient, SigningKey, save_private_key
from integration.db import create_db_engine
from integration.models import timeline_entries
from tests.e2e.conftest import CARELOOP, base_env
from tests.e2e.ehr import APPOINTMENT_TOPIC, CLIENT_ID

pytestmark = pytest.mark.slow


EHR_ENV = {"EHR_NOTIFY_RETRIES": "0"}
"""Settings of this module's stand-in EHR (the ehr_origin fixture)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CARELOOP, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def _serve(port: int, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen([CARELOOP, "serve", "--port", str(port), "--mllp-port", "0"],
                                env=env, cwd=cwd, stdout=out, stderr=out)


@dataclass
class World:
    ehr: FHIRClient
    admin: httpx.AsyncClient
    db_url: str
    ensure_output: str

    def appointments(self) -> dict[str, str]:
        engine = create_db_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return {str(r.resource["id"]): r.status for r in conn.execute(
                    select(timeline_entries).where(
                        timeline_entries.c.resource_type == "Appointment"))}
        finally:
            engine.dispose()

    async def until(self, want: dict[str, str], timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            got = await asyncio.to_thread(self.appointments)
            if all(got.get(k) == v for k, v in want.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timeline {got}, wanted {want}")
            await asyncio.sleep(0.25)


@pytest.fixture
async def world(ehr_origin: str, key: SigningKey, tmp_path: Path,
                sqlite_url: str) -> AsyncIterator[World]:
    async with httpx.AsyncClient(base_url=ehr_origin) as admin:
        (await admin.post("/_admin/reset")).raise_for_status()
        pem = save_private_key(key, tmp_path / "careloop.pem")
        port = _free_port()
        cfg = tmp_path / "careloop.toml"
        cfg.write_text(
            '[[connections]]\nname = "main-ehr"\n'
            f'fhir_base = "{ehr_origin}/fhir/R4"\nclient_id = "{CLIENT_ID}"\n'
            f'private_key = "{pem}"\nscopes = ["system/*.*"]\nmode = "backport"\n'
            'payload = "id-only"\nresource_types = ["Appointment"]\n'
            f'topics = {{ Appointment = "{APPOINTMENT_TOPIC}" }}\nheartbeat_s = 60\n')
        env = base_env(sqlite_url) | {"CARELOOP_CONFIG": str(cfg),
                                      "CARELOOP_BASE_URL": f"http://127.0.0.1:{port}"}
        log = tmp_path / "serve.log"
        proc = _serve(port, env, tmp_path, log)
        try:
            deadline = time.monotonic() + 30
            async with httpx.AsyncClient() as http:
                while True:
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/health/live")).is_success:
                            break
                    except httpx.TransportError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"careloop serve did not start:\n{log.read_text()}")
                    await asyncio.sleep(0.1)
            ensured = await asyncio.to_thread(_run, ["subscriptions", "ensure"], env, tmp_path)
            assert ensured.returncode == 0, ensured.stdout + ensured.stderr
            again = await asyncio.to_thread(_run, ["subscriptions", "ensure"], env, tmp_path)
            assert again.returncode == 0 and "kept" in again.stdout, again.stdout
            client = FHIRClient.connect(fhir_base=f"{ehr_origin}/fhir/R4", client_id=CLIENT_ID,
                                        private_key=pem, scopes=["system/*.*"])
            async with client:
                yield World(client, admin, sqlite_url, ensured.stdout)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _appointment(patient: str, minute: int = 0, status: str = "booked") -> dict[str, Any]:
    return {"resourceType": "Appointment", "status": status,
            "start": f"2030-01-01T10:{minute:02d}:00Z", "end": f"2030-01-01T11:{minute:02d}:00Z",
            "participant": [{"actor": {"reference": f"Patient/{patient}"},
                             "status": "accepted"}]}


async def _patient(ehr: FHIRClient) -> str:
    created = await ehr.create({"resourceType": "Patient", "identifier": [
        {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-E2E-1"}]})
    assert created.id
    return created.id


async def test_create_update_cancel_follow(world: World) -> None:
    assert "created" in world.ensure_output
    pid = await _patient(world.ehr)
    made = await world.ehr.create(_appointment(pid))
    assert made.id and made.resource
    await world.until({made.id: "booked"})
    moved = await world.ehr.update({**made.resource, "start": "2030-01-02T10:00:00Z",
                                    "end": "2030-01-02T11:00:00Z"}, if_match=True)
    assert moved.resource
    cancelled = await world.ehr.update({**moved.resource, "status": "cancelled"}, if_match=True)
    assert cancelled.version_id
    await world.until({made.id: "cancelled"})

    # The serving process recorded its SMART token's expiry (never the token) for the console.
    from integration import fhir_tokens

    engine = create_db_engine(world.db_url)
    try:
        tokens = fhir_tokens.read(engine)
    finally:
        engine.dispose()
    assert set(tokens) == {"main-ehr"}
    assert tokens["main-ehr"].expires_at > tokens["main-ehr"].obtained_at


async def test_dropped_notification_is_caught_up(world: World) -> None:
    pid = await _patient(world.ehr)
    first = await world.ehr.create(_appointment(pid, 0))
    assert first.id
    await world.until({first.id: "booked"})
    (await world.admin.post("/_admin/faults", json={"kind": "drop-notifications",
                                                    "count": 1})).raise_for_status()
    lost = await world.ehr.create(_appointment(pid, 1))
    seen = await world.ehr.create(_appointment(pid, 2))
    assert lost.id and seen.id
    await world.until({seen.id: "booked"})
    # The gap waits out its grace period, then the timer catches it up.
    await world.until({first.id: "booked", lost.id: "booked", seen.id: "booked"}, timeout=60)


FAULTS = [
    pytest.param(None, id="none"),
    pytest.param({"kind": "duplicate-notifications", "count": 3}, id="duplicated"),
    pytest.param({"kind": "reorder-notifications", "count": 3, "holdMs": 1000}, id="reordered"),
    pytest.param({"kind": "drop-notifications", "count": 2}, id="dropped"),
    # GET only: careloop's reads meet these, not the test's own writes.
    pytest.param({"kind": "error", "status": 503, "count": 2, "retryAfter": 1, "method": "GET"},
                 id="503"),
    pytest.param({"kind": "error", "status": 429, "count": 1, "target": "token"},
                 id="429-token"),
    pytest.param({"kind": "disconnect", "count": 1, "method": "GET"}, id="disconnect"),
    pytest.param({"kind": "expire-tokens"}, id="tokens-expired"),
]
EXPECTED = [("2030-01-01T10:05:00Z", "cancelled"), ("2030-01-01T10:10:00Z", "booked"),
            ("2030-01-01T10:30:00Z", "booked")]


@pytest.mark.parametrize("fault", FAULTS)
async def test_same_timeline_whatever_the_fault(world: World, fault: dict[str, Any] | None
                                                ) -> None:
    """Create, move and cancel under each fault: the final timeline is the fault-free one."""
    pid = await _patient(world.ehr)
    if fault is not None:
        (await world.admin.post("/_admin/faults", json=fault)).raise_for_status()
    a = await world.ehr.create(_appointment(pid, 0))
    b = await world.ehr.create(_appointment(pid, 5))
    c = await world.ehr.create(_appointment(pid, 10))
    assert a.resource and b.resource and c.id
    await world.ehr.update({**a.resource, "start": "2030-01-01T10:30:00Z",
                            "end": "2030-01-01T11:30:00Z"}, if_match=True)
    await world.ehr.update({**b.resource, "status": "cancelled"}, if_match=True)
    assert a.id and b.id
    await world.until({a.id: "booked", b.id: "cancelled", c.id: "booked"}, timeout=60)

    def final() -> list[tuple[str, str]]:
        engine = create_db_engine(world.db_url)
        try:
            with engine.connect() as conn:
                return sorted((str(r.resource["start"]), r.status) for r in conn.execute(
                    select(timeline_entries).where(
                        timeline_entries.c.resource_type == "Appointment")))
        finally:
            engine.dispose()

    deadline = time.monotonic() + 60
    while (got := await asyncio.to_thread(final)) != EXPECTED:
        if time.monotonic() > deadline:
            raise AssertionError(f"timeline {got}, wanted {EXPECTED}")
        await asyncio.sleep(0.25)
