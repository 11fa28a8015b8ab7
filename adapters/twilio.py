"""Twilio SMS and voice channels, TwiML builders, webhook signatures and webhook parsers.

Channels (both satisfy :class:`adapters.channels.Channel`):

* :class:`TwilioSms` creates a Message (``POST /2010-04-01/Accounts/{sid}/Messages.json``);
* :class:`TwilioVoice` places a Call (``.../Calls.json``) whose inline TwiML says the message
  and, when ``message.reply_url`` is set, gathers one key press posted to that URL.

Both send the touch key to Twilio three ways: ``Idempotency-Key`` and
``I-Twilio-Idempotency-Token`` headers (the first 32 hex characters of the key's SHA-256, the
raw key never leaves careloop), and ``?key=<touch key>`` appended to the configured
``StatusCallback`` so that every delivery receipt names its touch.

Contract of ``send``: the Twilio answer 200/201 gives ``Receipt(key, provider_ref=<sid>)``.
Failures raise :class:`ChannelError`: 408, 429, 5xx, timeouts and transport errors are
``retryable`` (no ``Retry-After`` is honoured here: the caller reschedules); other answers are
permanent and name Twilio's error ``code`` and ``message`` (21211: invalid ``To`` number).
A retryable error where Twilio may nevertheless have acted (the request went out and no answer
came back, a 500/502/504, a 2xx without a sid) carries ``maybe_sent = True``; connection
failures, 408, 429 and 503 (refused before processing) do not. The sender does not repeat a
``maybe_sent`` failure unless the channel is ``idempotent``.

``lookup`` always returns ``None``: Twilio keeps no memory of our key that can be queried. The
integration layer answers "was this key delivered?" from the status callbacks it stored (they
carry the key), and ``idempotent`` (from :attr:`TwilioConfig.idempotent`) says whether a repeat
is safe anyway because the provider honours the idempotency headers.

Webhooks: :func:`twilio_signature` / :func:`verify_signature` implement Twilio's documented
``X-Twilio-Signature`` (base64 HMAC-SHA1 keyed by the auth token over the full URL followed by
every form parameter name and value, sorted by name); only form-encoded bodies are supported,
not JSON bodies signed through ``bodySHA256``. :func:`parse_status` and :func:`parse_inbound`
turn the form parameters of a status callback or an inbound SMS / ``<Gather>`` into small
frozen dataclasses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from adapters.channels import ChannelError, OutgoingMessage, Receipt

__all__ = [
    "InboundEvent",
    "StatusEvent",
    "TwilioConfig",
    "TwilioSms",
    "TwilioVoice",
    "gather_twiml",
    "message_twiml",
    "parse_inbound",
    "parse_status",
    "say_language",
    "say_twiml",
    "twilio_signature",
    "verify_signature",
]

API_VERSION = "2010-04-01"
TWIML_LIMIT = 4000
"""Twilio refuses a call whose inline ``Twiml`` parameter is longer than this."""
# Retryable answers that were refused before processing (RFC 9110 15.5.9 and 15.6.4, RFC 6585
# 4): Twilio did not act on them. Other 5xx are retryable too, but the outcome is unknown.
_NOT_PROCESSED = frozenset({408, 429, 503})
# Failures before any byte of the request left: nothing can have been sent.
_CONNECT_PHASE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class _MaybeSent(ChannelError):
    """Retryable, but Twilio may have taken the message: the sender reads ``maybe_sent``."""

    maybe_sent = True


@dataclass(frozen=True, kw_only=True)
class TwilioConfig:
    account: str
    """Account SID (``AC...``): the path segment and the basic-auth user."""
    token: str = field(repr=False)
    """Auth token: the basic-auth password and the webhook signing key."""
    from_number: str
    status_callback: str | None = None
    """Delivery-receipt URL; ``key=<touch key>`` is appended to its query."""
    base_url: str = "https://api.twilio.com"
    idempotent: bool = False
    """True when the provider honours ``Idempotency-Key`` (a repeated send is dropped)."""
    timeout_s: float = 10


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _with_key(url: str, key: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != "key"]
    query.append(("key", key))
    return urlunsplit(parts._replace(query=urlencode(query)))


class _TwilioResource:
    """Shared POST-and-interpret logic of the Messages and Calls resources."""

    resource = ""

    def __init__(self, config: TwilioConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self.idempotent: bool = config.idempotent
        self._owned = client is None
        self._client = client if client is not None else httpx.Client()

    @property
    def url(self) -> str:
        base = self.config.base_url.rstrip("/")
        return f"{base}/{API_VERSION}/Accounts/{self.config.account}/{self.resource}.json"

    def close(self) -> None:
        """Close the HTTP client if this channel created it."""
        if self._owned:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, key: str) -> Receipt | None:
        """Always ``None``: Twilio cannot be asked about our key (see the module docstring)."""
        return None

    def _fields(self, message: OutgoingMessage) -> dict[str, str]:
        raise NotImplementedError

    def send(self, message: OutgoingMessage) -> Receipt:
        data = {"To": message.address, "From": self.config.from_number, **self._fields(message)}
        if self.config.status_callback:
            data["StatusCallback"] = _with_key(self.config.status_callback, message.key)
        token = _digest(message.key)
        headers = {
            "Idempotency-Key": token,
            "I-Twilio-Idempotency-Token": token,
            "Accept": "application/json",
        }
        what = f"Twilio {self.resource}"
        try:
            response = self._client.post(
                self.url, data=data, headers=headers,
                auth=(self.config.account, self.config.token), timeout=self.config.timeout_s,
            )
        except _CONNECT_PHASE as exc:
            raise ChannelError(f"{what}: not reachable ({type(exc).__name__}: {exc})") from exc
        except httpx.TimeoutException as exc:
            raise _MaybeSent(f"{what}: no answer in time ({type(exc).__name__}); the request "
                             "may have been taken") from exc
        except httpx.TransportError as exc:
            raise _MaybeSent(f"{what}: {type(exc).__name__}: {exc}; the request may have been "
                             "taken") from exc
        return self._receipt(message.key, response)

    def _receipt(self, key: str, response: httpx.Response) -> Receipt:
        what = f"Twilio {self.resource}"
        status = response.status_code
        body = _json(response)
        if status in (200, 201):
            sid = body.get("sid") if body is not None else None
            if not isinstance(sid, str) or not sid:
                # Taken, most likely, but without a sid nothing identifies it.
                raise _MaybeSent(f"{what}: answered {status} without a sid")
            return Receipt(key, sid, datetime.now(UTC))
        text = f"{what}: {_describe(status, body, response)}"
        if status in _NOT_PROCESSED:
            raise ChannelError(text)
        if status >= 500:
            raise _MaybeSent(text)
        raise ChannelError(text, retryable=False)


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _describe(status: int, body: dict[str, Any] | None, response: httpx.Response) -> str:
    if body is not None and ("code" in body or "message" in body):
        code = body.get("code")
        text = str(body.get("message") or "").strip()
        if code is None:
            return f"HTTP {status}: {text}"
        return f"HTTP {status}, error {code}: {text}"
    snippet = response.text.strip().replace("\n", " ")[:200]
    return f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


class TwilioSms(_TwilioResource):
    """SMS through Twilio's Messages resource (``Body`` is ``message.body``)."""

    resource = "Messages"

    def _fields(self, message: OutgoingMessage) -> dict[str, str]:
        return {"Body": message.body}


