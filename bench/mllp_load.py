"""MLLP load generator: N connections, each sending ADT^A01 messages one at a time.

    python bench/mllp_load.py --port 2575 --conns 16 --seconds 6 [--warmup 1] [--json]

Each connection sends a message (0x0B ... 0x1C 0x0D), waits for its ACK, checks it (MSA-1 is AA
or CA, MSA-2 is the MSH-10 just sent) and sends the next, until the time window closes or the
per-connection message cap is reached. Every message gets its own MSH-10 (run tag, connection,
sequence), so a server that deduplicates on sender + MSH-10 stores each one.

Measured over the timed window that follows a warm-up: messages acknowledged per second, and the
send-to-ACK latency of each of those messages (p50/p90/p99/max). The counts over the whole run,
warm-up included, are reported too: a durable server must hold exactly ``acked`` rows afterwards.

Importable: ``run_load(host, port, conns=..., seconds=...)`` returns the same dict that
``--json`` prints. The connection logic is callback-driven (`asyncio.Protocol`, uvloop when
installed) so that the generator costs the machine as little as possible: on a small box it
shares the CPU with the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import secrets
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

_START = b"\x0b"
_END = b"\x1c\x0d"
_GOOD_CODES = frozenset((b"AA", b"CA"))

# A synthetic ADT^A01 (admit) shaped like a real feed: v2.5.1, CR segment ends, EVN, PID with
# repeating identifiers, NK1, PV1, AL1, DG1. No real person. Original acknowledgement mode
# (MSH-15/16 empty), so the answer is AA. {ts} and {cid} are filled per run and per message.
ADT_A01 = (
    "MSH|^~\\&|EPIC|RIVERSIDE^2.16.840.1.113883.3.72.5.1^ISO|CARELOOP|CARELOOP|{ts}||"
    "ADT^A01^ADT_A01|{cid}|P|2.5.1|||||USA|UNICODE UTF-8\r"
    "EVN|A01|{ts}|||4213^HOLLOWAY^JUNE^^^^^^RIVERSIDE\r"
    "PID|1||848211^^^RIVERSIDE^MR~999-41-2207^^^USSSA^SS||FENWICK^ARTHUR^LEE^^MR||19580312|M||"
    "2106-3^White^CDCREC|1520 WILLOW CREEK RD^APT 4B^SPRINGFIELD^IL^62704^USA^H||"
    "^PRN^PH^^1^217^5550143~^NET^Internet^a.fenwick@example.org|||M||A0048211\r"
    "NK1|1|FENWICK^MARGARET^R|SPO^Spouse^HL70063|1520 WILLOW CREEK RD^^SPRINGFIELD^IL^62704|"
    "^PRN^PH^^1^217^5550144\r"
    "PV1|1|I|4EAST^412^B^RIVERSIDE^^^^MED|E|||1184^OKAFOR^CHIDI^^^DR^^^NPI|||MED||||7|||"
    "1184^OKAFOR^CHIDI^^^DR^^^NPI|IN||MCR|||||||||||||||||||RIVERSIDE||ADM|||{ts}\r"
    "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives\r"
    "DG1|1||I21.4^Non-ST elevation myocardial infarction^I10|||A\r"
)


@dataclass
class _Shared:
    """State every connection reads: the clock edges and the message template."""

    head: bytes  # frame bytes up to MSH-10
    tail: bytes  # frame bytes after MSH-10
    run_tag: str
    cap: int  # messages per connection at most
    stop_at: float = float("inf")  # perf_counter() after which no new message is sent


@dataclass
class _Conn(asyncio.Protocol):
    index: int
    shared: _Shared
    done: asyncio.Future[None]
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    error: str | None = None
    ack_at: array[float] = field(default_factory=lambda: array("d"))  # perf_counter() of each ACK
    latency: array[float] = field(default_factory=lambda: array("d"))  # seconds, same order
    _cid: bytes = b""
    _sent_at: float = 0.0
    _buf: bytearray = field(default_factory=bytearray)
    _transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed ones.
        self._transport = cast(asyncio.Transport, transport)

    def start(self) -> None:
        self._send_next()

    def _send_next(self) -> None:
        sh = self.shared
        if self.sent >= sh.cap or time.perf_counter() >= sh.stop_at:
            self._finish()
            return
        self.sent += 1
        self._cid = b"%s%03d%08d" % (sh.run_tag.encode(), self.index, self.sent)
        assert self._transport is not None
        self._sent_at = time.perf_counter()
        self._transport.write(sh.head + self._cid + sh.tail)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf
        buf += data
        end = buf.find(_END)
        if end < 0:
            return
        frame = bytes(buf[:end])
        del buf[: end + 2]
        if buf.strip():
            self._fail(f"{len(buf)} bytes after the ACK of {self._cid.decode()}")
            return
        code, cid = _msa(frame)
        if cid != self._cid:
            got = cid.decode(errors="replace")
            self._fail(f"ACK for {got!r} while waiting for {self._cid.decode()}")
            return
        self.acked += 1
        self.ack_at.append(now)
        self.latency.append(now - self._sent_at)
        if code not in _GOOD_CODES:
            self.rejected += 1
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._fail(f"connection closed by the server ({exc or 'EOF'})")

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self._finish()

    def _finish(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self.done.done():
            self.done.set_result(None)


def _msa(frame: bytes) -> tuple[bytes, bytes]:
    """(MSA-1, MSA-2) of one ACK frame (leading 0x0B allowed); (b'', b'') when there is no MSA."""
    body = frame[1:] if frame.startswith(_START) else frame
    sep = body[3:4] or b"|"
    for segment in body.replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA" + sep):
            fields = segment.split(sep)
            return fields[1].strip(), (fields[2] if len(fields) > 2 else b"").strip()
    return b"", b""


def _same(client: _Conn) -> _Conn:
    return client


def _percentile_ms(ordered: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list of seconds, in ms; None when empty."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats drifting
    return round(ordered[int(rank) - 1] * 1000.0, 3)


def _template(message: str) -> tuple[bytes, bytes]:
    ts = time.strftime("%Y%m%d%H%M%S")
    head, tail = message.replace("{ts}", ts).split("{cid}")
    return _START + head.encode(), tail.encode() + _END


async def run_load_async(
    host: str,
    port: int,
    *,
    conns: int = 16,
    seconds: float = 6.0,
    warmup: float = 1.0,
    max_messages: int = 1_000_000,
    connect_timeout: float = 10.0,
    ack_timeout: float = 10.0,
    message: str = ADT_A01,
) -> dict[str, Any]:
    """Run the load against host:port and return the figures (see the module docstring)."""
    if conns < 1 or seconds <= 0 or warmup < 0 or max_messages < 1:
        raise ValueError("conns and max_messages must be >= 1, seconds > 0, warmup >= 0")
    loop = asyncio.get_running_loop()
    head, tail = _template(message)
    shared = _Shared(head=head, tail=tail, run_tag=secrets.token_hex(3), cap=max_messages)
    clients: list[_Conn] = []
    transports: list[asyncio.BaseTransport] = []
    cpu0 = time.process_time()
    try:
        for i in range(conns):
            client = _Conn(index=i, shared=shared, done=loop.create_future())
            conn, _ = await asyncio.wait_for(
                loop.create_connection(functools.partial(_same, client), host, port),
                connect_timeout,
            )
            transports.append(conn)
            clients.append(client)
        t0 = time.perf_counter()
        window = (t0 + warmup, t0 + warmup + seconds)
        shared.stop_at = window[1]
        for client in clients:
            client.start()
        pending = [c.done for c in clients]
        await asyncio.wait(pending, timeout=warmup + seconds + ack_timeout)
        for client in clients:
            if not client.done.done():
                client._fail(f"no ACK for {client._cid.decode()} within {ack_timeout:g} s")
        t_end = time.perf_counter()
    finally:
        for transport in transports:
            transport.close()
    cpu = time.process_time() - cpu0

    lat_window: list[float] = []
    for client in clients:
        lo, hi = window
        lat_window.extend(
            lat for at, lat in zip(client.ack_at, client.latency, strict=True) if lo <= at < hi
        )
    lat_window.sort()
    in_window = len(lat_window)
    # When every connection hit its cap early, the window is shorter than asked for.
    last_ack = max((c.ack_at[-1] for c in clients if c.ack_at), default=window[0])
    measured = min(window[1], max(last_ack, window[0])) - window[0]
    if measured <= 0:
        measured = seconds
    errors = [f"conn {c.index}: {c.error}" for c in clients if c.error]
    return {
        "target": f"{host}:{port}",
        "conns": conns,
        "warmup_s": warmup,
        "window_s": round(measured, 3),
        "message_bytes": len(head) + len(shared.run_tag) + 11 + len(tail) - 3,
        "msg_per_s": round(in_window / measured, 1),
        "acked_in_window": in_window,
        "latency_ms": {
            "p50": _percentile_ms(lat_window, 50),
            "p90": _percentile_ms(lat_window, 90),
            "p99": _percentile_ms(lat_window, 99),
            "max": _percentile_ms(lat_window, 100),
            "mean": round(sum(lat_window) / in_window * 1000.0, 3) if in_window else None,
        },
        # Whole run, warm-up included: what a durable server must have stored.
        "sent": sum(c.sent for c in clients),
        "acked": sum(c.acked for c in clients),
        "rejected": sum(c.rejected for c in clients),
        "unacked": sum(c.sent - c.acked for c in clients),
        "errors": errors[:20],
        "error_count": len(errors),
        "elapsed_s": round(t_end - t0, 3),
        "generator_cpu_pct": round(100.0 * cpu / max(t_end - t0, 1e-9), 1),
        "loop": type(loop).__module__.split(".")[0],
        "run_tag": shared.run_tag,
    }


def run_load(host: str, port: int, **kwargs: Any) -> dict[str, Any]:
    """Blocking wrapper around `run_load_async`, on uvloop when it is installed."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_load_async(host, port, **kwargs))


