"""MLLP over real sockets (port 0): ACKs, hostile input, timeouts, TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from adapters.mllp import AckMismatch, MLLPClient, frame
from integration.models import inbox
from integration.runtime import Runtime
from mappings.er7 import decode, read_header, split_messages
from tests.helpers import adt, err, msa, settings_for


async def _start(url: str, **overrides: object) -> Runtime:
    overrides.setdefault("inprocess_worker", False)
    rt = Runtime(settings_for(url, **overrides))
    await rt.start()
    return rt


@pytest.fixture
async def server(sqlite_url: str) -> AsyncIterator[Runtime]:
    rt = await _start(sqlite_url, mllp_max_frame_bytes=64 * 1024, mllp_frame_timeout_s=0.5,
                      mllp_idle_timeout_s=30)
    yield rt
    await rt.stop()
    rt.engine.dispose()


def addr(rt: Runtime) -> tuple[str, int]:
    assert rt.mllp_address is not None
    return rt.mllp_address


async def raw_exchange(rt: Runtime, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server answers or closes."""
    reader, writer = await asyncio.open_connection(*addr(rt))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readuntil(b"\x1c\r"), read_timeout)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    finally:
        writer.close()


def inbox_count(rt: Runtime) -> int:
    with rt.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(inbox)).scalar_one())


class TestMLLPServer:
    async def test_ack_matches_control_id(self, server: Runtime) -> None:
        async with await MLLPClient.connect(*addr(server)) as client:
            for i in range(5):
                ack = await client.send(adt(f"C{i}"), f"C{i}".encode())
                assert msa(ack)[1:3] == ["AA", f"C{i}"]
        assert inbox_count(server) == 5

    async def test_pipelined_frames_answered_in_order(self, server: Runtime) -> None:
        """Frames sent back to back on one connection get their ACKs in the same order."""
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"".join(frame(adt(f"P{i}")) for i in range(20)))
        await writer.drain()
        got = []
        for _ in range(20):
            payload = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 5)
            got.append(msa(payload[1:-2])[2])
        writer.close()
        assert got == [f"P{i}" for i in range(20)]

    async def test_garbage_frame_gets_ar_and_server_keeps_serving(self, server: Runtime) -> None:
        reply = await raw_exchange(server, frame(b"this is not hl7"))
        assert msa(reply[1:-2])[1] == "AR"
        async with await MLLPClient.connect(*addr(server)) as client:
            assert msa(await client.send(adt("after"), b"after"))[1] == "AA"

    async def test_empty_message_gets_ar(self, server: Runtime) -> None:
        reply = await raw_exchange(server, frame(b""))
        assert msa(reply[1:-2])[1] == "AR"
        assert "empty" in err(reply[1:-2])[8]

    async def test_broken_msh_gets_ar_with_location(self, server: Runtime) -> None:
        reply = await raw_exchange(server, frame(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r"))
        assert msa(reply[1:-2])[1] == "AR"
        assert err(reply[1:-2])[2] == "MSH^1^10"

    async def test_oversized_frame_rejected_and_connection_closed(self, server: Runtime) -> None:
        """A frame past the limit gets AR naming the limit; nothing is stored."""
        big = adt("BIG") + b"NTE|1||" + b"x" * (70 * 1024) + b"\r"
        reply = await raw_exchange(server, frame(big))
        assert msa(reply[1:-2])[1:3] == ["AR", "BIG"]
        assert "exceeds" in err(reply[1:-2])[8]
        assert inbox_count(server) == 0

    async def test_frame_that_never_ends_times_out(self, server: Runtime) -> None:
        """A sender that starts a frame and stalls is disconnected after the frame timeout."""
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"\x0bMSH|^~\\&|slow")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        assert data == b""  # closed by the server, nothing sent
        writer.close()
        assert server.mllp is not None and server.mllp.stats.timeouts >= 1

    async def test_slow_sender_within_timeout_is_served(self, server: Runtime) -> None:
        """A frame dribbled byte by byte still gets its ACK while each pause is short."""
        reader, writer = await asyncio.open_connection(*addr(server))
        data = frame(adt("SLOW"))
        for i in range(0, len(data), 40):
            writer.write(data[i : i + 40])
            await writer.drain()
            await asyncio.sleep(0.01)
        payload = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 5)
        assert msa(payload[1:-2])[2] == "SLOW"
        writer.close()

    async def test_hundreds_of_idle_connections(self, server: Runtime) -> None:
        """300 idle connections do not stop a working sender."""
        idle = [await asyncio.open_connection(*addr(server)) for _ in range(300)]
        try:
            async with await MLLPClient.connect(*addr(server)) as client:
                assert msa(await client.send(adt("busy"), b"busy"))[1] == "AA"
            assert server.mllp is not None and server.mllp.stats.connections >= 300
        finally:
            for _, w in idle:
                w.close()

    async def test_idle_connection_closed(self, sqlite_url: str) -> None:
        rt = await _start(sqlite_url, mllp_idle_timeout_s=0.3)
        try:
            reader, writer = await asyncio.open_connection(*addr(rt))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        finally:
            await rt.stop()
            rt.engine.dispose()

    async def test_connection_cap(self, sqlite_url: str) -> None:
        """Past the connection limit, new connections are closed at once."""
        rt = await _start(sqlite_url, mllp_max_connections=2)
        try:
            kept = [await asyncio.open_connection(*addr(rt)) for _ in range(2)]
            reader, writer = await asyncio.open_connection(*addr(rt))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            for _, w in kept:
                w.close()
            writer.close()
        finally:
            await rt.stop()
            rt.engine.dispose()


