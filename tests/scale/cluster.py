"""Real processes for the scale test and ``bench/bench_workers.py``: a private Redis, a scratch
PostgreSQL database, ``careloop serve`` replicas, ``careloop worker`` processes and one
``careloop beat``, all on free ports, each with its own log file.

Every process is started in its own session (process group), so that a kill reaches what it
started in turn (Celery's prefork children) and nothing else; :meth:`Cluster.close` stops
everything still running, and is meant for a ``finally`` block.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = [
    "CARELOOP",
    "REDIS_SERVER",
    "Cluster",
    "Proc",
    "Replica",
    "ScratchDatabase",
    "free_ports",
]

CARELOOP = str(Path(sys.executable).parent / "careloop")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nothing listens on right now (all bound at once, then freed)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _tcp_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


class Proc:
    """One child process (and its process group) with a log file that survives restarts."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path,
                 ready: Callable[[Proc], bool] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.log = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self._ready = ready
        self._log_offset = 0

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Proc:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts + 1}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.starts += 1
        if self._ready is not None:
            deadline = time.monotonic() + timeout
            while not self._ready(self):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while "
                                       f"starting:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n"
                                       f"{self.tail()}")
                time.sleep(0.1)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group is ours: start_new_session made it

    def kill(self) -> None:
        """SIGKILL the process and everything in its group (a crash, not a shutdown)."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.kills += 1
        with self.log.open("ab") as out:
            out.write(b"--- SIGKILL (test)\n")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s; the group is killed at the end either way
        (an orphaned prefork child must not outlive the test)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    # -- logs ------------------------------------------------------------------------------------
    def text_since_start(self) -> str:
        try:
            with self.log.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        try:
            content = self.log.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return f"[{self.name}: no log]"
        body = "\n".join("    | " + line[:400] for line in content[-lines:])
        return f"--- {self.name} ({self.log}), last {min(lines, len(content))} lines:\n{body}"


class Replica(Proc):
    """A ``careloop serve`` process: its HTTP and MLLP ports stay the same across restarts."""

    http_port = 0
    mllp_port = 0

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


class ScratchDatabase:
    """A fresh PostgreSQL database on the server of ``server_url``, dropped by :meth:`drop`."""

    def __init__(self, server_url: str, prefix: str) -> None:
        self.server_url = server_url
        self.name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.url = make_url(server_url).set(database=self.name).render_as_string(
            hide_password=False)
        self.created = False

    def create(self) -> ScratchDatabase:
        admin = create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.name}"'))
            self.created = True
        finally:
            admin.dispose()
        return self

    def upgrade(self, env: Mapping[str, str], cwd: Path) -> None:
        """``careloop db upgrade`` against this database, as an operator would run it."""
        done = subprocess.run([CARELOOP, "db", "upgrade"], env={**env,
                              "CARELOOP_DATABASE_URL": self.url}, cwd=cwd,
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"careloop db upgrade failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")

    def drop(self) -> None:
        if not self.created:
            return
        admin = create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.created = False
        finally:
            admin.dispose()


def _redis_ready(port: int) -> Callable[[Proc], bool]:
    def ready(_: Proc) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False
    return ready


def _serve_ready(http_port: int, mllp_port: int) -> Callable[[Proc], bool]:
    def ready(proc: Proc) -> bool:
        return "careloop is running" in proc.text_since_start() and _tcp_open(
            http_port) and _tcp_open(mllp_port)
    return ready


def _worker_ready(proc: Proc) -> bool:
    return re.search(r"\bready\.", proc.text_since_start()) is not None


def _beat_ready(proc: Proc) -> bool:
    return "beat: Starting" in proc.text_since_start()


class Cluster:
    """The processes of one deployment on this machine; ``close()`` stops them all."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.procs: list[Proc] = []

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def redis(self, port: int) -> Proc:
        argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
        return self._add(Proc("redis", argv, env=os.environ, cwd=self.workdir,
                              ready=_redis_ready(port)))

    def serve(self, name: str, http_port: int, mllp_port: int) -> Replica:
        argv = [CARELOOP, "serve", "--no-upgrade", "--port", str(http_port),
                "--mllp-port", str(mllp_port)]
        replica = Replica(name, argv, env=self.env, cwd=self.workdir,
                          ready=_serve_ready(http_port, mllp_port))
        replica.http_port, replica.mllp_port = http_port, mllp_port
        self._add(replica)
        return replica

    def worker(self, name: str, queues: str, concurrency: int = 1) -> Proc:
        argv = [CARELOOP, "worker", "--queues", queues, "--concurrency", str(concurrency)]
        return self._add(Proc(name, argv, env=self.env, cwd=self.workdir, ready=_worker_ready))

    def beat(self) -> Proc:
        argv = [CARELOOP, "beat", "--schedule", str(self.workdir / "beat-schedule")]
        return self._add(Proc("beat", argv, env=self.env, cwd=self.workdir, ready=_beat_ready))

    def tails(self, lines: int = 30) -> str:
        return "\n".join(p.tail(lines) for p in self.procs)

    def close(self) -> None:
        """Stop every process (careloop first, Redis last); never raises."""
        for proc in sorted(self.procs, key=lambda p: p.name == "redis"):
            with contextlib.suppress(Exception):
                proc.stop()
