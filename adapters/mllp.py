"""MLLP (Minimal Lower Layer Protocol, HL7 v2 Appendix C): framing, a server and a client.

Frames are ``<VT> message <FS><CR>`` (0x0B ... 0x1C 0x0D). :class:`Framer` is sans-I/O: feed it
bytes as they arrive and it returns the complete frames, keeps a partial one for the next read,
skips (and counts) bytes between frames, and bounds a frame's size. The asyncio server and client
below are thin wrappers around it.

The server answers each frame through an ``async`` handler in the order frames arrived on the
connection (senders may pipeline), closes idle connections and connections whose frame stalls
half-way (a slow or stuck sender), caps the number of connections, and speaks TLS (optionally
mutual) when given an SSL context. Nothing here knows HL7 beyond MSA-2 for ACK matching.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

__all__ = [
    "END_BLOCK",
    "START_BLOCK",
    "AckMismatch",
    "FrameHandler",
    "FrameTooLarge",
    "Framer",
    "MLLPClient",
    "MLLPError",
    "MLLPServer",
    "ServerLimits",
    "ack_control_id",
    "frame",
]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
_VT = 0x0B
_FS = 0x1C
_CR = 0x0D


class MLLPError(Exception):
    """Base for MLLP transport problems."""


class FrameTooLarge(MLLPError):
    """A frame grew past the configured limit; ``head`` holds its first bytes."""

    def __init__(self, limit: int, head: bytes) -> None:
        super().__init__(f"MLLP frame exceeds {limit} bytes")
        self.limit = limit
        self.head = head


class AckMismatch(MLLPError):
    """No acknowledgement for the message arrived (timeout or connection closed)."""


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP start and end blocks."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class Framer:
    """Turns a byte stream into MLLP frames, without doing any I/O.

    * ``feed(data)`` returns the payloads of every frame completed by ``data``.
    * Bytes outside a frame are skipped and counted in ``skipped_bytes``.
    * A start block inside an unfinished frame abandons that frame (counted as skipped) and
      starts a new one: the sender gave up on the old one.
    * An end block must be followed by CR; an end block followed by any other byte is accepted
      too (some engines omit the CR), the byte being treated as outside the frame.
    * A frame longer than ``max_frame_bytes`` raises :class:`FrameTooLarge`; the framer is
      then reset and skips the rest of that frame.
    """

    def __init__(self, max_frame_bytes: int = 10 * 1024 * 1024) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.skipped_bytes = 0
        self._buf = bytearray()
        self._in_frame = False
        self._discarding = False
        self._after_end = False

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not yet ended."""
        return self._in_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        pos = 0
        n = len(data)
        if self._after_end and n:
            # The end block's CR arrived in this read.
            self._after_end = False
            if data[0] == _CR:
                pos = 1
        while pos < n:
            if not self._in_frame:
                start = data.find(START_BLOCK, pos)
                if start < 0:
                    self.skipped_bytes += n - pos
                    return frames
                self.skipped_bytes += start - pos
                self._discarding = False
                self._in_frame = True
                self._buf.clear()
                pos = start + 1
                continue
            # Inside a frame: look for its end, or a new start block.
            end = data.find(END_BLOCK, pos)
            restart = data.find(START_BLOCK, pos)
            if restart >= 0 and (end < 0 or restart < end):
                # A new frame began before this one ended: drop the unfinished one.
                self.skipped_bytes += len(self._buf) + (restart - pos) + 1
                self._buf.clear()
                self._in_frame = False
                self._discarding = False
                pos = restart
                continue
            if end < 0:
                self._append(data[pos:])
                return frames
            self._append(data[pos:end])
            pos = end + 1
            if pos < n and data[pos] == _CR:
                pos += 1
            elif pos >= n:
                # FS ends this read: the frame is complete; its CR may open the next read.
                self._after_end = True
            if not self._discarding:
                frames.append(bytes(self._buf))
            self._buf.clear()
            self._in_frame = False
            self._discarding = False
        return frames

    def _append(self, chunk: bytes) -> None:
        if self._discarding:
            self.skipped_bytes += len(chunk)
            return
        if len(self._buf) + len(chunk) > self.max_frame_bytes:
            head = bytes(self._buf[:1024]) if self._buf else bytes(chunk[:1024])
            self.skipped_bytes += len(self._buf) + len(chunk)
            self._buf.clear()
            self._discarding = True
            raise FrameTooLarge(self.max_frame_bytes, head)
        self._buf += chunk


