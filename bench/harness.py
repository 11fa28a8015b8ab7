"""What the end-to-end benchmarks share: free ports, percentiles, the stand-in EHR installed
outside pytest, and ``careloop serve`` run as a subprocess on a SQLite file until ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CARELOOP = str(Path(sys.executable).parent / "careloop")

__all__ = ["CARELOOP", "Serve", "free_port", "install_ehr", "pct", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Factory:
    def __init__(self, base: Path) -> None:
        self.base = base

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name, dir=self.base))


def install_ehr(work: Path) -> Path:
    """A private, installed copy of ../shared/ehr (``npm ci``), as the tests make it."""
    sys.path.insert(0, str(ROOT))
    from tests.e2e import ehr

    try:
        return ehr.install(_Factory(work))  # type: ignore[arg-type]
    except BaseException as exc:  # pytest.skip/fail outside pytest: say it plainly
        raise SystemExit(f"the stand-in EHR cannot be installed: {exc}") from None


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    log: Path
    port: int
    env: dict[str, str]
    db: Path


@contextmanager
def serve(work: Path, config: str, *, mllp_port: int = 0,
          env: Mapping[str, str] | None = None) -> Iterator[Serve]:
    """``careloop serve`` on SQLite under ``work`` with ``config`` as its TOML file, ready when
    yielded; the log's tail is printed if the body fails; stopped on exit."""
    port = free_port()
    cfg = work / "careloop.toml"
    cfg.write_text(config)
    db = work / "careloop.db"
    full = {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}
    full.update(CARELOOP_CONFIG=str(cfg), CARELOOP_DATABASE_URL=f"sqlite:///{db}",
                CARELOOP_BASE_URL=f"http://127.0.0.1:{port}", CARELOOP_AUTH="disabled",
                CARELOOP_LOG_LEVEL="info", CARELOOP_LOG_FORMAT="json")
    full.update(env or {})
    log = work / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [CARELOOP, "serve", "--port", str(port), "--mllp-port", str(mllp_port)],
            env=full, cwd=work, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready").is_success:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("careloop serve did not start:\n" + log.read_text())
            time.sleep(0.1)
        yield Serve(proc, log, port, full, db)
    except BaseException:
        print("careloop serve log (tail):\n" + log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
