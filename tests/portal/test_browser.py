"""The patient page in headless Chromium on a phone, with JavaScript off: a real uvicorn
server, real touches on SQLite, and the patient's taps: confirm, ask to cancel, answer the
survey. Also a quick accessibility check in the browser.

Uses Debian's Chromium (/usr/bin/chromium) through Playwright: skipped when it is missing,
unless CARELOOP_REQUIRE_SERVICES=1. ``CARELOOP_SCREENSHOTS=1`` writes the phone screenshot in
docs/images/portal-phone.png.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import select

from integration.models import channel_events, ehr_outbox, patient_requests, touches
from integration.runtime import Runtime
from tests.conftest import REPO, _missing
from tests.portal.support import Portal, portal_app, portal_settings

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO / "docs" / "images" / "portal-phone.png"

A11Y_CHECK = """() => {
  const problems = [];
  const controls = document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button');
  for (const el of controls) {
    const named = (el.labels && el.labels.length > 0 && el.labels[0].textContent.trim())
      || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
      || (el.tagName === 'BUTTON' && el.textContent.trim());
    if (!named) problems.push('no name: ' + (el.id || el.name || el.tagName));
    if (el.type === 'radio') {
      const fs = el.closest('fieldset');
      if (!fs || !fs.querySelector('legend')) problems.push('radio outside a fieldset: ' + el.id);
    }
  }
  for (const b of document.querySelectorAll('button, a.button')) {
    if (b.getBoundingClientRect().height < 44) problems.push('small target: ' + b.textContent);
  }
  if (!document.documentElement.lang) problems.push('no lang');
  if (document.querySelectorAll('h1').length !== 1) problems.push('not one h1');
  if (!document.querySelector('main')) problems.push('no main');
  if (!document.querySelector('[role=status]')) problems.push('no status region');
  if (!document.querySelector('meta[name=viewport]')) problems.push('no viewport');
  if (document.documentElement.scrollWidth > window.innerWidth)
    problems.push('scrolls sideways: ' + document.documentElement.scrollWidth);
  if (document.querySelectorAll('script').length) problems.push('has scripts');
  return problems;
}"""


@pytest.fixture
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        _missing("Chromium", f"{CHROMIUM} not found")
    return CHROMIUM


class _Server:
    def __init__(self, app: Any, port: int = 0) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="portal-uvicorn",
                                       daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Portal, str]]:
    runtime = Runtime(portal_settings(sqlite_url, tmp_path), with_mllp=False)
    portal = Portal(runtime.settings, runtime, tmp_path)
    try:
        with _Server(portal_app(runtime)) as base:
            yield portal, base
    finally:
        runtime.engine.dispose()


def _requests(portal: Portal) -> list[Any]:
    with portal.engine.connect() as conn:
        return list(conn.execute(select(patient_requests).order_by(patient_requests.c.id)))


def test_phone_without_javascript(served: tuple[Portal, str], chromium_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    portal, base = served
    first = portal.appointment(mrn="MRN2", lang="en^English^HL70296", filler="F2")
    second = portal.appointment(mrn="MRN3", lang="en^English^HL70296", filler="F3")
    survey = portal.discharge()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                java_script_enabled=False, locale="en-US", device_scale_factor=2,
            )
            page = context.new_page()

            # 1. The appointment: read it, check it, confirm it.
            page.goto(base + portal.url(first.id))
            expect(page.get_by_role("heading", level=1)).to_have_text("Your appointment")
            expect(page.locator("main")).to_contain_text("Tuesday, March 12, 2030")
            expect(page.locator("main")).to_contain_text("Main Street Clinic")
            expect(page.locator("main")).to_contain_text("Check-up")
            assert page.evaluate(A11Y_CHECK) == []
            if os.environ.get("CARELOOP_SCREENSHOTS") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            page.get_by_role("button", name="Confirm").click()
            expect(page.get_by_role("status")).to_have_text(
                "Done: Thank you. Your appointment is confirmed.")
            expect(page.locator("main")).to_contain_text("Confirmed")
            assert page.url.endswith("?done=confirm")

            # 2. Another appointment: ask to cancel.
            page.goto(base + portal.url(second.id))
            page.get_by_role("button", name="Ask to cancel").click()
            expect(page.get_by_role("status")).to_contain_text(
                "We have your request to cancel.")
            expect(page.locator("main")).to_contain_text("You asked to cancel")

            # 3. The survey: 9 out of 10, with a comment.
            page.goto(base + portal.url(survey.id))
            expect(page.get_by_role("heading", level=1)).to_have_text("How was your visit?")
            assert page.evaluate(A11Y_CHECK) == []
            expect(page.get_by_role("group", name="How likely are you to recommend us to a "
                                    "friend or family member?")).to_be_visible()
            page.get_by_label("9", exact=True).check()
            page.get_by_label("Anything else you would like to tell us? (optional)").fill(
                "Quick and kind.")
            page.get_by_role("button", name="Send my answer").click()
            expect(page.get_by_role("status")).to_have_text("Done: Thank you for your answer.")

            # 4. At 320 px wide nothing scrolls sideways; the Spanish page reads as Spanish.
            page.set_viewport_size({"width": 320, "height": 640})
            page.goto(base + portal.url(first.id) + "?lang=es")
            expect(page.get_by_role("heading", level=1)).to_have_text("Su cita")
            assert page.evaluate("() => document.documentElement.lang") == "es"
            assert page.evaluate(A11Y_CHECK) == []
            context.close()
        finally:
            browser.close()

    requests = _requests(portal)
    assert [(r.entry_id, r.action, r.source) for r in requests] == [
        (first.entry_id, "confirm", "portal"),
        (second.entry_id, "cancel", "portal"),
        (survey.entry_id, "survey", "portal"),
    ]
    assert requests[2].detail == {"score": 9, "comment": "Quick and kind."}
    with portal.engine.connect() as conn:
        events = conn.execute(select(channel_events.c.id, channel_events.c.provider_id)
                              .order_by(channel_events.c.id)).all()
        left = conn.execute(select(touches.c.status).where(
            touches.c.entry_id == second.entry_id)).scalars().all()
        replies = conn.execute(select(ehr_outbox.c.key)).scalars().all()
    assert [e.provider_id.split(":")[:2] for e in events] == [
        [str(first.id), "confirm"], [str(second.id), "cancel"], [str(survey.id), "survey"]]
    assert set(left) == {"cancelled"}
    assert [k for k in replies if k.startswith("reply-")] == [f"reply-{events[2].id}"]
