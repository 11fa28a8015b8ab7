"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import CARELOOP, Serve, base_env
from tests.helpers import adt

pytestmark = pytest.mark.slow


def run(args: list[str], env: dict[str, str], cwd: Path, stdin: bytes | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CARELOOP, *args], env=env, cwd=cwd, capture_output=True, text=True,
        input=stdin.decode() if stdin else None, timeout=60, check=False,
    )


def test_send_list_show_replay(sqlite_url: str, tmp_path: Path,
                               serve_factory: type[Serve]) -> None:
    """`hl7 send` prints each ACK; `inbox list/show` find the messages; `replay` reprocesses
    failed ones."""
    env = base_env(sqlite_url)
    server = serve_factory(env).start()
    msgs = tmp_path / "msgs.hl7"
    msgs.write_bytes(adt("CLI1").replace(b"\r", b"\n") + adt("CLI2", trigger="A99"))
    host, port = server.mllp
    sent = run(["hl7", "send", str(msgs), "--to", f"{host}:{port}"], env, tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.count("MSA|AA|") == 2

    bad = tmp_path / "bad.hl7"
    bad.write_bytes(adt("CLI3", pid=False))
    sent_bad = run(["hl7", "send", str(bad), "--to", f"{host}:{port}"], env, tmp_path)
    assert sent_bad.returncode == 1
    assert "MSA|AE|CLI3" in sent_bad.stdout

    server.stop()
    listed = run(["inbox", "list"], env, tmp_path)
    assert listed.returncode == 0
    assert "CLI1" in listed.stdout and "CLI3" in listed.stdout
    assert "Doe" not in listed.stdout  # no PHI in the listing

    failed = run(["inbox", "list", "--status", "failed"], env, tmp_path)
    assert "CLI2" in failed.stdout and "unsupported message type ADT^A99" in failed.stdout

    shown = run(["inbox", "show", "1"], env, tmp_path)
    assert "PID|1||123^^^MRN||Doe^Jane" in shown.stdout
    assert "ack sent:" in shown.stdout

    replayed = run(["replay", "--status", "failed"], env, tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert "2 failed" in replayed.stdout


def test_bad_setting_exits_2_with_one_line(tmp_path: Path, sqlite_url: str) -> None:
    env = base_env(sqlite_url) | {"CARELOOP_MLLP_PORT": "abc"}
    result = run(["inbox", "list"], env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "CARELOOP_MLLP_PORT" in result.stderr


def test_unreachable_database_exits_3(tmp_path: Path) -> None:
    env = base_env("postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = run(["inbox", "list"], env, tmp_path)
    assert result.returncode == 3
    assert "cannot be reached" in result.stderr


def test_clients_create_prints_secret_once(tmp_path: Path, sqlite_url: str) -> None:
    env = base_env(sqlite_url)
    result = run(["clients", "create", "engine", "--scopes", "hl7.write"], env, tmp_path)
    assert result.returncode == 0
    assert "client_id: cl_" in result.stdout and "secret:" in result.stdout
    several = run(["clients", "create", "app", "--scopes", "timeline.read", "outreach.read"],
                  env, tmp_path)
    assert several.returncode == 0, several.stderr
    wrong = run(["clients", "create", "x", "--scopes", "everything"], env, tmp_path)
    assert wrong.returncode == 2 and "unknown scope" in wrong.stderr


def test_send_to_nobody_exits_3(tmp_path: Path) -> None:
    msgs = tmp_path / "m.hl7"
    msgs.write_bytes(adt("X"))
    result = run(["hl7", "send", str(msgs), "--to", "127.0.0.1:1"], {}, tmp_path)
    assert result.returncode == 3


def test_hl7_convert_bundle_per_message(tmp_path: Path) -> None:
    """`hl7 convert` prints one collection Bundle per message; a bad message gets one line on
    stderr and exit 1, the good ones still print."""
    import json

    msgs = tmp_path / "two.hl7"
    msgs.write_bytes(adt("CV1") + adt("CV2").replace(b"ADT^A01^ADT_A01", b"MFN^M02"))
    env = base_env("sqlite:///unused.db")
    result = run(["hl7", "convert", "--ndjson", str(msgs)], env, tmp_path)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    bundle = json.loads(lines[0])
    assert bundle["type"] == "collection"
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} >= {"Patient", "Encounter"}
    assert result.stderr.strip() == f"{msgs}#2: MSH-9: unsupported message type MFN^M02"

    stdin = run(["hl7", "convert", "-"], env, tmp_path, stdin=adt("CV3"))
    assert stdin.returncode == 0
    assert json.loads(stdin.stdout)["identifier"]["value"] == "CV3"


def test_clients_create_with_jwks(tmp_path: Path, sqlite_url: str) -> None:
    """A key-pair client gets no secret; a JWKS holding a private key is refused."""
    import json

    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    public = tmp_path / "public.jwks"
    public.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    private = tmp_path / "private.jwks"
    private.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    env = base_env(sqlite_url)
    ok = run(["clients", "create", "backend", "--scopes", "timeline.read", "--jwks", str(public)],
             env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "private_key_jwt" in ok.stdout and "secret:" not in ok.stdout
    bad = run(["clients", "create", "x", "--scopes", "timeline.read", "--jwks", str(private)],
              env, tmp_path)
    assert bad.returncode == 2 and "private key" in bad.stderr


def test_broken_template_stops_the_start(tmp_path: Path, sqlite_url: str) -> None:
    """A pathway naming a template with a syntax error: serve exits 2 naming file and line."""
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "bad.en.j2").write_text("{% block sms %}{{ oops {% endblock %}")
    cfg = tmp_path / "careloop.toml"
    cfg.write_text(
        f'[outreach]\ntemplates_dir = "{folder}"\nlanguages = ["en"]\n'
        '[[pathways]]\nname = "p"\non = "appointment"\n'
        'steps = [ { at = "-P1D", channel = "sms", template = "bad" } ]\n'
    )
    env = base_env(sqlite_url) | {"CARELOOP_CONFIG": str(cfg)}
    result = run(["serve", "--port", "0", "--mllp-port", "0"], env, tmp_path)
    assert result.returncode == 2
    assert "bad.en.j2:" in result.stderr


def test_keys_generate_rotate_remove(tmp_path: Path, sqlite_url: str) -> None:
    """Generated keys are published; a second key keeps the first published; remove drops it."""
    import json
    import stat

    env = base_env(sqlite_url) | {"CARELOOP_KEYS_DIR": str(tmp_path / "keys")}
    first = run(["keys", "generate"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    pem = tmp_path / "keys" / "careloop.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    second = run(["keys", "generate", "--alg", "RS384"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    published = json.loads((tmp_path / "keys" / "jwks.json").read_text())["keys"]
    assert [k["alg"] for k in published] == ["RS384", "ES384"]
    assert all("d" not in k for k in published)
    old_kid = published[1]["kid"]
    assert run(["keys", "remove", old_kid], env, tmp_path).returncode == 0
    left = json.loads((tmp_path / "keys" / "jwks.json").read_text())["keys"]
    assert [k["kid"] for k in left] == [published[0]["kid"]]
    assert run(["keys", "remove", old_kid], env, tmp_path).returncode == 1


def test_worker_queues_checked_and_timeline_alias(tmp_path: Path, sqlite_url: str) -> None:
    """`worker --queues`: an unknown name exits 2 with one line naming it (before any broker
    is needed); `timeline` is the intake queue, as --help says."""
    from integration.tasks import resolve_queues

    env = base_env(sqlite_url)  # no CARELOOP_BROKER_URL: the name is checked first
    bad = run(["worker", "-Q", "intake,timline"], env, tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "unknown queue 'timline'" in bad.stderr and "timeline (= intake)" in bad.stderr

    shown = run(["worker", "--help"], env, tmp_path)
    assert "'timeline' is another name for intake" in " ".join(shown.stdout.split())

    assert resolve_queues("timeline") == ["intake"]
    assert resolve_queues("intake, Timeline,outreach,writeback,fhir") == [
        "intake", "outreach", "writeback", "fhir"]
