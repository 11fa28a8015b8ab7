"""The patient's own page in headless Chromium on a phone (390x844), with JavaScript off: a
real uvicorn server, a real patient on SQLite, a stand-in scheduling service with free slots.
The patient opens their link, gives their date of birth, reads their page, chooses a new time
and sees it booked. Each page passes the accessibility check of test_browser.py.

Uses Debian's Chromium (/usr/bin/chromium) through Playwright: skipped when it is missing,
unless CARELOOP_REQUIRE_SERVICES=1. ``CARELOOP_SCREENSHOTS=1`` writes the phone screenshot in
docs/images/patient-home-phone.png.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from integration.runtime import Runtime
from tests.conftest import REPO
from tests.outreach.support import NY
from tests.portal.support import (
    FakeScheduling,
    Portal,
    add_care_plan,
    free_slot,
    portal_settings,
    self_service_app,
)
from tests.portal.test_browser import A11Y_CHECK, ARGS, _Server, chromium_path

__all__ = ["chromium_path"]

SCREENSHOT = REPO / "docs" / "images" / "patient-home-phone.png"


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Portal, str, FakeScheduling]]:
    runtime = Runtime(portal_settings(sqlite_url, tmp_path), with_mllp=False)
    portal = Portal(runtime.settings, runtime, tmp_path)
    tomorrow = datetime.now(NY).date() + timedelta(days=1)
    starts = [datetime.combine(tomorrow, time(9, 0), NY),
              datetime.combine(tomorrow, time(9, 30), NY),
              datetime.combine(tomorrow + timedelta(days=1), time(15, 0), NY)]
    fake = FakeScheduling(runtime.engine, [free_slot(s, ref=f"Slot/s{n}")
                                           for n, s in enumerate(starts)])
    runtime.scheduling = fake  # type: ignore[attr-defined]
    try:
        with _Server(self_service_app(runtime)) as base:
            yield portal, base, fake
    finally:
        runtime.engine.dispose()


def test_phone_date_of_birth_page_and_rebooking(
    served: tuple[Portal, str, FakeScheduling], chromium_path: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    portal, base, fake = served
    touch = portal.appointment(mrn="MRN5", lang="en^English^HL70296")
    portal.refill(mrn="MRN5")
    add_care_plan(portal.engine, touch.patient_id)
    url = portal.url(touch.patient_id, kind="p")
    wanted = fake.slots[1].start.astimezone(NY)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                java_script_enabled=False, locale="en-US", device_scale_factor=2,
            )
            page = context.new_page()

            # 1. The link opens the date-of-birth form; nothing about the patient yet.
            page.goto(base + url)
            expect(page.get_by_role("heading", level=1)).to_have_text("Confirm it is you")
            expect(page.locator("main")).not_to_contain_text("Check-up")
            assert page.evaluate(A11Y_CHECK) == []
            expect(page.get_by_role("group", name="Your date of birth")).to_be_visible()
            page.get_by_label("Month").select_option("1")
            page.get_by_label("Day").select_option("1")
            page.get_by_label("Year").select_option("1980")
            page.get_by_role("button", name="Open my page").click()

            # 2. The page: the appointment, the refill, the care-plan step, preferences.
            expect(page.get_by_role("heading", level=1)).to_have_text("Your page")
            main = page.locator("main")
            expect(main).to_contain_text("Tuesday, March 12, 2030")
            expect(main).to_contain_text("Main Street Clinic")
            expect(main).to_contain_text("Doxycycline 100 mg")
            expect(main).to_contain_text("Blood pressure check")
            expect(main).to_contain_text("Quiet hours")
            assert page.evaluate(A11Y_CHECK) == []
            cookies = {c["name"]: c for c in context.cookies()}
            assert cookies["careloop_portal"]["httpOnly"] is True
            assert cookies["careloop_portal"]["sameSite"] == "Strict"
            if os.environ.get("CARELOOP_SCREENSHOTS") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)

            # 3. Choose a new time: the free slots by day, in the patient's zone.
            page.get_by_role("link", name="Choose a new time").click()
            expect(page.get_by_role("heading", level=1)).to_have_text("Choose a new time")
            assert page.evaluate(A11Y_CHECK) == []
            day = wanted.strftime("%A, %B ") + str(wanted.day)
            group = page.get_by_role("group", name=f"{day}, {wanted.year}")
            expect(group).to_be_visible()
            group.get_by_label("9:30 AM to 10:00 AM").check()
            page.get_by_role("button", name="Book this time").click()

            # 4. The confirmation, then back to the page.
            expect(page.get_by_role("heading", level=1)).to_have_text("Your new time")
            expect(page.get_by_role("status")).to_contain_text(
                "Your appointment is booked for the new time.")
            expect(page.locator("main")).to_contain_text(day)
            expect(page.locator("main")).to_contain_text("9:30 AM")
            assert page.evaluate(A11Y_CHECK) == []
            page.get_by_role("link", name="Back to your page").click()
            expect(page.get_by_role("heading", level=1)).to_have_text("Your page")

            # 5. At 320 px wide nothing scrolls sideways, in Spanish either.
            page.set_viewport_size({"width": 320, "height": 640})
            page.goto(base + url + "?lang=es")
            expect(page.get_by_role("heading", level=1)).to_have_text("Su página")
            assert page.evaluate(A11Y_CHECK) == []
            context.close()
        finally:
            browser.close()

    assert fake.rebooked == [{"patient_id": touch.patient_id, "entry_id": touch.entry_id,
                              "slot": "Slot/s1", "source": "portal"}]
    assert wanted.astimezone(UTC) == fake.slots[1].start
