"""Console users: creation (function and CLI), argon2id verification, the lockout, audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select

from integration.cli import main
from integration.console.users import (
    LOCK_FOR,
    MAX_FAILURES,
    UserExists,
    authenticate,
    create_user,
    disable_user,
    role_allows,
)
from integration.models import audit_events, console_users

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"


def _user(engine: Engine, name: str) -> object:
    with engine.connect() as conn:
        return conn.execute(select(console_users).where(
            console_users.c.username == name)).one()


def _audit(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(r.actor, r.action) for r in conn.execute(
            select(audit_events).order_by(audit_events.c.id))]


def test_create_hashes_with_argon2id(engine: Engine) -> None:
    assert create_user(engine, "alice", "viewer", PASSWORD, now=NOW) == PASSWORD
    row = _user(engine, "alice")
    assert row.password_hash.startswith("$argon2id$")  # type: ignore[attr-defined]
    assert PASSWORD not in row.password_hash  # type: ignore[attr-defined]
    assert (row.role, row.disabled, row.failed_logins) == ("viewer", False, 0)  # type: ignore[attr-defined]
    with pytest.raises(UserExists):
        create_user(engine, "alice", "admin", PASSWORD)
    with pytest.raises(ValueError, match="role"):
        create_user(engine, "bob", "root", PASSWORD)
    with pytest.raises(ValueError, match="12 characters"):
        create_user(engine, "bob", "viewer", "short")
    generated = create_user(engine, "carol", "operator")
    assert len(generated) >= 16
    assert authenticate(engine, "carol", generated, now=NOW).ok


def test_login_ok_and_wrong(engine: Engine) -> None:
    create_user(engine, "alice", "operator", PASSWORD, now=NOW)
    ok = authenticate(engine, "alice", PASSWORD, now=NOW)
    assert ok.ok and ok.person is not None
    assert (ok.person.username, ok.person.role) == ("alice", "operator")
    assert _user(engine, "alice").last_login_at is not None  # type: ignore[attr-defined]
    wrong = authenticate(engine, "alice", "not the password", now=NOW)
    unknown = authenticate(engine, "nobody", PASSWORD, now=NOW)
    assert wrong == unknown
    assert not wrong.ok and wrong.person is None
    assert _audit(engine)[-3:] == [("alice", "console.login"), ("alice", "console.login_failed"),
                                   ("nobody", "console.login_failed")]
    with engine.connect() as conn:
        details = " ".join(str(r.detail) for r in conn.execute(select(audit_events)))
    assert PASSWORD not in details and "not the password" not in details


def test_lockout_after_five_and_unlock_after_fifteen_minutes(engine: Engine) -> None:
    create_user(engine, "alice", "viewer", PASSWORD, now=NOW)
    for i in range(MAX_FAILURES - 1):
        assert not authenticate(engine, "alice", f"wrong {i}", now=NOW).ok
    # A right password before the fifth failure resets the count.
    assert authenticate(engine, "alice", PASSWORD, now=NOW).ok
    for i in range(MAX_FAILURES):
        assert not authenticate(engine, "alice", f"wrong {i}", now=NOW).ok
    assert _user(engine, "alice").locked_until is not None  # type: ignore[attr-defined]
    # Locked: even the right password is refused, with the same answer.
    assert authenticate(engine, "alice", PASSWORD, now=NOW + timedelta(minutes=14)) == \
        authenticate(engine, "nobody", PASSWORD, now=NOW)
    assert authenticate(engine, "alice", PASSWORD, now=NOW + LOCK_FOR).ok
    assert _user(engine, "alice").failed_logins == 0  # type: ignore[attr-defined]


def test_disabled_user_is_refused(engine: Engine) -> None:
    create_user(engine, "alice", "admin", PASSWORD, now=NOW)
    assert disable_user(engine, "alice")
    assert not disable_user(engine, "nobody")
    assert not authenticate(engine, "alice", PASSWORD, now=NOW).ok


def test_roles() -> None:
    assert role_allows("admin", "operator") and role_allows("operator", "viewer")
    assert role_allows("viewer", "viewer")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")
    assert not role_allows("root", "viewer")


def test_cli_create_and_disable(db_url: str, engine: Engine,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARELOOP_CONFIG", raising=False)
    monkeypatch.setenv("CARELOOP_DATABASE_URL", db_url)
    monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
    runner = CliRunner()

    made = runner.invoke(main, ["users", "create", "dana", "--role", "operator"])
    assert made.exit_code == 0, made.output
    password = next(line.split()[1] for line in made.output.splitlines()
                    if line.startswith("password:"))
    assert authenticate(engine, "dana", password, now=NOW).ok

    given = runner.invoke(main, ["users", "create", "erin", "--role", "viewer",
                                 "--password-stdin"], input=PASSWORD + "\n")
    assert given.exit_code == 0, given.output
    assert PASSWORD not in given.output
    assert authenticate(engine, "erin", PASSWORD, now=NOW).ok

    again = runner.invoke(main, ["users", "create", "erin", "--role", "viewer"])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = runner.invoke(main, ["users", "create", "fay", "--role", "root"])
    assert bad.exit_code == 2

    off = runner.invoke(main, ["users", "disable", "erin"])
    assert off.exit_code == 0 and "disabled" in off.output
    assert not authenticate(engine, "erin", PASSWORD, now=NOW).ok
    assert runner.invoke(main, ["users", "disable", "nobody"]).exit_code == 1


def test_first_admin_only_on_an_empty_table(engine: Engine) -> None:
    """``careloop serve`` on a first start makes ``admin`` and shows its password once."""
    from integration.console.users import authenticate, first_admin

    password = first_admin(engine)
    assert password and len(password) >= 12
    assert first_admin(engine) is None  # a restart: nothing new, nothing shown
    login = authenticate(engine, "admin", password)
    assert login.ok and login.person is not None and login.person.role == "admin"