class TestCorpusOverMLLP:
    @pytest.mark.corpus
    async def test_every_corpus_message_acknowledged(self, server: Runtime, corpus: Path) -> None:
        """Every message in the shared corpus gets an ACK whose MSA-2 is its MSH-10."""
        files = [p for p in (corpus / "hl7v2").rglob("*") if p.suffix in {".hl7", ".hl7v2", ".txt"}]
        sent = 0
        async with await MLLPClient.connect(*addr(server)) as client:
            for path in files:
                try:
                    messages = split_messages(path.read_bytes())
                except ValueError:
                    continue  # bare segment files without MSH
                for raw in messages:
                    try:
                        control = read_header(decode(raw)).control_id
                    except ValueError:
                        control = ""
                    ack = await client.send(raw, control.encode("utf-8"), timeout=10)
                    fields = msa(ack)
                    assert fields[2] == control, path.name
                    assert fields[1] in {"AA", "CA", "AE", "AR", "CR"}, path.name
                    if fields[1] not in {"AA", "CA"}:
                        assert err(ack)[8], path.name
                    sent += 1
        assert sent > 300


def _make_certs(tmp: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", "127.0.0.1"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2 if who == "server" else 3)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if san:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san))]),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[f"{who}_cert"] = tmp / f"{who}.pem"
        out[f"{who}_key"] = tmp / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


class TestTLS:
    async def test_mutual_tls(self, sqlite_url: str, tmp_path: Path) -> None:
        """With a client CA configured, a client with a certificate is served and one
        without is refused."""
        certs = _make_certs(tmp_path)
        rt = await _start(
            sqlite_url,
            mllp_tls_cert=certs["server_cert"],
            mllp_tls_key=certs["server_key"],
            mllp_tls_client_ca=certs["ca"],
        )
        try:
            ctx = ssl.create_default_context(cafile=str(certs["ca"]))
            ctx.load_cert_chain(certs["client_cert"], certs["client_key"])
            async with await MLLPClient.connect(*addr(rt), ssl_context=ctx) as client:
                assert msa(await client.send(adt("T1"), b"T1"))[1] == "AA"
            bare = ssl.create_default_context(cafile=str(certs["ca"]))
            # TLS 1.3 reports a refused client certificate after the handshake: the server
            # closes the connection instead of answering.
            with pytest.raises((ssl.SSLError, OSError, AckMismatch)):
                client = await MLLPClient.connect(*addr(rt), ssl_context=bare)
                await client.send(adt("T2"), b"T2", timeout=3)
        finally:
            await rt.stop()
            rt.engine.dispose()


class TestApplicationAcks:
    async def test_application_ack_delivered_to_sender_listener(self, sqlite_url: str) -> None:
        """Enhanced mode with MSH-16 AL: CA at once, then the application ACK arrives at the
        sender's own MLLP listener (``ack_to``)."""
        from adapters.mllp import MLLPServer
        from integration.settings import HL7Sender

        received: list[bytes] = []
        got = asyncio.Event()

        async def listener(payload: bytes, peer: str) -> bytes | None:
            received.append(payload)
            if len(received) >= 2:
                got.set()
            return None

        engine_side = MLLPServer(listener)
        host, port = await engine_side.start("127.0.0.1", 0)
        rt = await _start(
            sqlite_url,
            inprocess_worker=True,
            hl7_senders=(HL7Sender(application="EPIC", facility="MAIN", ack_to=f"{host}:{port}"),),
        )
        try:
            async with await MLLPClient.connect(*addr(rt)) as client:
                accept = await client.send(adt("APP1", extra_msh="|||AL|AL"), b"APP1")
                assert msa(accept)[1:3] == ["CA", "APP1"]
                bad = await client.send(adt("APP2", extra_msh="|||AL|AL", pid=False), b"APP2")
                assert msa(bad)[1] == "CA"
            await asyncio.wait_for(got.wait(), 10)
            by_id = {msa(p)[2]: p for p in received}
            assert msa(by_id["APP1"])[1] == "AA"
            assert msa(by_id["APP2"])[1] == "AE"
            assert "PID" in err(by_id["APP2"])[2]
            deadline = asyncio.get_running_loop().time() + 5
            sent: list[object] = []
            while asyncio.get_running_loop().time() < deadline:
                with rt.engine.connect() as conn:
                    sent = list(conn.execute(select(inbox.c.app_ack_sent_at)).scalars())
                if all(sent):
                    break
                await asyncio.sleep(0.05)
            assert all(sent), "delivered application ACKs are marked sent"
        finally:
            await rt.stop()
            rt.engine.dispose()
            await engine_side.close()


class TestClientMatching:
    async def test_late_ack_never_taken_for_the_next_message(self) -> None:
        """A stale ACK (for an earlier message) is skipped; the client waits for its own."""
        from adapters.mllp import MLLPServer

        async def handler(payload: bytes, peer: str) -> bytes | None:
            control = payload.split(b"\r")[0].split(b"|")[9]
            stale = b"MSH|^~\\&|X\rMSA|AA|OLD-ONE\r"
            return frame(stale)[1:-2] + b"\x1c\r\x0b" + b"MSH|^~\\&|X\rMSA|AA|" + control + b"\r"

        server = MLLPServer(handler)
        host, port = await server.start("127.0.0.1", 0)
        try:
            async with await MLLPClient.connect(host, port) as client:
                ack = await client.send(adt("NEW"), b"NEW", timeout=5)
                assert msa(ack)[2] == "NEW"
                assert client.stray_acks == 1
        finally:
            await server.close()
