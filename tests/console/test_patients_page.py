"""The console's patient pages: the form (any role), a patient's page (PHI access only, every
view audited before the answer), merges followed, the timeline filtered and paged, sources
linked to their messages, and the patient's touches."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import OperationalError

from integration.db import write_lock
from integration.models import (
    audit_events,
    entry_sources,
    patient_identifiers,
    patient_merges,
    patients,
    timeline_entries,
    touches,
)
from integration.runtime import Runtime
from tests.console.test_overview import (
    NOW,
    PHONE,
    Clock,
    client,
    clock,
    runtime,
    sign_in,
    table,
    touch,
)

__all__ = ["client", "clock", "runtime"]  # fixtures shared from test_overview

MRN = "http://hospital.example.org/mrn"
SURVIVOR = "a" * 32
REPLACED = "b" * 32


def seed(engine: Engine) -> None:
    """A survivor with 30 entries (every third an observation) and a patient merged into it."""
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(patients), [
            {"id": SURVIVOR, "created_at": NOW - timedelta(days=30), "merged_into": None,
             "merged_at": None},
            {"id": REPLACED, "created_at": NOW - timedelta(days=40), "merged_into": SURVIVOR,
             "merged_at": NOW - timedelta(days=2)},
        ])
        conn.execute(insert(patient_identifiers), [
            {"system": MRN, "value": "123", "patient_id": SURVIVOR, "created_at": NOW},
            {"system": MRN, "value": "999", "patient_id": REPLACED, "created_at": NOW},
            {"system": "urn:careloop:ref:hl7v2:Patient", "value": "x1",
             "patient_id": SURVIVOR, "created_at": NOW},
        ])
        conn.execute(insert(patient_merges), [{
            "survivor_id": SURVIVOR, "replaced_id": REPLACED, "at": NOW - timedelta(days=2),
            "source_system": "hl7v2", "source_ref": "inbox/7#M7"}])
        entries = []
        for i in range(30):
            kind = "observation" if i % 3 == 0 else "appointment"
            entries.append({
                "id": f"e{i:02d}", "patient_id": SURVIVOR, "kind": kind,
                "status": "final" if kind == "observation" else "booked",
                "time": NOW - timedelta(days=i), "summary": f"{kind.title()} number {i}",
                "resource_type": "Observation" if kind == "observation" else "Appointment",
                "resource": {"resourceType": "Appointment", "id": f"r{i}"}, "ordinal": "x",
                "first_seen": NOW, "created_at": NOW, "updated_at": NOW})
        conn.execute(insert(timeline_entries), entries)
        conn.execute(insert(entry_sources), [
            {"entry_id": "e01", "system": "hl7v2", "connection": "LAB|HOSP",
             "ref": "inbox/42#MSG42", "version": "MSG42", "ordinal": "1",
             "received_at": NOW - timedelta(days=1)},
            {"entry_id": "e01", "system": "fhir", "connection": "ehr",
             "ref": "Appointment/7/_history/3", "version": "3", "ordinal": "2",
             "received_at": NOW - timedelta(hours=20)},
        ])
        conn.execute(insert(touches), [
            touch(1, "sent", sent=True, patient=SURVIVOR, delivery="delivered"),
            touch(2, "cancelled", patient=REPLACED, reason="the patient asked to cancel"),
        ])


def views(engine: Engine) -> list[tuple[str, str, str, str, Any]]:
    with engine.connect() as conn:
        return [(r.actor, r.action, r.target_type, r.target_id, r.detail) for r in conn.execute(
            select(audit_events).where(audit_events.c.action == "console.phi_view")
            .order_by(audit_events.c.id))]


def test_signed_out(client: TestClient) -> None:
    for path in ("/console/patients", f"/console/patients/{SURVIVOR}"):
        r = client.get(path)
        assert (r.status_code, r.headers["location"]) == (303, "/console/login")


def test_without_phi_the_form_but_no_patient(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "olga", "admin")  # even an admin needs PHI access
    form = client.get("/console/patients")
    assert form.status_code == 200
    assert 'id="open-by-identifier"' in form.text and "You do not have PHI" in form.text
    for path in (f"/console/patients/{SURVIVOR}", f"/console/patients?identifier={MRN}|123",
                 f"/console/patients?id={SURVIVOR}"):
        r = client.get(path)
        assert r.status_code == 403, path
        assert r.headers["content-type"].startswith("text/html")
        assert "Patient number" not in r.text and "123" not in r.text
    assert views(runtime.engine) == []


def test_a_view_is_audited_and_follows_the_merge(client: TestClient,
                                                 runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    r = client.get(f"/console/patients/{REPLACED}")
    assert r.status_code == 200
    page = r.text
    assert f'<span id="patient-id" class="id">{SURVIVOR}</span>' in page
    assert 'id="merged-notice"' in page
    assert views(runtime.engine) == [("pia", "console.phi_view", "patient", SURVIVOR,
                                      {"asked": REPLACED})]
    identifiers = page.split('id="identifiers"')[1].split("</table>")[0]
    assert re.findall(r"<tr><th scope=\"row\">(.*?)</th><td class=\"text\">(.*?)</td>",
                      identifiers) == [(MRN, "123"), (MRN, "999")]
    assert "urn:careloop:ref:" not in page
    assert table(page, "merged") == {REPLACED: [SURVIVOR, "2025-03-02 10:30"]}
    # touches of the survivor and of the patient merged into it; no address
    got = table(page, "touches")
    assert got["2"][:4] == ["reminder", "0", "sms", "cancelled"]
    assert got["2"][-1] == "the patient asked to cancel"
    assert got["1"][3] == "sent" and got["1"][6] == "delivered"
    assert PHONE not in page and "<script" not in page


def test_timeline_pages_filters_and_sources(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    first = client.get(f"/console/patients/{SURVIVOR}").text
    rows = table(first, "timeline")
    assert len(rows) == 25
    assert list(rows)[:2] == ["2025-03-04 10:30", "2025-03-03 10:30"]
    assert rows["2025-03-03 10:30"][:3] == ["appointment", "booked", "Appointment number 1"]
    assert '<a href="/console/messages/42">HL7 v2 message 42 (MSG42) from LAB|HOSP</a>' in first
    assert "FHIR Appointment/7/_history/3 from ehr" in first
    found = re.search(r'href="([^"]+)" id="timeline-next"', first)
    assert found
    second = client.get(found.group(1).replace("&amp;", "&")).text
    assert len(table(second, "timeline")) == 5
    assert 'id="timeline-next"' not in second and 'id="timeline-first"' in second
    only = client.get(f"/console/patients/{SURVIVOR}", params={"kind": "observation"}).text
    kinds = {cells[0] for cells in table(only, "timeline").values()}
    assert kinds == {"observation"} and len(table(only, "timeline")) == 10
    assert '<option value="observation" selected>' in only
    assert [v[4] for v in views(runtime.engine)] == [None, {"page": "later"},
                                                     {"kind": "observation"}]


def test_bad_filters(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    assert client.get(f"/console/patients/{SURVIVOR}",
                      params={"kind": "nonsense"}).status_code == 400
    r = client.get(f"/console/patients/{SURVIVOR}", params={"cursor": "forged"})
    assert r.status_code == 400 and "Patient number" not in r.text
    assert views(runtime.engine) == []


def test_open_by_id_or_identifier(client: TestClient, runtime: Runtime) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    r = client.get("/console/patients", params={"identifier": f"{MRN}|999"})
    assert (r.status_code, r.headers["location"]) == (303, f"/console/patients/{SURVIVOR}")
    r = client.get("/console/patients", params={"id": REPLACED})
    assert (r.status_code, r.headers["location"]) == (303, f"/console/patients/{REPLACED}")
    r = client.get("/console/patients", params={"identifier": f"{MRN}|12"})  # exact only
    assert r.status_code == 404 and "No patient has this identifier" in r.text
    r = client.get("/console/patients", params={"identifier": "123"})
    assert r.status_code == 400 and "system|value" in r.text
    assert views(runtime.engine) == []  # nothing seen yet


def test_unknown_patient(client: TestClient, runtime: Runtime) -> None:
    sign_in(client, runtime, "pia", phi=True)
    r = client.get("/console/patients/nobody")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert views(runtime.engine) == []


def test_no_view_without_its_audit_row(client: TestClient, runtime: Runtime,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)

    def broken(*_a: object, **_k: object) -> None:
        raise OperationalError("INSERT", {}, Exception("the database went away"))

    monkeypatch.setattr("integration.console.patients.record_view", broken)
    r = client.get(f"/console/patients/{SURVIVOR}")
    assert r.status_code == 503
    assert "Patient number" not in r.text and "123" not in r.text


def test_the_clock_is_the_audit_time(client: TestClient, runtime: Runtime,
                                     clock: Clock) -> None:
    seed(runtime.engine)
    sign_in(client, runtime, "pia", phi=True)
    clock.now = NOW + timedelta(minutes=3)
    client.get(f"/console/patients/{SURVIVOR}")
    with runtime.engine.connect() as conn:
        at = conn.execute(select(audit_events.c.at).where(
            audit_events.c.action == "console.phi_view")).scalar_one()
    assert at.replace(tzinfo=None) == (NOW + timedelta(minutes=3)).replace(tzinfo=None)