class TwilioVoice(_TwilioResource):
    """A phone call through Twilio's Calls resource with inline TwiML.

    The call says ``message.body`` in ``message.language``; with ``message.reply_url`` it
    gathers one key press posted to that URL (:func:`gather_twiml`), else it hangs up after
    speaking (:func:`say_twiml`). The account's default text-to-speech voice for the locale is
    used (Twilio Console, "Text-to-speech" settings).
    """

    resource = "Calls"

    def _fields(self, message: OutgoingMessage) -> dict[str, str]:
        if message.reply_url:
            twiml = gather_twiml(message.body, message.language, message.reply_url)
        else:
            twiml = say_twiml(message.body, message.language)
        if len(twiml) > TWIML_LIMIT:
            raise ChannelError(
                f"Twilio Calls: TwiML is {len(twiml)} characters, over Twilio's {TWIML_LIMIT}",
                retryable=False,
            )
        return {"Twiml": twiml}


# --------------------------------------------------------------------------------------- TwiML

_SAY_LOCALES = {
    "da": "da-DK", "de": "de-DE", "en": "en-US", "es": "es-US", "fi": "fi-FI", "fr": "fr-FR",
    "it": "it-IT", "ja": "ja-JP", "ko": "ko-KR", "nb": "nb-NO", "nl": "nl-NL", "no": "nb-NO",
    "pl": "pl-PL", "pt": "pt-BR", "ru": "ru-RU", "sv": "sv-SE", "zh": "zh-CN",
}
_SAY_REGIONAL = frozenset({
    "en-AU", "en-CA", "en-GB", "en-IN", "en-US", "es-ES", "es-MX", "es-US", "fr-CA", "fr-FR",
    "pt-BR", "pt-PT", "zh-CN", "zh-HK", "zh-TW", "de-DE", "it-IT",
})
_GOODBYE = {
    "da": "Farvel.", "de": "Auf Wiedersehen.", "en": "Goodbye.", "es": "Adiós.",
    "fi": "Näkemiin.", "fr": "Au revoir.", "it": "Arrivederci.", "ja": "さようなら。",
    "ko": "안녕히 계세요.", "nb": "Ha det.", "nl": "Tot ziens.", "pl": "Do widzenia.",
    "pt": "Tchau.", "ru": "До свидания.", "sv": "Hej då.", "zh": "再见。",
}
# Characters XML 1.0 cannot carry at all (escaping does not help): dropped from spoken text.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def say_language(language: str) -> str:
    """Twilio's ``<Say language>`` for a BCP 47 tag: ``es`` → ``es-US``, ``es-MX`` stays,
    ``fr-BE`` → ``fr-FR``; anything unknown → ``en-US``."""
    parts = language.replace("_", "-").split("-")
    base = parts[0].lower()
    if len(parts) > 1:
        regional = f"{base}-{parts[-1].upper()}"
        if regional in _SAY_REGIONAL:
            return regional
    return _SAY_LOCALES.get(base, "en-US")


