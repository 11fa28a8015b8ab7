"""GET /patients, /patients/{id}/timeline and /patients/{id}/outreach over HTTP: filters,
paging, the FHIR Bundle, errors, auth and the audit trail."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from integration.api import create_app
from integration.db import write_lock
from integration.identity import find_by_identifier
from integration.models import audit_events
from integration.runtime import Runtime
from integration.timeline import SourceRef, apply
from tests.helpers import settings_for

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, tzinfo=UTC)
FHIR = "application/fhir+json"


def appointment(n: int, status: str) -> dict[str, Any]:
    return {
        "resourceType": "Appointment", "id": f"a{n}", "status": status,
        "identifier": [{"system": "urn:appt", "value": str(n)}],
        "start": (T0 + timedelta(days=n)).isoformat(),
        "participant": [{"actor": {"reference": "Patient/p1"}}],
    }


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False),
                 with_mllp=False)
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1",
         "identifier": [{"system": "urn:mrn", "value": "M1"}]},
        *(appointment(n, "cancelled" if n % 3 == 0 else "booked") for n in range(12)),
        {"resourceType": "Patient", "id": "p2",
         "identifier": [{"system": "urn:mrn", "value": "M2"}]},
    ]
    with write_lock(rt.engine), rt.engine.begin() as conn:
        apply(conn, resources, SourceRef("fhir", "ehr", "Bundle/1", "1", T0), NOW)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as c:
        yield c


def basic(runtime: Runtime, *scopes: str) -> dict[str, str]:
    client_id, secret = runtime.clients.create("vendor", list(scopes))
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def auth(runtime: Runtime) -> dict[str, str]:
    return basic(runtime, "timeline.read", "outreach.read")


def pid(runtime: Runtime, mrn: str = "M1") -> str:
    with runtime.engine.connect() as conn:
        found = find_by_identifier(conn, "urn:mrn", mrn)
    assert found
    return found


class TestFindPatient:
    def test_by_identifier(self, client: TestClient, auth: dict[str, str],
                           runtime: Runtime) -> None:
        """system|value → the patient id and its identifiers (source references left out)."""
        r = client.get("/patients", params={"identifier": "urn:mrn|M1"}, headers=auth)
        assert r.status_code == 200
        body = r.json()
        assert body["id"] == pid(runtime)
        assert body["identifiers"] == [{"system": "urn:mrn", "value": "M1"}]

    def test_unknown_identifier_404(self, client: TestClient, auth: dict[str, str]) -> None:
        r = client.get("/patients", params={"identifier": "urn:mrn|nope"}, headers=auth)
        assert r.status_code == 404
        assert r.json()["code"] == "patient_not_found"

    def test_malformed_identifier_400(self, client: TestClient, auth: dict[str, str]) -> None:
        r = client.get("/patients", params={"identifier": "M1"}, headers=auth)
        assert (r.status_code, r.json()["code"]) == (400, "bad_request")


class TestTimeline:
    def test_newest_first_with_the_interface_shape(
        self, client: TestClient, auth: dict[str, str], runtime: Runtime
    ) -> None:
        r = client.get(f"/patients/{pid(runtime)}/timeline", params={"kind": "appointment"},
                       headers=auth)
        assert r.status_code == 200
        items = r.json()["items"]
        assert [i["resource"]["id"] for i in items] == [f"a{n}" for n in range(11, -1, -1)]
        assert set(items[0]) == {"id", "patient_id", "kind", "status", "time", "end",
                                 "summary", "resource_type", "resource", "sources",
                                 "updated_at"}
        assert items[0]["sources"][0]["system"] == "fhir"

    def test_filters(self, client: TestClient, auth: dict[str, str], runtime: Runtime) -> None:
        r = client.get(
            f"/patients/{pid(runtime)}/timeline",
            params={"kind": "appointment", "status": "cancelled", "since": "2024-01-04",
                    "until": "2024-01-10T00:00:00Z"},
            headers=auth,
        )
        assert [i["resource"]["id"] for i in r.json()["items"]] == ["a6", "a3"]  # until excludes a9

    def test_paging_covers_everything_once(
        self, client: TestClient, auth: dict[str, str], runtime: Runtime
    ) -> None:
        seen: list[str] = []
        params: dict[str, Any] = {"limit": 5, "kind": "appointment"}
        while True:
            body = client.get(f"/patients/{pid(runtime)}/timeline", params=params,
                              headers=auth).json()
            seen += [i["id"] for i in body["items"]]
            if not body["next_cursor"]:
                break
            params["cursor"] = body["next_cursor"]
        assert len(seen) == len(set(seen)) == 12

    def test_fhir_bundle_with_next_link(
        self, client: TestClient, auth: dict[str, str], runtime: Runtime
    ) -> None:
        r = client.get(f"/patients/{pid(runtime)}/timeline", params={"limit": 4},
                       headers={**auth, "Accept": FHIR})
        assert r.headers["content-type"].startswith(FHIR)
        bundle = r.json()
        assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "searchset")
        assert len(bundle["entry"]) == 4
        assert bundle["entry"][0]["resource"]["resourceType"] in ("Appointment", "Patient")
        assert [lk["relation"] for lk in bundle["link"]] == ["self", "next"]
        assert "cursor=" in bundle["link"][1]["url"]

    def test_unknown_patient_404_and_operation_outcome(
        self, client: TestClient, auth: dict[str, str]
    ) -> None:
        r = client.get("/patients/nobody/timeline", headers=auth)
        assert (r.status_code, r.json()["code"]) == (404, "patient_not_found")
        r = client.get("/patients/nobody/timeline", headers={**auth, "Accept": FHIR})
        assert r.status_code == 404
        assert r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["code"] == "not-found"

    def test_bad_parameters_400(self, client: TestClient, auth: dict[str, str],
                                runtime: Runtime) -> None:
        url = f"/patients/{pid(runtime)}/timeline"
        for params in ({"kind": "pizza"}, {"since": "yesterday"}, {"cursor": "zzz"},
                       {"limit": "0"}):
            r = client.get(url, params=params, headers=auth)
            assert r.status_code == 400, params
            assert set(r.json()) == {"code", "message"}

    def test_a_merged_id_resolves_to_the_survivor(
        self, client: TestClient, auth: dict[str, str], runtime: Runtime
    ) -> None:
        old, survivor = pid(runtime, "M2"), pid(runtime)
        replaced = {"resourceType": "Patient", "id": "p2", "active": False,
                    "identifier": [{"system": "urn:mrn", "value": "M2"}],
                    "link": [{"type": "replaced-by", "other": {"reference": "Patient/p1"}}]}
        with write_lock(runtime.engine), runtime.engine.begin() as conn:
            apply(conn, [replaced], SourceRef("fhir", "ehr", "Bundle/2", "2",
                                              T0 + timedelta(1)), NOW)
        r = client.get(f"/patients/{old}/timeline", headers=auth)
        assert r.status_code == 200
        assert r.json()["patient_id"] == survivor
        assert r.headers["content-location"] == f"/patients/{survivor}/timeline"
        found = client.get("/patients", params={"identifier": "urn:mrn|M2"}, headers=auth)
        assert found.json()["id"] == survivor
        assert found.json()["merged"][0]["id"] == old

    def test_every_read_is_audited(self, client: TestClient, runtime: Runtime) -> None:
        headers = basic(runtime, "timeline.read")
        client.get(f"/patients/{pid(runtime)}/timeline", headers=headers)
        with runtime.engine.connect() as conn:
            rows = conn.execute(select(audit_events).where(
                audit_events.c.action == "timeline.read")).all()
        assert len(rows) == 1
        assert rows[0].target_id == pid(runtime)
        assert rows[0].actor.startswith("cl_")


class TestAuth:
    def test_no_credentials_401(self, client: TestClient, runtime: Runtime) -> None:
        r = client.get(f"/patients/{pid(runtime)}/timeline")
        assert r.status_code == 401
        r = client.get(f"/patients/{pid(runtime)}/timeline", headers={"Accept": FHIR})
        assert (r.status_code, r.json()["resourceType"]) == (401, "OperationOutcome")

    def test_wrong_secret_401(self, client: TestClient, runtime: Runtime) -> None:
        token = base64.b64encode(b"cl_nobody:wrong").decode()
        r = client.get("/patients", params={"identifier": "urn:mrn|M1"},
                       headers={"Authorization": f"Basic {token}"})
        assert r.status_code == 401

    def test_wrong_scope_403(self, client: TestClient, runtime: Runtime) -> None:
        headers = basic(runtime, "hl7.write")
        r = client.get(f"/patients/{pid(runtime)}/timeline", headers=headers)
        assert (r.status_code, r.json()["code"]) == (403, "insufficient_scope")
        r = client.get(f"/patients/{pid(runtime)}/outreach",
                       headers=basic(runtime, "timeline.read"))
        assert r.status_code == 403


class TestOutreach:
    def test_empty_until_the_outreach_stage(self, client: TestClient, auth: dict[str, str],
                                            runtime: Runtime) -> None:
        r = client.get(f"/patients/{pid(runtime)}/outreach", headers=auth)
        assert r.status_code == 200
        assert r.json() == {"patient_id": pid(runtime), "items": [], "next_cursor": None}
