"""Schemathesis against the OpenAPI schema of a running server: no 5xx, whatever it sends."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings

from integration.api import create_app
from integration.runtime import Runtime
from tests.helpers import settings_for


@pytest.fixture(params=["disabled", "required"])
def base_url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    """A real uvicorn server on a free port, in its own thread and event loop."""
    runtime = Runtime(
        settings_for(sqlite_url, auth=request.param, inprocess_worker=False), with_mllp=False
    )
    config = uvicorn.Config(create_app(runtime), host="127.0.0.1", port=0, log_config=None,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    runtime.engine.dispose()


def test_no_server_errors(base_url: str) -> None:
    """Generated requests for every operation get 2xx/4xx answers, never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    calls: dict[str, int] = {}

    def fuzz(operation: Any) -> None:
        label = operation.label

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=10)
            calls[label] = calls.get(label, 0) + 1
            assert response.status_code < 500, (
                case.method, case.formatted_path, response.status_code, response.text[:300]
            )

        check()

    for operation in operations:
        fuzz(operation)
    # every operation was really exercised; those with inputs many times
    assert len(calls) == len(operations), calls
    assert calls["POST /hl7v2"] >= 5 and calls["POST /oauth/token"] >= 5, calls
