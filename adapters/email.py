"""The email channel: one message per touch over SMTP (smtplib), text and HTML alternatives.

:class:`SmtpChannel` satisfies :class:`adapters.channels.Channel`. Each message carries
``Subject``, ``From``, ``To``, ``Date``, ``Auto-Submitted: auto-generated``, a ``Message-ID``
derived from the touch key (``<first 32 hex of sha256(key)@careloop>``, the same for every
attempt, so a repeat is recognisable downstream) and ``X-Careloop-Key`` with the same hash (the
raw key never leaves careloop). The body is ``text/plain`` (``message.body``) with a
``text/html`` alternative: ``message.html`` when given, else the text rendered as escaped HTML
paragraphs with clickable links (:func:`render_html`).

Transport security (:attr:`SmtpConfig.security`): ``"starttls"`` (default, port 587) requires
the server to offer STARTTLS and upgrades before anything else (a server without it is a
permanent error, nothing is sent in clear); ``"tls"`` is implicit TLS (port 465); ``"none"``
is plain SMTP, for a local relay only. Certificates are verified (``ssl_context`` replaces the
default context, e.g. to trust a test certificate). ``username`` set means ``AUTH`` after TLS.

Errors raise :class:`ChannelError`: no connection, timeouts, a dropped connection and 4xx SMTP
replies (451 try later) are ``retryable``; 5xx replies (550 unknown recipient, 535 bad
credentials), a missing STARTTLS, a certificate that does not verify and a malformed message
are permanent. A timeout or a dropped connection after the whole message went out (waiting for
the reply to the final ``.``) carries ``maybe_sent = True``: the server may have taken it, and
the sender does not repeat such a failure unless the channel is ``idempotent``. An address
that is not ASCII needs the server's SMTPUTF8 (permanent error without it).

``lookup`` returns ``None``: SMTP keeps nothing to ask. ``idempotent`` is
:attr:`SmtpConfig.idempotent` (default ``False``: a repeated send delivers again, though with
the same ``Message-ID``).
"""

from __future__ import annotations

import contextlib
import html
import re
import smtplib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.policy import Policy
from email.utils import format_datetime, parseaddr
from hashlib import sha256
from typing import Literal

from adapters.channels import ChannelError, OutgoingMessage, Receipt

__all__ = [
    "SmtpChannel", "SmtpConfig", "build_message", "key_hash", "message_id", "render_html",
]


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    host: str
    from_address: str
    """``From`` header (``"Clinic <noreply@clinic.example>"`` or a bare address); its address
    is the envelope sender."""
    port: int = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 15
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """Replaces the default (system trust store, hostname checked) context."""
    idempotent: bool = False


def key_hash(key: str) -> str:
    """The ``X-Careloop-Key`` header: the first 32 hex characters of the key's SHA-256."""
    return sha256(key.encode()).hexdigest()[:32]


def message_id(key: str) -> str:
    """The ``Message-ID`` of the touch with this key: ``<sha256(key)[:32]@careloop>``."""
    return f"<{key_hash(key)}@careloop>"


_URL = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'\""
_BLANK_LINE = re.compile(r"\n[ \t]*\n+")


def _linkify(text: str) -> str:
    """Escape ``text`` for HTML, making http(s) URLs links (trailing punctuation stays out)."""
    out: list[str] = []
    last = 0
    for found in _URL.finditer(text):
        url = found.group().rstrip(_TRAILING)
        start, end = found.start(), found.start() + len(url)
        out.append(html.escape(text[last:start]))
        href = html.escape(url, quote=True)
        out.append(f'<a href="{href}">{html.escape(url)}</a>')
        last = end
    out.append(html.escape(text[last:]))
    return "".join(out)


def render_html(text: str, *, language: str = "en", title: str = "") -> str:
    """A minimal HTML document for plain ``text``: escaped, one ``<p>`` per block separated by
    blank lines, single line breaks kept as ``<br>``, http(s) URLs clickable."""
    blocks = [b.strip() for b in _BLANK_LINE.split(text.replace("\r\n", "\n").strip())]
    paragraphs = "\n".join(
        "<p>" + "<br>\n".join(_linkify(line) for line in block.split("\n")) + "</p>"
        for block in blocks if block
    )
    return (
        f'<!DOCTYPE html>\n<html lang="{html.escape(language, quote=True)}">\n'
        f'<head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body>\n{paragraphs}\n</body>\n</html>\n"
    )


def build_message(message: OutgoingMessage, from_address: str, *,
                  now: datetime | None = None) -> EmailMessage:
    """The email for ``message``; ``ValueError`` for a header that cannot be carried (a line
    break in the subject or the address)."""
    mail = EmailMessage(policy=SMTP_POLICY)
    mail["Subject"] = message.subject
    mail["From"] = from_address
    mail["To"] = message.address
    mail["Date"] = format_datetime(now or datetime.now(UTC))
    mail["Message-ID"] = message_id(message.key)
    mail["X-Careloop-Key"] = key_hash(message.key)
    mail["Auto-Submitted"] = "auto-generated"
    if message.language:
        mail["Content-Language"] = message.language
    mail.set_content(message.body)
    alternative = message.html or render_html(
        message.body, language=message.language or "en", title=message.subject
    )
    mail.add_alternative(alternative, subtype="html")
    return mail


