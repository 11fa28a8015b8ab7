"""OpenID Connect sign-in in Chromium, across sites: careloop at ``127.0.0.1``, the identity
provider at ``localhost`` (another site, as a hospital's provider is). The session cookie is
SameSite=Strict, so a browser does not send it on the redirect chain that started at the
provider; the callback's own page moves on to ``/console`` and the person lands signed in.

Uses Debian's Chromium through Playwright (see tests/portal/test_browser.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.api import create_app
from integration.console.oidc import CALLBACK_PATH
from integration.runtime import Runtime
from tests.console.test_oidc import CLIENT_ID, CLIENT_SECRET, ROLE_MAP, FakeIdP, idp, provider
from tests.helpers import settings_for
from tests.portal.test_browser import ARGS, _Server, chromium_path

__all__ = ["chromium_path", "idp", "provider"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cross_site(idp: FakeIdP, sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, Runtime]]:
    loopback = idp.issuer
    idp.issuer = loopback.replace("127.0.0.1", "localhost")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    idp.redirect_uri = base + CALLBACK_PATH
    settings = settings_for(
        sqlite_url, auth="required", inprocess_worker=False, base_url=base,
        keys_dir=tmp_path / "keys", http_port=port,
        console_oidc={"issuer": idp.issuer, "client_id": CLIENT_ID,
                      "client_secret": CLIENT_SECRET, "name": "St Elsewhere sign-in",
                      "role_map": dict(ROLE_MAP)})
    runtime = Runtime(settings, with_mllp=False)
    try:
        with _Server(create_app(runtime), port=port) as served:
            assert served == base
            yield base, runtime
    finally:
        idp.issuer = loopback
        runtime.engine.dispose()


def test_sign_in_with_the_hospital_provider(cross_site: tuple[str, Runtime],
                                            chromium_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, _runtime = cross_site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        try:
            page = browser.new_context(java_script_enabled=False).new_page()
            page.goto(base + "/console/login")
            page.get_by_role("link", name="Sign in with St Elsewhere sign-in").click()
            page.wait_for_url(base + "/console", timeout=15_000)
            expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
            expect(page.locator("header")).to_contain_text("dana (operator)")
        finally:
            browser.close()