def ack_control_id(ack: bytes) -> bytes:
    """MSA-2 of an acknowledgement (raw bytes), or ``b""`` when there is none."""
    if len(ack) < 4:
        return b""
    sep = ack[3:4]
    for line in ack.replace(b"\n", b"\r").split(b"\r"):
        if line.startswith(b"MSA" + sep):
            parts = line.split(sep)
            return parts[2].strip() if len(parts) > 2 else b""
    return b""


class FrameHandler(Protocol):
    """What the server calls for each frame: returns the reply payload, or None for none."""

    def __call__(self, payload: bytes, peer: str) -> Awaitable[bytes | None]: ...


@dataclass(frozen=True)
class ServerLimits:
    max_frame_bytes: int = 10 * 1024 * 1024
    idle_timeout_s: float = 600.0
    frame_timeout_s: float = 30.0
    max_connections: int = 1000
    max_pipelined: int = 64
    """Frames read ahead of their replies before the server stops reading from the socket."""


OversizeHandler = Callable[[bytes, str], bytes | None]


@dataclass
class ServerStats:
    connections: int = 0
    accepted: int = 0
    refused: int = 0
    frames: int = 0
    skipped_bytes: int = 0
    timeouts: int = 0
    oversized: int = 0
    handler_errors: int = 0
    peers: set[str] = field(default_factory=set)


class _Connection(asyncio.Protocol):
    def __init__(self, server: MLLPServer) -> None:
        self._server = server
        self._limits = server.limits
        self._framer = Framer(self._limits.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[asyncio.Future[bytes | None]] = deque()
        self._paused = False
        self._closing = False
        self.peer = "?"
        self._last_activity = time.monotonic()
        self._frame_started = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        info = self._transport.get_extra_info("peername")
        self.peer = f"{info[0]}:{info[1]}" if isinstance(info, tuple) else str(info)
        stats = self._server.stats
        if stats.connections >= self._limits.max_connections:
            stats.refused += 1
            self._transport.abort()
            self._closing = True
            return
        stats.connections += 1
        stats.accepted += 1
        self._server.connections.add(self)
        self._schedule_check()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._server.connections:
            self._server.connections.discard(self)
            self._server.stats.connections -= 1
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._server.stats.skipped_bytes += self._framer.skipped_bytes

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        now = time.monotonic()
        self._last_activity = now
        was_in_frame = self._framer.in_frame
        try:
            payloads = self._framer.feed(data)
        except FrameTooLarge as exc:
            self._server.stats.oversized += 1
            on_oversize = self._server.on_oversize
            reply = on_oversize(exc.head, self.peer) if on_oversize else None
            self._flush_then_close(reply)
            return
        if self._framer.in_frame and (not was_in_frame or payloads):
            self._frame_started = now
        for payload in payloads:
            self._server.stats.frames += 1
            fut = asyncio.ensure_future(self._server.handler(payload, self.peer))
            fut.add_done_callback(self._on_done)
            self._pending.append(fut)
        if len(self._pending) >= self._limits.max_pipelined and not self._paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool | None:
        # Let pending replies go out, then close.
        if not self._pending:
            return None
        self._closing_after_replies = True
        return True

    _closing_after_replies = False

    # -- replies in arrival order -----------------------------------------------------------
    def _on_done(self, _fut: asyncio.Future[bytes | None]) -> None:
        transport = self._transport
        while self._pending and self._pending[0].done():
            fut = self._pending.popleft()
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None:
                # The handler must answer every frame; if it cannot, the connection is closed
                # so the sender resends rather than waiting for an answer that never comes.
                self._server.stats.handler_errors += 1
                self._server.log_error(exc, self.peer)
                self._close()
                return
            reply = fut.result()
            if reply is not None and transport is not None and not transport.is_closing():
                transport.write(frame(reply))
        if self._paused and len(self._pending) <= self._limits.max_pipelined // 4:
            self._paused = False
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        if self._closing_after_replies and not self._pending:
            self._close()

    def _flush_then_close(self, reply: bytes | None) -> None:
        self._closing = True

        async def _wait_and_close() -> None:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._pending, return_exceptions=True)
            transport = self._transport
            if transport is not None and not transport.is_closing():
                if reply is not None:
                    transport.write(frame(reply))
                transport.close()

        task = asyncio.ensure_future(_wait_and_close())
        self._server.background.add(task)
        task.add_done_callback(self._server.background.discard)

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # -- timeouts ---------------------------------------------------------------------------
    def _schedule_check(self) -> None:
        period = max(0.05, min(self._limits.idle_timeout_s, self._limits.frame_timeout_s) / 4)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(period, self._check_timeouts)

    def _check_timeouts(self) -> None:
        if self._closing:
            return
        now = time.monotonic()
        stalled = (
            self._framer.in_frame and now - self._frame_started > self._limits.frame_timeout_s
        )
        idle = not self._pending and now - self._last_activity > self._limits.idle_timeout_s
        if stalled or idle:
            self._server.stats.timeouts += 1
            self._server.log_timeout(self.peer, "frame_stalled" if stalled else "idle")
            self._close()
            return
        self._schedule_check()


