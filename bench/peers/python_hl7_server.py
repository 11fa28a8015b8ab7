"""Reference peer: python-hl7's asyncio MLLP server, acking every message, storing nothing.

    python bench/peers/python_hl7_server.py [PORT]     (0, the default, picks a free port)

This is the server the python-hl7 docs show: `hl7.mllp.start_hl7_server` hands each connection a
reader that parses every message fully (`readmessage`), and `Message.create_ack` builds the AA.
Prints ``listening 127.0.0.1:<port>`` once it accepts connections; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

HOST = "127.0.0.1"


async def _handle(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
    try:
        while not writer.is_closing():
            message: hl7.Message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client hung up: the normal end of a bench run
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await start_hl7_server(_handle, HOST, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
