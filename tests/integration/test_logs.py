"""No PHI in logs: only allow-listed keys reach the output."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from integration.logs import configure_logging, get_logger
from integration.runtime import Runtime
from tests.helpers import adt, settings_for


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging("warning", "console")


class TestAllowList:
    def test_unlisted_keys_dropped(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A name or phone number passed by mistake never reaches the output."""
        configure_logging("info", "json")
        get_logger("t").info("message_stored", inbox_id=7, patient_name="Doe^Jane",
                             phone="555-0100")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["event"] == "message_stored"
        assert line["inbox_id"] == 7
        assert "patient_name" not in line and "phone" not in line
        assert line["dropped_keys"] == 2

    async def test_intake_logs_carry_no_message_text(
        self, sqlite_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Storing, rejecting and failing messages logs ids and codes, never content."""
        configure_logging("info", "json")
        rt = Runtime(settings_for(sqlite_url, inprocess_worker=False, log_level="info"),
                     with_mllp=False)
        await rt.start()
        try:
            await rt.receive_body(adt("L1"), "mllp", "p")
            await rt.receive_body(adt("L1"), "mllp", "p")
            await rt.receive_body(b"PID|1||SECRET-MRN^^^X||Doe^Jane", "mllp", "p")
        finally:
            await rt.stop()
            rt.engine.dispose()
        out = capsys.readouterr().err
        events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
        assert {"message_stored", "message_duplicate", "message_rejected"} <= set(events)
        for secret in ("Doe", "Jane", "SECRET-MRN", "19800101"):
            assert secret not in out
