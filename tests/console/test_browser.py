"""The console in headless Chromium, at a desktop and a phone viewport, against a real uvicorn
server with the in-process worker on SQLite.

The story an integration analyst lives: a feed from a sender nobody registered fails (the
service holds unregistered senders); they sign in, find the failed message, register the
sender, replay the message and watch it processed, then open the patient's timeline. A viewer
sees the same message but no replay button and no patient data, and a forged form without the
CSRF token is refused and changes nothing.

Uses Debian's Chromium (/usr/bin/chromium) through Playwright: skipped when it is missing,
unless CARELOOP_REQUIRE_SERVICES=1. ``CARELOOP_SCREENSHOTS=1`` writes the screenshots in
docs/images/console-*.png.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from integration.api import create_app
from integration.console.users import create_user
from integration.models import audit_events, inbox
from integration.runtime import Runtime
from tests.conftest import REPO
from tests.helpers import adt, settings_for
from tests.portal.test_browser import ARGS, _Server, chromium_path

__all__ = ["chromium_path"]

PASSWORD = "correct horse battery"
IMAGES = REPO / "docs" / "images"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

CHECK = """() => {
  const problems = [];
  for (const el of document.querySelectorAll(
      'input:not([type=hidden]), select, textarea, button')) {
    const named = (el.labels && el.labels.length > 0 && el.labels[0].textContent.trim())
      || el.getAttribute('aria-label') || (el.tagName === 'BUTTON' && el.textContent.trim());
    if (!named) problems.push('no name: ' + (el.id || el.name || el.tagName));
  }
  if (document.querySelectorAll('h1').length !== 1) problems.push('not one h1');
  if (!document.querySelector('main')) problems.push('no main');
  if (document.querySelectorAll('script').length) problems.push('has scripts');
  if (document.documentElement.scrollWidth > window.innerWidth + 1)
    problems.push('scrolls sideways: ' + document.documentElement.scrollWidth);
  return problems;
}"""


def _message(control_id: str) -> bytes:
    """An ADT^A04 from NEWLAB|NORTH, a sender no one registered."""
    text = adt(control_id).decode()
    fields = text.split("|")
    fields[2], fields[3] = "NEWLAB", "NORTH"
    return "|".join(fields).encode()


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Runtime, str]]:
    settings = settings_for(sqlite_url, hl7_unregistered_senders="hold", auth="disabled",
                            inprocess_worker=True)
    runtime = Runtime(settings, with_mllp=False)
    create_user(runtime.engine, "ana", "admin", PASSWORD, phi=True)
    create_user(runtime.engine, "vic", "viewer", PASSWORD)
    try:
        with _Server(create_app(runtime)) as base:
            yield runtime, base
    finally:
        runtime.engine.dispose()


def _status(runtime: Runtime, inbox_id: int) -> str:
    with runtime.engine.connect() as conn:
        return str(conn.execute(select(inbox.c.status).where(inbox.c.id == inbox_id))
                   .scalar_one())


def _send(base: str, body: bytes) -> None:
    import httpx

    r = httpx.post(base + "/hl7v2", content=body,
                   headers={"Content-Type": "application/hl7-v2"}, timeout=10)
    assert r.status_code == 200, r.text


def _sign_in(page: Any, base: str, username: str) -> None:
    page.goto(base + "/console")
    assert page.url.endswith("/console/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/console/?$"))


def _shot(page: Any, name: str) -> None:
    if os.environ.get("CARELOOP_SCREENSHOTS") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / f"console-{name}.png"), full_page=True)


def _wait_processed(page: Any, runtime: Runtime, inbox_id: int) -> None:
    from playwright.sync_api import expect

    for _ in range(60):
        if _status(runtime, inbox_id) == "processed":
            break
        page.wait_for_timeout(250)
    page.reload()
    expect(page.locator("#status")).to_contain_text("processed")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_fix_a_failed_feed_and_replay(served: tuple[Runtime, str], chromium_path: Path,
                                      viewport: dict[str, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    runtime, base = served
    _send(base, _message("FEED1"))
    with runtime.engine.connect() as conn:
        inbox_id = int(conn.execute(select(inbox.c.id).where(
            inbox.c.control_id == "FEED1")).scalar_one())
    for _ in range(60):  # the in-process worker fails it: the sender is not registered
        if _status(runtime, inbox_id) == "failed":
            break
        import time

        time.sleep(0.1)
    assert _status(runtime, inbox_id) == "failed"
    desktop = viewport == DESKTOP

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        try:
            context = browser.new_context(viewport=viewport, is_mobile=not desktop,
                                          java_script_enabled=False, locale="en-US")
            page = context.new_page()
            _sign_in(page, base, "ana")
            expect(page.locator("#fig-errors")).to_contain_text("1")
            assert page.evaluate(CHECK) == []
            if desktop:
                _shot(page, "overview")

            # Find the failed message.
            page.get_by_role("link", name="Messages", exact=True).click()
            page.get_by_label("Status").select_option("failed")
            page.get_by_role("button", name="Filter").click()
            rows = page.locator("#messages tbody tr")
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("FEED1")
            assert page.evaluate(CHECK) == []
            if desktop:
                _shot(page, "messages")
            rows.first.get_by_role("link", name=str(inbox_id)).click()
            expect(page.locator("main")).to_contain_text("is not registered")
            expect(page.locator("#raw")).to_contain_text("NEWLAB")
            assert page.evaluate(CHECK) == []
            if desktop:
                _shot(page, "message")

            # Fix the sender's setting: register it.
            page.get_by_role("link", name="Senders", exact=True).click()
            page.get_by_role("link", name="Register this sender").first.click()
            expect(page.get_by_label("Application")).to_have_value("NEWLAB")
            page.get_by_label("Time zone").fill("America/Chicago")
            page.get_by_role("button", name="Save").click()
            expect(page.locator("main")).to_contain_text("America/Chicago")
            if desktop:
                _shot(page, "senders")

            # Replay it and see it processed.
            page.goto(f"{base}/console/messages/{inbox_id}")
            page.locator("#replay").click()
            _wait_processed(page, runtime, inbox_id)
            if desktop:
                _shot(page, "message-processed")

            # Open the patient's timeline from the message.
            page.locator("#entries a[href^='/console/patients/']").first.click()
            expect(page.locator("#timeline tbody tr")).not_to_have_count(0)
            assert page.evaluate(CHECK) == []
            if desktop:
                _shot(page, "patient")
            context.close()
        finally:
            browser.close()

    with runtime.engine.connect() as conn:
        actions = set(conn.execute(select(audit_events.c.action).where(
            audit_events.c.actor == "ana")).scalars())
    assert {"console.login", "console.sender_saved", "console.replay",
            "console.phi_view"} <= actions


def test_viewer_cannot_replay_or_forge(served: tuple[Runtime, str],
                                       chromium_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    runtime, base = served
    _send(base, _message("FEED2"))
    with runtime.engine.connect() as conn:
        inbox_id = int(conn.execute(select(inbox.c.id).where(
            inbox.c.control_id == "FEED2")).scalar_one())

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        try:
            context = browser.new_context(viewport=PHONE, is_mobile=True,
                                          java_script_enabled=False)
            page = context.new_page()
            _sign_in(page, base, "vic")
            page.goto(f"{base}/console/messages/{inbox_id}")
            expect(page.locator("main")).to_contain_text("FEED2")
            expect(page.locator("#replay")).to_have_count(0)
            expect(page.locator("#raw")).to_have_count(0)
            expect(page.locator("main")).to_contain_text("Patient data is hidden")
            # The replay form posted anyway, with the viewer's own cookie: refused.
            r = page.request.post(f"{base}/console/messages/{inbox_id}/replay",
                                  form={"csrf": "forged"}, max_redirects=0)
            assert r.status == 403
            context.close()

            # An operator's session, and a form posted without its CSRF token.
            create_user(runtime.engine, "olga", "operator", PASSWORD)
            context = browser.new_context(viewport=DESKTOP, java_script_enabled=False)
            page = context.new_page()
            _sign_in(page, base, "olga")
            before = _status(runtime, inbox_id)
            r = page.request.post(f"{base}/console/messages/{inbox_id}/replay", form={},
                                  max_redirects=0)
            assert r.status == 403 and "security token" in r.text()
            assert _status(runtime, inbox_id) == before
            context.close()
        finally:
            browser.close()