def fmt_ms(value: float | None) -> str:
    """A latency for humans: two decimals, or "-" when nothing was measured."""
    return "-" if value is None else f"{value:.2f}"


def _summary(r: dict[str, Any]) -> str:
    lat = {k: fmt_ms(v) for k, v in r["latency_ms"].items()}
    lines = [
        f"{r['target']}  conns={r['conns']}  window={r['window_s']} s  loop={r['loop']}",
        f"  {r['msg_per_s']:,.0f} msg/s   p50 {lat['p50']} ms   p90 {lat['p90']} ms   "
        f"p99 {lat['p99']} ms   max {lat['max']} ms",
        f"  sent {r['sent']}  acked {r['acked']}  rejected {r['rejected']}  "
        f"unacked {r['unacked']}  generator cpu {r['generator_cpu_pct']}%",
    ]
    lines += [f"  error: {e}" for e in r["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=16, help="concurrent connections (16)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed window after warm-up (6)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up, not measured (1)")
    p.add_argument("--messages", type=int, default=1_000_000, help="cap per connection (1,000,000)")
    p.add_argument("--ack-timeout", type=float, default=10.0, help="per ACK, seconds (10)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)
    try:
        result = run_load(
            a.host,
            a.port,
            conns=a.conns,
            seconds=a.seconds,
            warmup=a.warmup,
            max_messages=a.messages,
            ack_timeout=a.ack_timeout,
        )
    except (OSError, TimeoutError, ValueError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        if a.json:
            print(json.dumps({"target": f"{a.host}:{a.port}", "conns": a.conns, "fatal": why}))
        else:
            print(f"mllp_load: {a.host}:{a.port}: {why}", file=sys.stderr)
        return 2
    print(json.dumps(result) if a.json else _summary(result))
    return 1 if result["error_count"] or result["rejected"] else 0


if __name__ == "__main__":
    sys.exit(main())