class MLLPServer:
    """An asyncio MLLP listener that answers every frame through ``handler``."""

    def __init__(
        self,
        handler: FrameHandler,
        *,
        limits: ServerLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_oversize: OversizeHandler | None = None,
        on_error: Callable[[BaseException, str], None] | None = None,
        on_timeout: Callable[[str, str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.ssl_context = ssl_context
        self.on_oversize = on_oversize
        self._on_error = on_error
        self._on_timeout = on_timeout
        self.stats = ServerStats()
        self.connections: set[_Connection] = set()
        self.background: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None

    def log_error(self, exc: BaseException, peer: str) -> None:
        if self._on_error is not None:
            self._on_error(exc, peer)

    def log_timeout(self, peer: str, reason: str) -> None:
        if self._on_timeout is not None:
            self._on_timeout(peer, reason)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=10.0 if self.ssl_context else None,
            reuse_address=True,
            backlog=1024,
        )
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def close(self) -> None:
        """Stop accepting, let replies in flight finish, then close every connection."""
        if self._server is not None:
            self._server.close()
        pending = [f for c in list(self.connections) for f in c._pending]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)


class MLLPClient:
    """Sends messages over one MLLP connection and matches each ACK to its message.

    An acknowledgement is taken for a message only when its MSA-2 equals that message's MSH-10;
    a late ACK for an earlier message (after a timeout) is skipped and counted in ``stray_acks``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._framer = Framer()
        self._frames: deque[bytes] = deque()
        self.stray_acks = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> MLLPClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context), timeout
        )
        return cls(reader, writer)

    async def send(self, message: bytes, control_id: bytes, *, timeout: float = 30.0) -> bytes:
        """Send ``message``; return the ACK whose MSA-2 is ``control_id``."""
        self._writer.write(frame(message))
        await self._writer.drain()
        return await self.receive_ack(control_id, timeout=timeout)

    async def receive_ack(self, control_id: bytes, *, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            while self._frames:
                payload = self._frames.popleft()
                if ack_control_id(payload) == control_id.strip():
                    return payload
                self.stray_acks += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AckMismatch(f"no ACK for control id {control_id!r} within {timeout:g} s")
            try:
                data = await asyncio.wait_for(self._reader.read(65536), remaining)
            except TimeoutError:
                raise AckMismatch(
                    f"no ACK for control id {control_id!r} within {timeout:g} s"
                ) from None
            if not data:
                raise AckMismatch(
                    f"connection closed before the ACK for control id {control_id!r}"
                )
            self._frames.extend(self._framer.feed(data))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> MLLPClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


def server_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the listener; with ``client_ca``, clients must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
