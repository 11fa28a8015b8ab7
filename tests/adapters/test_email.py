"""The SMTP channel against a real SMTP server (aiosmtpd on 127.0.0.1): STARTTLS with a
certificate made here, AUTH, the message's headers and parts, and how failures are classified."""

from __future__ import annotations

import asyncio
import email
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapters.channels import Channel, ChannelError, OutgoingMessage
from adapters.email import SmtpChannel, SmtpConfig, message_id, render_html

HOST = "127.0.0.1"
KEY = "appointment-reminder|0|e1"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()[:32]
SUBJECT = "Recordatorio: su cita de mañana — Clínica Peña"


@dataclass
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "careloop test SMTP")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST)),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return Certificate(cert_path, key_path)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    authenticated: bool | None

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what it accepts, or refuses every recipient."""

    rcpt_reply: str | None = None
    data_reply: str = "250 Message accepted for delivery"
    data_delay_s: float = 0
    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(Received(
            envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content),
            session.ssl is not None, session.authenticated,
        ))
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        return self.data_reply


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login == b"careloop" and auth_data.password == b"s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    port: int
    handler: Recorder


def run(handler: Recorder, **kwargs: Any) -> Iterator[Server]:
    port = free_port()
    controller = Controller(handler, hostname=HOST, port=port, **kwargs)
    controller.start()
    try:
        yield Server(port, handler)
    finally:
        controller.stop()


@pytest.fixture
def starttls_server(certificate: Certificate) -> Iterator[Server]:
    """Submission-style: STARTTLS required before anything, AUTH offered only over TLS."""
    yield from run(Recorder(), tls_context=certificate.server_context(),
                   require_starttls=True, authenticator=authenticate, auth_require_tls=True)


@pytest.fixture
def plain_server() -> Iterator[Server]:
    """No TLS at all (a local relay)."""
    yield from run(Recorder())


def config(port: int, certificate: Certificate | None = None, **changes: Any) -> SmtpConfig:
    values: dict[str, Any] = {
        "host": HOST, "port": port, "from_address": "Clínica Peña <citas@clinica.example>",
        "timeout_s": 5,
        "ssl_context": certificate.client_context() if certificate is not None else None,
    }
    values.update(changes)
    return SmtpConfig(**values)


def message(key: str = KEY, body: str = "Hola María,\nsu cita es mañana.\n\n"
            "Confirme en https://portal.example/c?a=1&b=2.", html: str | None = None
            ) -> OutgoingMessage:
    return OutgoingMessage(key=key, channel="email", address="maria@example.org",
                           language="es", subject=SUBJECT, body=body, html=html)


class TestDelivery:
    def test_is_a_channel_without_key_memory(self, starttls_server: Server) -> None:
        channel: Channel = SmtpChannel(config(starttls_server.port))
        assert channel.lookup(KEY) is None
        assert SmtpChannel(config(starttls_server.port)).idempotent is False

    def test_sends_over_starttls_with_auth(
        self, starttls_server: Server, certificate: Certificate
    ) -> None:
        channel = SmtpChannel(config(starttls_server.port, certificate,
                                     username="careloop", password="s3cret"))
        receipt = channel.send(message())
        assert receipt.key == KEY and receipt.provider_ref == f"<{KEY_HASH}@careloop>"
        assert not receipt.duplicate
        (got,) = starttls_server.handler.received
        assert got.tls, "the message travelled over STARTTLS"
        assert got.authenticated
        assert got.mail_from == "citas@clinica.example"
        assert got.rcpt_tos == ["maria@example.org"]

    def test_without_credentials_no_auth_is_attempted(
        self, starttls_server: Server, certificate: Certificate
    ) -> None:
        SmtpChannel(config(starttls_server.port, certificate)).send(message())
        (got,) = starttls_server.handler.received
        assert got.tls and not got.authenticated

    def test_headers_and_parts(self, starttls_server: Server, certificate: Certificate) -> None:
        SmtpChannel(config(starttls_server.port, certificate)).send(message())
        mail = starttls_server.handler.received[0].message
        assert mail["Message-ID"] == f"<{KEY_HASH}@careloop>" == message_id(KEY)
        assert mail["X-Careloop-Key"] == KEY_HASH
        assert KEY.encode() not in starttls_server.handler.received[0].content
        assert mail["To"] == "maria@example.org"
        assert mail["From"].addresses[0].display_name == "Clínica Peña"
        assert mail["Date"].datetime.tzinfo is not None
        assert mail.get_content_type() == "multipart/alternative"
        plain, rich = mail.get_body(("plain",)), mail.get_body(("html",))
        assert plain is not None and rich is not None
        assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
        text = plain.get_content().replace("\r\n", "\n")
        assert text == "Hola María,\nsu cita es mañana.\n\nConfirme en https://portal.example/c?a=1&b=2.\n"
        html = rich.get_content().replace("\r\n", "\n")
        assert '<a href="https://portal.example/c?a=1&amp;b=2">' in html
        assert "<p>Hola María,<br>\nsu cita es mañana.</p>" in html

    def test_utf8_subject_is_encoded(self, starttls_server: Server, certificate: Certificate
                                     ) -> None:
        SmtpChannel(config(starttls_server.port, certificate)).send(message())
        got = starttls_server.handler.received[0]
        header_block = got.content.split(b"\r\n\r\n", 1)[0]
        assert header_block.isascii(), "headers are 7-bit: non-ASCII goes in encoded words"
        assert b"=?utf-8?" in header_block.lower()
        assert got.message["Subject"] == SUBJECT

    def test_given_html_is_sent_as_is(self, starttls_server: Server, certificate: Certificate
                                      ) -> None:
        page = "<html><body><h1>Su cita</h1></body></html>"
        SmtpChannel(config(starttls_server.port, certificate)).send(message(html=page))
        rich = starttls_server.handler.received[0].message.get_body(("html",))
        assert isinstance(rich, EmailMessage) and rich.get_content().strip() == page

    def test_message_id_is_deterministic_by_key(
        self, starttls_server: Server, certificate: Certificate
    ) -> None:
        channel = SmtpChannel(config(starttls_server.port, certificate))
        first = channel.send(message())
        second = channel.send(message())
        other = channel.send(message(key="another-key"))
        ids = [r.message["Message-ID"] for r in starttls_server.handler.received]
        assert ids[0] == ids[1] == first.provider_ref == second.provider_ref
        assert ids[2] == other.provider_ref != ids[0]

    def test_non_ascii_address_goes_over_smtputf8(
        self, starttls_server: Server, certificate: Certificate
    ) -> None:
        to = OutgoingMessage(key=KEY, channel="email", address="maría@ejemplo.org",
                             language="es", subject=SUBJECT, body="Hola")
        SmtpChannel(config(starttls_server.port, certificate)).send(to)
        (got,) = starttls_server.handler.received
        assert got.rcpt_tos == ["maría@ejemplo.org"]
        assert got.message["To"] == "maría@ejemplo.org"
        assert got.message["Subject"] == SUBJECT

    def test_implicit_tls(self, certificate: Certificate) -> None:
        for server in run(Recorder(), ssl_context=certificate.server_context()):
            SmtpChannel(config(server.port, certificate, security="tls")).send(message())
            (got,) = server.handler.received
            assert got.message["Message-ID"] == message_id(KEY)

    def test_plain_relay_when_security_is_none(self, plain_server: Server) -> None:
        SmtpChannel(config(plain_server.port, security="none")).send(message())
        (got,) = plain_server.handler.received
        assert not got.tls


class TestFailures:
    def test_server_without_starttls_is_refused_permanently(self, plain_server: Server) -> None:
        with pytest.raises(ChannelError, match="STARTTLS") as caught:
            SmtpChannel(config(plain_server.port)).send(message())
        assert not caught.value.retryable
        assert plain_server.handler.received == []

    def test_untrusted_certificate_is_permanent(self, starttls_server: Server) -> None:
        """The system trust store does not know the test certificate: nothing is sent."""
        with pytest.raises(ChannelError, match="certificate") as caught:
            SmtpChannel(config(starttls_server.port)).send(message())
        assert not caught.value.retryable
        assert starttls_server.handler.received == []

    def test_bad_credentials_are_permanent(
        self, starttls_server: Server, certificate: Certificate
    ) -> None:
        channel = SmtpChannel(config(starttls_server.port, certificate,
                                     username="careloop", password="wrong"))
        with pytest.raises(ChannelError, match="535") as caught:
            channel.send(message())
        assert not caught.value.retryable

    def test_rejected_recipient_550_is_permanent(self, certificate: Certificate) -> None:
        for server in run(Recorder("550 5.1.1 No such user"),
                          tls_context=certificate.server_context(), require_starttls=True):
            with pytest.raises(ChannelError, match="550") as caught:
                SmtpChannel(config(server.port, certificate)).send(message())
            assert not caught.value.retryable
            assert "No such user" in str(caught.value)

    def test_greylisted_recipient_451_is_retryable(self, certificate: Certificate) -> None:
        for server in run(Recorder("451 4.7.1 Greylisted, try again later"),
                          tls_context=certificate.server_context(), require_starttls=True):
            with pytest.raises(ChannelError, match="451") as caught:
                SmtpChannel(config(server.port, certificate)).send(message())
            assert caught.value.retryable

    def test_message_refused_at_data_451_is_retryable(self, certificate: Certificate) -> None:
        for server in run(Recorder(data_reply="451 4.3.0 Queue full"),
                          tls_context=certificate.server_context(), require_starttls=True):
            with pytest.raises(ChannelError, match="451") as caught:
                SmtpChannel(config(server.port, certificate)).send(message())
            assert caught.value.retryable
            assert not getattr(caught.value, "maybe_sent", False), "a reply is a clear no"

    def test_message_refused_at_data_554_is_permanent(self, certificate: Certificate) -> None:
        for server in run(Recorder(data_reply="554 5.6.0 Message rejected"),
                          tls_context=certificate.server_context(), require_starttls=True):
            with pytest.raises(ChannelError, match="554") as caught:
                SmtpChannel(config(server.port, certificate)).send(message())
            assert not caught.value.retryable

    def test_non_ascii_address_without_smtputf8_is_permanent(self) -> None:
        for server in run(Recorder(), enable_SMTPUTF8=False):
            to = OutgoingMessage(key=KEY, channel="email", address="maría@ejemplo.org",
                                 language="es", subject="x", body="y")
            with pytest.raises(ChannelError, match="SMTPUTF8") as caught:
                SmtpChannel(config(server.port, security="none")).send(to)
            assert not caught.value.retryable
            assert server.handler.received == []

    def test_nothing_listening_is_retryable(self) -> None:
        with pytest.raises(ChannelError) as caught:
            SmtpChannel(config(free_port())).send(message())
        assert caught.value.retryable
        assert not getattr(caught.value, "maybe_sent", False)

    def test_silent_server_times_out_retryably(self) -> None:
        with socket.socket() as listener:
            listener.bind((HOST, 0))
            listener.listen()
            port = listener.getsockname()[1]
            with pytest.raises(ChannelError, match="timed out") as caught:
                SmtpChannel(config(port, timeout_s=0.3)).send(message())
        assert caught.value.retryable
        assert not getattr(caught.value, "maybe_sent", False), "nothing was sent yet"

    def test_no_reply_after_the_message_is_maybe_sent(self, certificate: Certificate) -> None:
        """The server got the whole message and did not answer in time: it may deliver it."""
        for server in run(Recorder(data_delay_s=1.0),
                          tls_context=certificate.server_context(), require_starttls=True):
            with pytest.raises(ChannelError, match="timed out") as caught:
                SmtpChannel(config(server.port, certificate, timeout_s=0.3)).send(message())
            assert caught.value.retryable
            assert getattr(caught.value, "maybe_sent", False)
            assert len(server.handler.received) == 1

    def test_line_break_in_address_is_permanent(self, plain_server: Server) -> None:
        bad = OutgoingMessage(key=KEY, channel="email", language="es", subject="x", body="y",
                              address="maria@example.org\r\nBcc: all@example.org")
        with pytest.raises(ChannelError) as caught:
            SmtpChannel(config(plain_server.port, security="none")).send(bad)
        assert not caught.value.retryable
        assert plain_server.handler.received == []


class TestRenderHtml:
    def test_escapes_and_links(self) -> None:
        page = render_html('1 < 2 & "3"\n\nSee https://x.example/a?b=1&c=<2>, ok.',
                           language="en", title="T & T")
        assert "<title>T &amp; T</title>" in page and '<html lang="en">' in page
        assert "<p>1 &lt; 2 &amp; &quot;3&quot;</p>" in page
        assert '<a href="https://x.example/a?b=1&amp;c=">https://x.example/a?b=1&amp;c=</a>' \
            "&lt;2&gt;, ok." in page

    def test_paragraphs_from_blank_lines(self) -> None:
        page = render_html("one\ntwo\n\n\nthree\r\n\r\nfour")
        assert "<p>one<br>\ntwo</p>\n<p>three</p>\n<p>four</p>" in page

    def test_trailing_punctuation_stays_outside_the_link(self) -> None:
        page = render_html("Go to https://portal.example/x).")
        assert '<a href="https://portal.example/x">https://portal.example/x</a>).' in page
