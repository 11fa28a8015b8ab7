"""Reference peer: the least a Python MLLP server can do, storing nothing.

    python bench/peers/bare_asyncio.py [PORT]     (0, the default, picks a free port)

A bare `asyncio.Protocol` (on uvloop when installed) that cuts frames out of the byte stream and
answers each one with an AA built from its MSH segment alone: no parse of the rest, no database.
It is the upper bound for a Python server on this machine, the ceiling careloop's ACK path
(frame, read MSH, commit with the group, answer) is compared against. Prints
``listening 127.0.0.1:<port>`` once it accepts connections; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from collections.abc import Callable
from typing import cast

HOST = "127.0.0.1"
_START, _END = b"\x0b", b"\x1c\x0d"
_MAX_FRAME = 1 << 20
_ack_ids = itertools.count(1)


def build_ack(frame: bytes) -> bytes:
    """AA for one framed message, from MSH-1..MSH-12 only; MSH fields are swapped as ch. 2 says."""
    end = frame.find(b"\r")
    msh = frame if end < 0 else frame[:end]
    if len(msh) < 8 or not msh.startswith(b"MSH"):
        return _START + b"MSH|^~\\&|||||||ACK|0|P|2.5\rMSA|AR|\r" + _END
    sep = msh[3:4]
    f = msh.split(sep) + [b""] * 12  # f[n] is MSH-(n+1) from MSH-2 on: f[1] is MSH-2
    component = f[1][:1] or b"^"
    trigger = f[8].split(component)[1] if component in f[8] else b""
    ack = sep.join(
        (
            b"MSH",
            f[1],  # MSH-2 encoding characters, kept
            f[4],  # MSH-3 <- receiving application
            f[5],  # MSH-4 <- receiving facility
            f[2],  # MSH-5 <- sending application
            f[3],  # MSH-6 <- sending facility
            time.strftime("%Y%m%d%H%M%S").encode(),
            b"",
            b"ACK" + component + trigger + component + b"ACK",
            b"B%d" % next(_ack_ids),
            f[10],  # MSH-11 processing id
            f[11],  # MSH-12 version
        )
    )
    return _START + ack + b"\rMSA" + sep + b"AA" + sep + f[9] + b"\r" + _END


class _Framer(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed ones.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out = []
        while (end := buf.find(_END)) >= 0:
            start = buf.rfind(_START, 0, end)
            if start >= 0:
                out.append(build_ack(bytes(buf[start + 1 : end])))
            del buf[: end + 2]  # bytes outside a frame are dropped
        if len(buf) > _MAX_FRAME:
            buf.clear()
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def _main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Framer, HOST, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
