"""What the console's page tests share: a settable clock, reading the CSRF token of a page,
and signing a new user in."""

from __future__ import annotations

import re
from datetime import datetime

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from integration.console.users import create_user

PASSWORD = "correct horse battery"


class Clock:
    """The console's time (``app.state.console_clock``), moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def csrf_of(page: str) -> str:
    """The CSRF token in a page's first form."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def sign_in(client: TestClient, engine: Engine, username: str, role: str = "viewer", *,
            phi: bool = False) -> str:
    """Create the user and sign ``client`` in as them; returns the session's CSRF token."""
    create_user(engine, username, role, PASSWORD, phi=phi)
    form = client.get("/console/login")
    r = client.post("/console/login", data={"username": username, "password": PASSWORD,
                                            "csrf": csrf_of(form.text)})
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/console").text)


def signed_in(app: FastAPI, username: str, role: str, *, phi: bool = False) -> tuple[
        TestClient, str]:
    """A new client signed in as a new user, and the session's CSRF token."""
    client = TestClient(app, follow_redirects=False)
    return client, sign_in(client, app.state.runtime.engine, username, role, phi=phi)
