"""Operations metrics: how long each EHR subscription has been silent (against its heartbeat),
and write-back outcomes, on /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert

from integration.api import create_app
from integration.db import write_lock
from integration.metrics import count_writeback
from integration.models import fhir_subscriptions
from integration.runtime import Runtime
from tests.helpers import settings_for

CONNECTIONS = [
    {"name": "main-ehr", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
     "mode": "backport", "heartbeat_s": 60, "write_back": False,
     "topics": {"Appointment": "http://example.org/topics/appointment-change",
                "CarePlan": "http://example.org/topics/careplan-change",
                "MedicationRequest": "http://example.org/topics/medicationrequest-change"}},
    {"name": "polled", "fhir_base": "http://other.invalid/fhir", "client_id": "careloop",
     "mode": "poll", "write_back": False},
]


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="disabled", inprocess_worker=False,
                              connections=CONNECTIONS), with_mllp=False)
    yield rt
    rt.engine.dispose()


def _subscription(runtime: Runtime, connection: str, mode: str, heard: datetime | None) -> None:
    with write_lock(runtime.engine), runtime.engine.begin() as conn:
        conn.execute(insert(fhir_subscriptions).values(
            connection=connection, resource_type="Appointment", mode=mode,
            last_heartbeat_at=heard, updated_at=datetime.now(UTC)))


def test_subscription_silence(runtime: Runtime) -> None:
    _subscription(runtime, "main-ehr", "backport", datetime.now(UTC) - timedelta(seconds=300))
    _subscription(runtime, "polled", "poll", None)
    ((connection, resource_type, age, heartbeat),) = runtime._subscription_silence()
    assert (connection, resource_type, heartbeat) == ("main-ehr", "Appointment", 60.0)
    assert age is not None and 299 <= age < 330
    with TestClient(create_app(runtime)) as client:
        text = client.get("/metrics").text
    assert 'careloop_subscription_heartbeat_seconds{connection="main-ehr",' in text
    assert 'careloop_subscription_silence_seconds{connection="main-ehr",' in text
    assert 'connection="polled"' not in text


def test_writeback_counter_labels_are_bounded(runtime: Runtime) -> None:
    count_writeback("Communication", "written")
    count_writeback("Patient/123", "whatever")  # never a free-form label
    with TestClient(create_app(runtime)) as client:
        text = client.get("/metrics").text
    assert 'careloop_writeback_total{resource_type="Communication",status="written"}' in text
    assert 'careloop_writeback_total{resource_type="other",status="other"}' in text
    assert "Patient/123" not in text