def _reply_error(what: str, code: int, text: bytes | str) -> ChannelError:
    reply = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return ChannelError(f"SMTP {what}: {code} {reply}".strip(), retryable=code < 500)


class _MaybeSent(ChannelError):
    """Retryable, but the server may have taken the message (the connection failed after the
    whole message was sent, before the final reply): the sender reads ``maybe_sent``."""

    maybe_sent = True


def _failure(exc: smtplib.SMTPException | OSError, where: str, *, maybe_sent: bool
             ) -> ChannelError:
    if isinstance(exc, smtplib.SMTPResponseException):  # a reply: the server said no
        return _reply_error(f"{where} refused", exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return ChannelError(f"SMTP {where}: {exc}", retryable=False)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ChannelError(f"SMTP {where}: TLS certificate not trusted: {exc.verify_message}",
                            retryable=False)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        text = f"SMTP {where}: connection lost: {exc}"
    elif isinstance(exc, ssl.SSLError):
        text = f"SMTP {where}: TLS failed: {exc}"
    elif isinstance(exc, TimeoutError):
        text = f"SMTP {where}: timed out"
    elif isinstance(exc, smtplib.SMTPException):
        text = f"SMTP {where}: {exc}"
    else:
        text = f"SMTP {where}: {exc.strerror or exc}"
    if maybe_sent:
        return _MaybeSent(f"{text}; the server may have taken the message")
    return ChannelError(text)


class SmtpChannel:
    """Sends each message in its own SMTP session (see the module docstring)."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.idempotent: bool = config.idempotent

    def lookup(self, key: str) -> Receipt | None:
        """Always ``None``: an SMTP server cannot be asked whether a message went out."""
        return None

    def send(self, message: OutgoingMessage) -> Receipt:
        config = self.config
        try:
            mail = build_message(message, config.from_address)
        except ValueError as exc:
            raise ChannelError(f"email: cannot build the message: {exc}", retryable=False) from None
        sender = parseaddr(config.from_address)[1] or config.from_address
        where = f"{config.host}:{config.port}"
        data_sent = False
        try:
            smtp = self._connect()
            try:
                self._secure_and_login(smtp)
                options, policy = self._options(smtp, sender, message.address)
                payload = mail.as_bytes(policy=policy)
                code, reply = smtp.mail(sender, options)
                if code != 250:
                    raise _reply_error(f"{where} refused the sender", code, reply)
                code, reply = smtp.rcpt(message.address)
                if code not in (250, 251):
                    raise _reply_error(f"{where} refused the recipient", code, reply)
                data_sent = True
                code, reply = smtp.data(payload)
                if code != 250:
                    raise _reply_error(f"{where} refused the message", code, reply)
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    smtp.quit()  # taken already: a failing QUIT changes nothing
            finally:
                smtp.close()
        except (smtplib.SMTPException, OSError) as exc:
            raise _failure(exc, where, maybe_sent=data_sent) from None
        return Receipt(message.key, message_id(message.key), datetime.now(UTC))

    def _options(self, smtp: smtplib.SMTP, *addresses: str) -> tuple[list[str], Policy]:
        """``MAIL FROM`` options and the serialisation policy: 7-bit headers, unless an address
        is not ASCII, which needs the server's SMTPUTF8."""
        if all(address.isascii() for address in addresses):
            return [], SMTP_POLICY
        if not smtp.has_extn("smtputf8"):
            raise ChannelError(
                f"SMTP {self.config.host}:{self.config.port} does not offer SMTPUTF8, needed "
                f"for the address {addresses[-1]!r}", retryable=False,
            )
        return ["SMTPUTF8", "BODY=8BITMIME"], SMTP_POLICY.clone(utf8=True)

    def _context(self) -> ssl.SSLContext:
        return self.config.ssl_context or ssl.create_default_context()

    def _connect(self) -> smtplib.SMTP:
        config = self.config
        if config.security == "tls":
            return smtplib.SMTP_SSL(config.host, config.port, timeout=config.timeout_s,
                                    context=self._context())
        return smtplib.SMTP(config.host, config.port, timeout=config.timeout_s)

    def _secure_and_login(self, smtp: smtplib.SMTP) -> None:
        config = self.config
        smtp.ehlo()
        if config.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise ChannelError(
                    f"SMTP {config.host}:{config.port} does not offer STARTTLS, which "
                    "security='starttls' requires; nothing was sent",
                    retryable=False,
                )
            smtp.starttls(context=self._context())
            smtp.ehlo()
        if config.username:
            smtp.login(config.username, config.password or "")
