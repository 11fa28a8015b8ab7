"""Run ``careloop`` as real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.fhir.keys import SigningKey, generate_signing_key
from tests.e2e.ehr import install, running_ehr

CARELOOP = str(Path(sys.executable).parent / "careloop")


class Serve:
    """A ``careloop serve`` process on free ports; ``mllp`` and ``http`` once it is up."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.mllp: tuple[str, int] = ("", 0)
        self.http = ""
        self.log = cwd / "serve.log"

    def start(self, timeout: float = 30.0) -> Serve:
        with self.log.open("a") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [CARELOOP, "serve", "--port", "0", "--mllp-port", "0"],
                env=self.env, cwd=self.cwd, stdout=out, stderr=out, text=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            chunks = text.split("careloop is running")
            if len(chunks) > self._starts + 1:
                last = chunks[-1]
                m = re.search(r"MLLP\s+([\d.]+):(\d+)", last)
                h = re.search(r"API\s+(http://\S+)", last)
                if m and h:
                    self._starts += 1
                    self.mllp = (m.group(1), int(m.group(2)))
                    self.http = h.group(1)
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"careloop serve exited:\n{text[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"careloop serve did not start:\n{self.log.read_text()[-3000:]}")

    _starts = 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def base_env(db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}
    env.update(
        CARELOOP_DATABASE_URL=db_url,
        CARELOOP_AUTH="disabled",
        CARELOOP_LOG_LEVEL="warning",
        CARELOOP_STALE_AFTER_S="1",
        CARELOOP_SWEEP_INTERVAL_S="0.5",
    )
    return env


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[type[Serve]]:
    started: list[Serve] = []

    class _Serve(Serve):
        def __init__(self, env: dict[str, str]) -> None:
            super().__init__(env, tmp_path)
            started.append(self)

    yield _Serve
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """careloop's SMART signing key, registered with the module's EHR."""
    return generate_signing_key("ES384")


@pytest.fixture(scope="module")
def ehr_origin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               key: SigningKey) -> Iterator[str]:
    """One stand-in EHR per test module (auth required, careloop registered by its JWKS); a
    module's ``EHR_ENV`` dict adds settings (e.g. ``EHR_NOTIFY_RETRIES``)."""
    harness = install(tmp_path_factory)
    folder = tmp_path_factory.mktemp(f"ehr-{request.module.__name__.rsplit('.', 1)[-1]}")
    env: dict[str, str] = getattr(request.module, "EHR_ENV", {})
    with running_ehr(harness, key, folder, **env) as origin:
        yield origin
