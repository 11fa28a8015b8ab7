"""The stand-in EHR (../shared/ehr) for end-to-end tests: install once per session, start
with SMART Backend Services required and careloop's client registered by its JWKS.

Helpers rather than fixtures, so that several test modules share one installation
(``npm ci`` runs once per session whichever module asks first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapters.fhir import SigningKey, jwks

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(os.environ.get("CARELOOP_EHR_HARNESS", REPO.parent / "shared" / "ehr"))
REQUIRE = os.environ.get("CARELOOP_REQUIRE_SERVICES") == "1"
CLIENT_ID = "careloop"
APPOINTMENT_TOPIC = "http://example.org/topics/appointment-change"

_installed: dict[str, Path] = {}


def unavailable(why: str) -> None:
    if REQUIRE:
        pytest.fail(f"{why}; CARELOOP_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(why)


def install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private, installed copy of the harness (its folder may be read-only)."""
    if "dir" in _installed:
        return _installed["dir"]
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        unavailable("node and npm are needed for the stand-in EHR")
    if not (HARNESS / "server.mjs").is_file():
        unavailable(f"stand-in EHR not found at {HARNESS}")
    target = tmp_path_factory.mktemp("ehr") / "ehr"
    shutil.copytree(HARNESS, target, ignore=shutil.ignore_patterns("node_modules"))
    result = subprocess.run([npm or "npm", "ci", "--no-audit", "--no-fund"], cwd=target,
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        unavailable(f"npm ci failed for the stand-in EHR: {result.stderr[-500:]}")
    _installed["dir"] = target
    return target


@contextmanager
def running_ehr(harness: Path, key: SigningKey, folder: Path,
                **env: str) -> Iterator[str]:
    """The EHR on a free loopback port, auth required; yields its origin."""
    clients = folder / "clients.json"
    clients.write_text(json.dumps([{"client_id": CLIENT_ID, "jwks": jwks([key]),
                                    "scopes": "system/*.*"}]))
    full_env = {**os.environ, "EHR_PORT": "0", "EHR_REQUIRE_AUTH": "1",
                "EHR_CLIENTS_FILE": str(clients), "EHR_QUIET": "1", **env}
    log = folder / "ehr.log"
    with log.open("w") as out:
        proc = subprocess.Popen([shutil.which("node") or "node", "server.mjs"], cwd=harness,
                                env=full_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
            if m:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stand-in EHR did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
