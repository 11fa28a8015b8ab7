"""Durable MLLP intake benchmark (issue 4): careloop beside servers that store nothing.

    python bench/bench_intake.py [--seconds 6] [--conns 1,16] [--only NAME,...] [--strict]

In one run, for each connection count, the same load (bench/mllp_load.py, in its own process so
it does not share an interpreter with the server) is sent to:

* ``python-hl7``    python-hl7's asyncio MLLP server, full parse + ``create_ack`` (no storage)
* ``medplum``       Medplum's Node ``Hl7Server`` + ``buildAck()`` (no storage)
* ``bare-asyncio``  a bare asyncio framer acking from MSH alone (no storage): the Python ceiling
* ``careloop-sqlite``      ``careloop serve`` on SQLite (WAL, synchronous=FULL)
* ``careloop-postgresql``  ``careloop serve`` on PostgreSQL (skipped when it is unreachable)
* ``careloop-*-intake``    the same with ``CARELOOP_INPROCESS_WORKER=false``: intake alone, as an
  API/MLLP replica whose processing runs in Celery workers elsewhere (the default ``serve`` also
  converts, validates and upserts every message on the same two cores)

careloop acknowledges a message only once its inbox row is committed, so after each careloop
measurement the inbox is counted: rows stored during the run must equal ACKs received.

Prints a table and the issue's targets as pass/fail, and writes everything, with the machine it
ran on, to bench/results/intake.json. Exit status: 0 when every run completed, 2 when a server
could not be measured, 1 with ``--strict`` when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / "peers"
MEDPLUM_DIR = PEERS / "medplum"
LOAD = BENCH / "mllp_load.py"
HOST = "127.0.0.1"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BENCH_DB = "careloop_bench"
SERVERS = (
    "python-hl7",
    "medplum",
    "bare-asyncio",
    "careloop-sqlite",
    "careloop-postgresql",
    "careloop-sqlite-intake",
    "careloop-postgresql-intake",
)
CARELOOP_SERVERS = tuple(s for s in SERVERS if s.startswith("careloop-"))

# Targets from issue 4, as ratios measured in the same run.
TARGET_VS_PYHL7_16 = 5.0
TARGET_VS_PYHL7_1 = 2.0
TARGET_VS_MEDPLUM_16 = 0.5
TARGET_P99_MS_16 = 10.0


class BenchError(Exception):
    """A server could not be started or measured; the message says why."""


class Skip(Exception):
    """A server is left out of this run (missing Node, unreachable PostgreSQL)."""


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Server:
    """A child process we started, its log, and the MLLP port it listens on."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    stop_signal: int = signal.SIGTERM
    extra: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + line for line in text[-lines:])


