"""Fixtures for the patient page: a runtime on SQLite or PostgreSQL and a client for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from integration.runtime import Runtime
from tests.portal.support import Portal, portal_app, portal_settings


@pytest.fixture
def portal(db_url: str, tmp_path: Path) -> Iterator[Portal]:
    runtime = Runtime(portal_settings(db_url, tmp_path), with_mllp=False)
    yield Portal(runtime.settings, runtime, tmp_path)
    runtime.engine.dispose()


@pytest.fixture
def client(portal: Portal) -> Iterator[TestClient]:
    with TestClient(portal_app(portal.runtime), follow_redirects=False) as c:
        yield c
