"""Polling cursors: overlap window, de-duplication by version, cursor on the server clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.fhir import FHIRRequest
from subscriptions import PollCursor, advance, changes_in, poll_flow, poll_request, run_flow
from tests.subscriptions.fake_api import FakeApi, appt, searchset

BASE = "http://127.0.0.1:8090/fhir/R4"


class TestRequests:
    def test_first_poll_without_cursor_uses_start(self) -> None:
        """No cursor yet: `start` bounds the first poll; sorted by _lastUpdated."""
        request = poll_request(PollCursor("Appointment"),
                               start=datetime(2024, 3, 5, 9, 0, tzinfo=UTC), page_size=50)
        assert request == FHIRRequest("GET", "Appointment", (
            ("_lastUpdated", "gt2024-03-05T09:00:00.000Z"), ("_sort", "_lastUpdated"),
            ("_count", "50")))

    def test_cursor_minus_overlap(self) -> None:
        """The next poll starts `overlap` before the cursor, in UTC."""
        cursor = PollCursor("CarePlan", "2024-03-05T12:00:00.500+02:00")
        request = poll_request(cursor, overlap=timedelta(seconds=30))
        assert dict(request.params)["_lastUpdated"] == "gt2024-03-05T09:59:30.500Z"

    def test_history_mode(self) -> None:
        """history=True reads Type/_history?_since= (deletes included)."""
        request = poll_request(PollCursor("Appointment", "2024-03-05T10:00:00Z"),
                               overlap=timedelta(0), history=True)
        assert request.path == "Appointment/_history"
        assert dict(request.params)["_since"] == "2024-03-05T10:00:00.000Z"


class TestAdvance:
    def test_versions_seen_in_the_overlap_are_dropped(self) -> None:
        """Same (type, id, version) twice: reported once; a new version is reported."""
        first = advance(PollCursor("Appointment"), changes_in(searchset([
            appt("a", "2024-03-05T10:00:00Z"), appt("b", "2024-03-05T10:01:00Z")])))
        assert first.cursor.since == "2024-03-05T10:01:00Z"
        second = advance(first.cursor, changes_in(searchset([
            appt("b", "2024-03-05T10:01:00Z"), appt("a", "2024-03-05T10:02:00Z", "2")])))
        assert [(c.id, c.version) for c in second.changes] == [("a", "2")]
        assert second.cursor.since == "2024-03-05T10:02:00Z"

    def test_a_late_commit_below_the_cursor_is_still_reported(self) -> None:
        """A version with lastUpdated just under the cursor (committed late) is new: reported,
        and the cursor does not go back."""
        cursor = advance(PollCursor("Appointment"), changes_in(searchset([
            appt("a", "2024-03-05T10:05:00Z")]))).cursor
        late = advance(cursor, changes_in(searchset([appt("c", "2024-03-05T10:04:30Z")])))
        assert [c.id for c in late.changes] == ["c"]
        assert late.cursor.since == "2024-03-05T10:05:00Z"

    def test_only_keys_inside_the_window_are_kept(self) -> None:
        """Old keys are forgotten once the cursor is past them by more than the overlap."""
        cursor = advance(PollCursor("Appointment"), changes_in(searchset([
            appt("old", "2024-03-05T09:00:00Z"), appt("new", "2024-03-05T10:00:00Z")])),
            overlap=timedelta(minutes=2)).cursor
        assert {k[1] for k in cursor.seen} == {"new"}

    def test_cursor_json_round_trip(self) -> None:
        """The cursor survives a database row."""
        cursor = advance(PollCursor("Appointment"), changes_in(searchset([
            appt("a", "2024-03-05T10:00:00Z")]))).cursor
        again = PollCursor.from_json(json.loads(json.dumps(cursor.to_json())))
        assert again == cursor and again.seen_at == cursor.seen_at

    def test_history_deletes_are_changes(self) -> None:
        """A history entry with DELETE and no resource is a deleted change."""
        bundle = {"resourceType": "Bundle", "type": "history", "entry": [{
            "fullUrl": f"{BASE}/Appointment/a", "request": {"method": "DELETE",
                                                           "url": "Appointment/a"},
            "response": {"status": "200", "etag": 'W/"v3"',
                         "lastModified": "2024-03-05T10:00:00Z"}}]}
        (change,) = changes_in(bundle)
        assert change.deleted and change.key == ("Appointment", "a", "v3")


class TestPollFlow:
    async def test_pages_are_followed_and_deduplicated(self) -> None:
        """A poll over two pages, run twice: the second run reports only the new version."""
        state: dict[str, Any] = {"round": 1}

        def handler(request: FHIRRequest, params: dict[str, str]) -> Any:
            if params.get("page") == "2":
                return searchset([appt("b", "2024-03-05T10:01:00Z")])
            extra = [appt("c", "2024-03-05T10:03:00Z")] if state["round"] == 2 else []
            return searchset([appt("a", "2024-03-05T10:00:00Z"), *extra],
                             f"{BASE}/Appointment?page=2")
        api = FakeApi(handler)
        first = await run_flow(poll_flow(PollCursor("Appointment")), api)
        assert [c.id for c in first.changes] == ["a", "b"]
        state["round"] = 2
        second = await run_flow(poll_flow(first.cursor, overlap=timedelta(hours=1)), api)
        assert [c.id for c in second.changes] == ["c"]
        assert second.cursor.since == "2024-03-05T10:03:00Z"