def _spawn(
    name: str, argv: list[str], log: Path, *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # Own session, so that stopping it reaches anything it starts in turn (and only that).
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> str:
    """Stop a child we started and its process group: ``sig`` first, SIGKILL after ``grace``.

    Returns how it ended, for the report.
    """
    if proc.poll() is not None:
        return f"had exited ({proc.returncode})"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the group is ours: start_new_session made it
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        return f"still running {grace:g} s after {signal.Signals(sig).name}: killed"
    return f"stopped ({proc.returncode})"


@contextlib.contextmanager
def _running(server: Server, grace: float = 10.0) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.extra["stop"] = _stop(server.proc, server.stop_signal, grace)


def _wait_listening_line(server: Server, timeout: float = 30.0) -> int:
    """The port from the peer's ``listening 127.0.0.1:<port>`` line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in server.log.read_text(errors="replace").splitlines():
                if line.startswith("listening "):
                    return int(line.rsplit(":", 1)[1])
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.proc.returncode} before listening\n"
                + server.log_tail()
            )
        time.sleep(0.05)
    raise BenchError(f"{server.name} printed no 'listening' line in {timeout:g} s")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_tcp(server: Server, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.proc.returncode}\n" + server.log_tail()
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{server.name}: nothing accepts connections on {HOST}:{port}")


def _cpu_ticks(root: int) -> int:
    """utime + stime of a process and all its descendants, in clock ticks (Linux /proc)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(child for child, ppid in parent.items() if ppid == pid)
    return total


# -- one measurement -----------------------------------------------------------------------------


def measure(server: Server, conns: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run mllp_load.py in its own process against ``server`` and return its figures."""
    argv = [
        sys.executable,
        str(LOAD),
        "--host",
        HOST,
        "--port",
        str(server.port),
        "--conns",
        str(conns),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--ack-timeout",
        str(args.ack_timeout),
        "--json",
    ]
    hz = os.sysconf("SC_CLK_TCK")
    cpu0, t0 = _cpu_ticks(server.proc.pid), time.monotonic()
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=args.warmup + args.seconds + args.ack_timeout + 30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"load generator did not finish against {server.name}") from exc
    cpu, wall = (_cpu_ticks(server.proc.pid) - cpu0) / hz, time.monotonic() - t0
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        err = done.stderr.decode(errors="replace").strip()[-800:]
        raise BenchError(f"load generator gave no result (exit {done.returncode}): {err}") from exc
    if "fatal" in result:
        raise BenchError(f"load generator against {server.name}: {result['fatal']}")
    result["server"] = server.name
    result["server_cpu_pct"] = round(100.0 * cpu / wall, 1)
    if result["error_count"] or result["rejected"]:
        # Keep the server's side of the story next to the results.
        kept = args.out.parent / f"{server.name}-{conns}conn-server.log"
        shutil.copyfile(server.log, kept)
        args.notes.append(f"{server.name}, {conns} conns: load errors; server log in {kept}")
    return result


# -- the servers ---------------------------------------------------------------------------------


def _start_peer(name: str, argv: list[str], cwd: Path, tmp: Path) -> Server:
    log = tmp / f"{name}.log"
    server = Server(name, _spawn(name, argv, log, cwd=cwd), log)
    try:
        server.port = _wait_listening_line(server)
    except BaseException:
        _stop(server.proc)
        raise
    return server


def _ensure_medplum() -> str:
    """Install the Medplum peer's pinned packages when node_modules is missing; node's path."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        raise Skip("node is not on PATH (Medplum's Hl7Server runs on Node >= 20.19)")
    if not (MEDPLUM_DIR / "node_modules" / "@medplum" / "hl7" / "package.json").exists():
        if npm is None:
            raise Skip("npm is not on PATH, and bench/peers/medplum/node_modules is missing")
        has_lock = (MEDPLUM_DIR / "package-lock.json").exists()
        cmd = [npm, "ci" if has_lock else "install", "--no-audit", "--no-fund", "--loglevel=error"]
        print(f"  installing the Medplum peer: {' '.join(cmd[1:])} in {MEDPLUM_DIR}", flush=True)
        try:
            done = subprocess.run(
                cmd, cwd=MEDPLUM_DIR, capture_output=True, timeout=300, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError("npm did not finish installing @medplum/hl7 in 300 s") from exc
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-800:]
            raise BenchError(f"npm failed ({done.returncode}) installing @medplum/hl7: {err}")
    return node


def _peer_argv(name: str) -> tuple[list[str], Path]:
    if name == "python-hl7":
        return [sys.executable, str(PEERS / "python_hl7_server.py"), "0"], REPO
    if name == "bare-asyncio":
        return [sys.executable, str(PEERS / "bare_asyncio.py"), "0"], REPO
    if name == "medplum":
        return [_ensure_medplum(), "server.mjs", "0"], MEDPLUM_DIR
    raise ValueError(name)


def run_peer(name: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    argv, cwd = _peer_argv(name)
    results = []
    with _running(_start_peer(name, argv, cwd, tmp), grace=5) as server:
        for conns in args.conns:
            results.append(measure(server, conns, args))
            _print_row(results[-1])
    return results


def _careloop_command() -> tuple[list[str], dict[str, str]]:
    """How to run careloop: the venv's console script, else the module from this checkout."""
    script = Path(sys.executable).parent / "careloop"
    if script.exists():
        return [str(script)], {}
    if (REPO / "integration" / "cli.py").exists():
        return [sys.executable, "-m", "integration.cli"], {"PYTHONPATH": str(REPO)}
    raise BenchError(
        f"careloop is not installed: no {script} and no integration/cli.py "
        f"(install it into this venv: {sys.executable} -m pip install -e {REPO})"
    )


def _careloop_env(database_url: str, extra: dict[str, str]) -> dict[str, str]:
    # Inherited CARELOOP_* settings (a broker URL, a config file) would change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARELOOP_")}
    env.update(extra)
    env.update(
        {
            "CARELOOP_DATABASE_URL": database_url,
            "CARELOOP_AUTH": "disabled",
            "CARELOOP_LOG_LEVEL": "warning",
        }
    )
    return env


def _wait_ready(server: Server, http_port: int, timeout: float = 30.0) -> None:
    url = f"http://{HOST}:{http_port}/health/ready"
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"careloop serve exited with {server.proc.returncode} before it was ready\n"
                + server.log_tail()
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{url} not ready after {timeout:g} s ({last})\n" + server.log_tail())


@dataclass
class Backend:
    """Where careloop stores: the URL it gets, and how the bench counts inbox rows there."""

    name: str
    url: str
    count_rows: Callable[[], int]
    cleanup: Callable[[], None] = lambda: None


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def _sqlite_backend(tmp: Path, notes: list[str], name: str = "careloop-sqlite") -> Backend:
    path = tmp / f"{name}.db"
    fstype = _filesystem(tmp)
    if fstype in ("tmpfs", "ramfs"):
        # fsync on a RAM disk costs nothing: the figures would not be those of a durable server.
        note = f"SQLite file on {fstype} ({tmp}): synchronous=FULL is free there; set TMPDIR"
        print(f"  warning: {note}", flush=True)
        notes.append(note)

    def count() -> int:
        con = sqlite3.connect(path, timeout=30)
        try:
            return int(con.execute("select count(*) from inbox").fetchone()[0])
        finally:
            con.close()

    return Backend(name, f"sqlite:///{path}", count)


def _libpq_url(sqlalchemy_url: str) -> str:
    parts = urlsplit(sqlalchemy_url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+")[0]))


def _postgres_backend(admin_url: str) -> Backend:
    """Create a fresh ``careloop_bench`` database next to the one ``admin_url`` names."""
    try:
        import psycopg
    except ImportError as exc:
        raise Skip(f"psycopg is not installed in {sys.executable}") from exc
    admin = _libpq_url(admin_url)
    parts = urlsplit(admin_url)
    bench_url = urlunsplit(parts._replace(path=f"/{BENCH_DB}"))

    def drop(conn: Any) -> None:
        try:
            conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        except psycopg.errors.SyntaxError:  # PostgreSQL < 13
            conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")

    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            drop(conn)
            conn.execute(f"CREATE DATABASE {BENCH_DB}")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"{parts.hostname}:{parts.port or 5432}"
        raise Skip(f"PostgreSQL unreachable at {where}: {first}") from exc

    def count() -> int:
        with psycopg.connect(_libpq_url(bench_url), connect_timeout=5) as conn:
            row = conn.execute("select count(*) from inbox").fetchone()
            return int(row[0]) if row else 0

    def cleanup() -> None:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            drop(conn)

    return Backend("careloop-postgresql", bench_url, count, cleanup)


def run_careloop(backend: Backend, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    cmd, extra_env = _careloop_command()
    if backend.name.endswith("-intake"):
        extra_env = {**extra_env, "CARELOOP_INPROCESS_WORKER": "false"}
    env = _careloop_env(backend.url, extra_env)
    workdir = tmp / backend.name
    workdir.mkdir(exist_ok=True)
    upgrade_log = tmp / f"{backend.name}-upgrade.log"
    try:
        done = subprocess.run(
            [*cmd, "db", "upgrade"],
            cwd=workdir,
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError("careloop db upgrade did not finish in 120 s") from exc
    upgrade_log.write_bytes(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).decode(errors="replace").strip()[-1200:]
        raise BenchError(f"careloop db upgrade failed ({done.returncode}):\n{tail}")

    http_port, mllp_port = _free_ports(2)
    serve = [*cmd, "serve", "--host", HOST, "--port", str(http_port)]
    serve += ["--mllp-port", str(mllp_port)]
    stop_signal = signal.SIGTERM
    py_spy = _py_spy() if args.profile else None
    if args.profile and py_spy is None:
        # No py-spy: pyinstrument around the whole process. It sees the event-loop thread only,
        # and writes its report when the program ends normally, which uvicorn does on SIGINT.
        report = args.out.parent / f"profile-{backend.name}.txt"
        profiler = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(report)]
        # The console script is a file pyinstrument can run; "python -m x" becomes "-m x".
        serve = [*profiler, *(serve[1:] if serve[0] == sys.executable else serve)]
        stop_signal = signal.SIGINT
        print(f"  py-spy not found: profiling with pyinstrument into {report}", flush=True)
    log = tmp / f"{backend.name}.log"
    server = Server(backend.name, _spawn(backend.name, serve, log, cwd=workdir, env=env), log)
    server.stop_signal = stop_signal
    server.port = mllp_port
    results = []
    with _running(server, grace=20):
        _wait_ready(server, http_port)
        _wait_tcp(server, mllp_port, timeout=10)
        for conns in args.conns:
            before = backend.count_rows()
            notes: list[str] = []
            recording = (
                _recording(py_spy, server, conns, args, notes)
                if py_spy is not None
                else contextlib.nullcontext()
            )
            with recording:
                result = measure(server, conns, args)
            # The ACK promises the row is committed: nothing may be missing once ACKs are in.
            result["inbox_rows"] = backend.count_rows() - before
            result["durable"] = _durable(result)
            result["profiled"] = bool(args.profile)
            results.append(result)
            _print_row(result)
            for note in notes:
                print("    " + note, flush=True)
    if "killed" in server.extra.get("stop", "") or server.proc.returncode not in (
        0,
        -signal.SIGTERM,
        -signal.SIGINT,
        128 + signal.SIGTERM,
    ):
        note = f"careloop serve ({backend.name}): {server.extra.get('stop')}"
        print(f"  note: {note}\n{server.log_tail(8)}", flush=True)
        args.notes.append(note)
    return results


def _durable(r: dict[str, Any]) -> bool:
    """No acknowledged message missing: rows == ACKs, or, when connections broke with messages
    in flight, ACKs <= rows <= sent (an unanswered message may or may not have been stored)."""
    if r["sent"] == r["acked"]:
        return bool(r["inbox_rows"] == r["acked"])
    return bool(r["acked"] <= r["inbox_rows"] <= r["sent"])


# -- profiling (--profile) -----------------------------------------------------------------------

_LINE_NO = re.compile(r":\d+\)$")
_OURS = ("integration/", "adapters/", "mappings/", "subscriptions/")


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(local) if local.exists() else None)


@contextlib.contextmanager
def _recording(
    py_spy: str, server: Server, conns: int, args: argparse.Namespace, notes: list[str]
) -> Iterator[None]:
    """Sample every thread of the server with py-spy while the load runs; summary in notes."""
    raw = args.out.parent / f"profile-{server.name}-{conns}conn.collapsed"
    duration = max(1, round(args.warmup + args.seconds))
    argv = [py_spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--nonblocking"]
    argv += ["--rate", "250", "--duration", str(duration), "--format", "raw", "-o", str(raw)]
    log = raw.with_suffix(".log")
    spy = _spawn("py-spy", argv, log, cwd=BENCH)
    try:
        yield
        try:
            spy.wait(duration + 30)
        except subprocess.TimeoutExpired:
            notes.append("py-spy did not finish; profile left out")
    finally:
        _stop(spy, signal.SIGINT, grace=10)
    if raw.exists() and raw.stat().st_size:
        summary = _summarise(raw)
        raw.with_suffix(".txt").write_text(summary + "\n")
        notes.append(f"profile ({raw.with_suffix('.txt').name}):")
        notes += ["  " + line for line in summary.splitlines()[:16]]
    else:
        notes.append(f"py-spy recorded nothing: {log.read_text(errors='replace').strip()[-300:]}")


def _summarise(raw: Path, top: int = 12) -> str:
    """Self time per function and inclusive time per careloop function, from collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_LINE_NO.sub(")", frame) for frame in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    out = [f"{total} samples of busy threads (py-spy, 250 Hz); self time:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    out.append("inclusive time, careloop code:")
    ours = [(f, n) for f, n in inclusive.most_common() if any(p in f for p in _OURS)]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in ours[: top * 2]]
    return "\n".join(out)


# -- report --------------------------------------------------------------------------------------

_HEADER = (
    f"{'server':<21} {'conns':>5} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'srv cpu':>8} {'gen cpu':>8}  stored/acked"
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_row(r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    stored = ""
    if "inbox_rows" in r:
        rows, acked = r["inbox_rows"], r["acked"]
        mark = "ok" if r["durable"] else ("MISSING" if rows < acked else "MISMATCH")
        if r["durable"] and rows > acked:
            mark += f" (+{rows - acked} unanswered)"
        stored = f"{rows}/{acked} {mark}"
    if r.get("error_count") or r.get("rejected"):
        stored += f"  ({r['rejected']} rejected, {r['error_count']} errors: {r['errors'][:1]})"
    print(
        f"{r['server']:<21} {r['conns']:>5} {r['msg_per_s']:>9,.0f} {_ms(lat['p50']):>8} "
        f"{_ms(lat['p99']):>8} {r['server_cpu_pct']:>7.0f}% {r['generator_cpu_pct']:>7.0f}%  "
        f"{stored}",
        flush=True,
    )


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["server"], r["conns"]): r for r in results}
    out: list[dict[str, Any]] = []

    def ratio(name: str, server: str, peer: str, conns: int, target: float) -> None:
        a, b = by.get((server, conns)), by.get((peer, conns))
        if a is None or b is None or not b["msg_per_s"]:
            return
        value = a["msg_per_s"] / b["msg_per_s"]
        out.append(
            {
                "target": name,
                "server": server,
                "value": round(value, 2),
                "goal": f">= {target}",
                "pass": value >= target,
            }
        )

    for server in CARELOOP_SERVERS:
        ratio("msg/s vs python-hl7, 16 conns", server, "python-hl7", 16, TARGET_VS_PYHL7_16)
        ratio("msg/s vs python-hl7, 1 conn", server, "python-hl7", 1, TARGET_VS_PYHL7_1)
        ratio("msg/s vs medplum, 16 conns", server, "medplum", 16, TARGET_VS_MEDPLUM_16)
        if (mine := by.get((server, 16))) is not None:
            p99 = mine["latency_ms"]["p99"]
            out.append(
                {
                    "target": "p99 ACK latency ms, 16 conns",
                    "server": server,
                    "value": p99,
                    "goal": f"<= {TARGET_P99_MS_16}",
                    "pass": p99 is not None and p99 <= TARGET_P99_MS_16,
                }
            )
        runs = [r for r in results if r["server"] == server]
        if runs:
            rows, acks = sum(r["inbox_rows"] for r in runs), sum(r["acked"] for r in runs)
            out.append(
                {
                    "target": "inbox rows == ACKs received",
                    "server": server,
                    "value": f"{rows}/{acks}",
                    "goal": "equal",
                    "pass": all(r["durable"] for r in runs),
                }
            )
    return out


def _print_targets(targets: list[dict[str, Any]]) -> None:
    if not targets:
        print("\nno careloop figures: no target to check")
        return
    print("\ntargets (issue 4, same run):")
    for t in targets:
        value = t["value"]
        if isinstance(value, float):
            value = f"{value:.2f}x" if "msg/s" in t["target"] else f"{value:.2f}"
        print(
            f"  {'PASS' if t['pass'] else 'FAIL'}  {t['server']:<20} {t['target']:<30} "
            f"{value:>12}  (goal {t['goal']})"
        )


def _version(cmd: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
        if done.returncode == 0:
            return done.stdout.decode(errors="replace").strip() or None
    return None


def _machine() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    medplum = None
    with contextlib.suppress(OSError, ValueError):
        pkg = MEDPLUM_DIR / "node_modules" / "@medplum" / "hl7" / "package.json"
        medplum = json.loads(pkg.read_text())["version"]
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_mb": mem_kb // 1024 if mem_kb else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "node": _version(["node", "--version"]),
        "packages": {
            "careloop": dist("careloop"),
            "hl7 (python-hl7)": dist("hl7"),
            "uvloop": dist("uvloop"),
            "psycopg": dist("psycopg"),
            "@medplum/hl7": medplum,
        },
        "git_commit": _version(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
    }


# -- main ----------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=6.0, help="timed window per run (6)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window (1)")
    p.add_argument("--conns", default="1,16", help="connection counts, comma-separated (1,16)")
    p.add_argument("--ack-timeout", type=float, default=10.0, help="per ACK, seconds (10)")
    p.add_argument(
        "--only", default=",".join(SERVERS), help=f"servers to run, of: {','.join(SERVERS)}"
    )
    p.add_argument(
        "--pg-url",
        default=DEFAULT_PG_URL,
        help=f"a database the bench can log into to create and drop {BENCH_DB} ({DEFAULT_PG_URL})",
    )
    p.add_argument("--out", type=Path, default=BENCH / "results" / "intake.json")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile careloop with py-spy (all threads; pyinstrument when py-spy is missing): "
        "bench/results/profile-*",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    a.conns = [int(c) for c in a.conns.split(",") if c.strip()]
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    if unknown := set(a.only) - set(SERVERS):
        p.error(f"--only: unknown server(s) {', '.join(sorted(unknown))}; known: {SERVERS}")
    if not a.conns or min(a.conns) < 1 or a.seconds <= 0 or a.warmup < 0:
        p.error("--conns must list counts >= 1, --seconds > 0, --warmup >= 0")
    a.out = a.out.resolve()
    a.notes = []  # things worth knowing that are not measurements; end up in the JSON
    return a


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    # Anything else busy on the machine skews every figure; the load average before says so.
    load_before = [round(x, 2) for x in os.getloadavg()]
    command = shlex.join([sys.executable, *sys.argv])
    print(
        f"careloop intake bench: {args.seconds:g} s per run after {args.warmup:g} s warm-up, "
        f"conns {','.join(map(str, args.conns))}, {os.cpu_count()} CPUs "
        f"(load average before: {load_before[0]}), load generator in its own process\n"
    )
    print(_HEADER, flush=True)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    errors: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="careloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for name in [s for s in SERVERS if s in args.only]:
            backend: Backend | None = None
            try:
                if name.startswith("careloop-"):
                    backend = (
                        _sqlite_backend(tmp, args.notes, name)
                        if name.startswith("careloop-sqlite")
                        else _postgres_backend(args.pg_url)
                    )
                    backend.name = name
                    results += run_careloop(backend, args, tmp)
                else:
                    results += run_peer(name, args, tmp)
            except Skip as exc:
                print(f"{name:<21} skipped: {exc}", flush=True)
                skipped.append({"server": name, "reason": str(exc)})
            except BenchError as exc:
                print(f"{name:<21} ERROR: {exc}", flush=True)
                errors.append({"server": name, "error": str(exc)})
            finally:
                if backend is not None:
                    try:
                        backend.cleanup()
                    except Exception as exc:  # report it; the results are still worth writing
                        print(f"  note: could not drop {BENCH_DB}: {exc}")

    targets = _targets(results)
    _print_targets(targets)
    report = {
        "benchmark": "careloop durable MLLP intake (issue 4)",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            **_machine(),
            "loadavg_before": load_before,
            "sqlite_filesystem": _filesystem(Path(tempfile.gettempdir())),
        },
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "conns": args.conns,
            "ack_timeout": args.ack_timeout,
            "servers": args.only,
        },
        "results": results,
        "targets": targets,
        "skipped": skipped,
        "errors": errors,
        "notes": args.notes,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    if errors or any(r.get("error_count") or r.get("rejected") for r in results):
        return 2
    if args.strict and not all(t["pass"] for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