def _goodbye(locale: str) -> str:
    return _GOODBYE.get(locale.partition("-")[0], _GOODBYE["en"])


def _say(parent: ET.Element, text: str, locale: str) -> None:
    say = ET.SubElement(parent, "Say", {"language": locale})
    say.text = _NOT_XML.sub("", text)


def _xml(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode", short_empty_elements=True)


def gather_twiml(text: str, language: str, action_url: str, *, prompt_repeat: bool = True) -> str:
    """TwiML that says ``text`` while waiting for one key press, posted to ``action_url``.

    ``<Response><Gather numDigits="1" action=... method="POST" timeout="8"><Say language=...>
    text</Say></Gather>[the same Gather again]<Say ...>goodbye</Say></Response>``: when no key
    is pressed within 8 seconds Twilio moves on to the next verb, so ``prompt_repeat`` asks a
    second time before the goodbye (in the same language) and the hang-up.
    """
    locale = say_language(language)
    root = ET.Element("Response")
    for _ in range(2 if prompt_repeat else 1):
        gather = ET.SubElement(root, "Gather", {
            "numDigits": "1", "action": action_url, "method": "POST", "timeout": "8",
        })
        _say(gather, text, locale)
    _say(root, _goodbye(locale), locale)
    return _xml(root)


def say_twiml(text: str, language: str) -> str:
    """TwiML that says ``text`` and hangs up."""
    locale = say_language(language)
    root = ET.Element("Response")
    _say(root, text, locale)
    ET.SubElement(root, "Hangup")
    return _xml(root)


def message_twiml(text: str | None) -> str:
    """The answer to an inbound-SMS webhook: a reply ``<Message>``, or ``<Response/>`` (none)."""
    if text is None:
        return "<Response/>"
    root = ET.Element("Response")
    ET.SubElement(root, "Message").text = _NOT_XML.sub("", text)
    return _xml(root)


# ---------------------------------------------------------------------------------- signatures

Params = Mapping[str, str | Sequence[str]]


def twilio_signature(auth_token: str, url: str, params: Params) -> str:
    """Twilio's ``X-Twilio-Signature`` for a form-encoded request to ``url`` (the full URL as
    configured at Twilio, query included): base64 of HMAC-SHA1 keyed by the auth token over
    ``url`` followed by each POST parameter's name and value, sorted by name (a repeated name
    contributes each of its values, sorted, as Twilio's own validators do)."""
    payload = [url]
    for name in sorted(params):
        value = params[name]
        values = [value] if isinstance(value, str) else sorted(set(value))
        payload.extend(name + v for v in values)
    mac = hmac.new(auth_token.encode(), "".join(payload).encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _url_variants(url: str) -> list[str]:
    """``url`` as given, without its port and with the scheme's default port: Twilio signs
    some requests with the port and some without (its SDKs accept both)."""
    parts = urlsplit(url)
    variants = [url]
    host = parts.hostname
    if host is None:
        return variants
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    shown = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        variants.append(urlunsplit(parts._replace(netloc=prefix + shown)))
    else:
        default = 443 if parts.scheme == "https" else 80
        variants.append(urlunsplit(parts._replace(netloc=f"{prefix}{shown}:{default}")))
    return variants


def verify_signature(auth_token: str, url: str, params: Params, signature: str) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) signs this request.

    ``params`` are the form fields of the body only; ``url`` is the full public URL Twilio
    called, query included (behind a proxy, the URL as configured at Twilio, not the internal
    one). Compared in constant time.
    """
    if not signature:
        return False
    given = signature.encode()
    return any(
        hmac.compare_digest(twilio_signature(auth_token, candidate, params).encode(), given)
        for candidate in _url_variants(url)
    )


# ------------------------------------------------------------------------------------ webhooks

@dataclass(frozen=True)
class StatusEvent:
    """A delivery receipt (status callback) for a message or a call.

    The touch key is not here: it is the ``key`` query parameter of the callback URL, which
    the caller reads from the request.
    """

    provider_id: str
    """``MessageSid`` or ``CallSid``."""
    status: str
    """``MessageStatus`` (queued, sent, delivered, undelivered, failed, ...) or ``CallStatus``
    (ringing, in-progress, completed, busy, no-answer, failed, canceled)."""
    error_code: str | None = None
    """Twilio's ``ErrorCode`` when the message failed (30003 unreachable, ...)."""


@dataclass(frozen=True)
class InboundEvent:
    """What a person sent: an SMS, or the key pressed in a call's ``<Gather>``."""

    provider_id: str
    """``MessageSid`` or ``CallSid``."""
    from_address: str
    """The person's number: ``From`` of an SMS or of a call they placed; ``To`` of a call we
    placed (``Direction`` outbound-api / outbound-dial), since they answered it."""
    to_address: str
    """Our number (the other side)."""
    text: str
    """``Body`` of an SMS, ``Digits`` of a call ("" when nothing was pressed)."""
    kind: Literal["sms", "voice"]


def _first(params: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = params.get(name)
        if value:
            return value
    return ""


def parse_status(params: Mapping[str, str]) -> StatusEvent:
    """Read a status callback's form fields; ``ValueError`` when it names no message or call."""
    if _first(params, "MessageSid", "SmsSid"):
        sid = _first(params, "MessageSid", "SmsSid")
        status = _first(params, "MessageStatus", "SmsStatus")
    else:
        sid = _first(params, "CallSid")
        status = _first(params, "CallStatus")
    if not sid or not status:
        raise ValueError("not a Twilio status callback: no MessageSid/CallSid with a status")
    return StatusEvent(sid, status, _first(params, "ErrorCode") or None)


def parse_inbound(params: Mapping[str, str]) -> InboundEvent:
    """Read an inbound SMS or a ``<Gather>`` action's form fields; ``ValueError`` when it names
    no message or call."""
    sms_sid = _first(params, "MessageSid", "SmsSid")
    if sms_sid:
        return InboundEvent(sms_sid, _first(params, "From"), _first(params, "To"),
                            params.get("Body", ""), "sms")
    call_sid = _first(params, "CallSid")
    if not call_sid:
        raise ValueError("not a Twilio inbound request: no MessageSid or CallSid")
    caller, called = _first(params, "From"), _first(params, "To")
    if _first(params, "Direction").startswith("outbound"):
        caller, called = called, caller
    return InboundEvent(call_sid, caller, called, params.get("Digits", ""), "voice")
