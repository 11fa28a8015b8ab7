"""The Twilio channels against a mocked API (respx), TwiML, webhook signatures and parsers."""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx

from adapters.channels import Channel, ChannelError, FileChannel, OutgoingMessage
from adapters.twilio import (
    InboundEvent,
    StatusEvent,
    TwilioConfig,
    TwilioSms,
    TwilioVoice,
    gather_twiml,
    message_twiml,
    parse_inbound,
    parse_status,
    say_language,
    say_twiml,
    twilio_signature,
    verify_signature,
)

BASE = "https://twilio.test"
ACCOUNT = "AC0123456789abcdef0123456789abcdef"
MESSAGES = f"{BASE}/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
CALLS = f"{BASE}/2010-04-01/Accounts/{ACCOUNT}/Calls.json"
KEY = "appointment-reminder|0|e1 & more"
KEY_HASH = hashlib.sha256(KEY.encode()).hexdigest()[:32]


def config(**changes: object) -> TwilioConfig:
    values: dict[str, object] = {
        "base_url": BASE, "account": ACCOUNT, "token": "secret-token",
        "from_number": "+15550001111",
        "status_callback": "https://hooks.example.org/twilio/status",
    }
    values.update(changes)
    return TwilioConfig(**values)  # type: ignore[arg-type]


def sms(key: str = KEY, body: str = "Su cita es mañana a las 9:00") -> OutgoingMessage:
    return OutgoingMessage(key=key, channel="sms", address="+15550102030", language="es",
                           subject="", body=body)


def call(language: str = "es", reply_url: str | None = "https://hooks.example.org/twilio/gather?t=1"
         ) -> OutgoingMessage:
    return OutgoingMessage(key=KEY, channel="voice", address="+15550102030", language=language,
                           subject="", body="Pulse 1 para confirmar <su> cita & 2 para cancelar",
                           reply_url=reply_url)


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


def form(request: httpx.Request) -> dict[str, str]:
    parsed = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in parsed.values())
    return {k: v[0] for k, v in parsed.items()}


def twilio_error(status: int, code: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={
        "code": code, "message": message, "status": status,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
    })


class TestSms:
    def test_is_a_channel_without_key_memory(self) -> None:
        channel: Channel = TwilioSms(config())
        assert channel.lookup(KEY) is None

    def test_posts_the_message_form_with_auth_and_idempotency_headers(
        self, api: respx.MockRouter
    ) -> None:
        route = api.post(MESSAGES).mock(
            return_value=httpx.Response(201, json={"sid": "SM123", "status": "queued"})
        )
        receipt = TwilioSms(config()).send(sms())
        assert receipt.key == KEY and receipt.provider_ref == "SM123" and not receipt.duplicate
        assert receipt.at.tzinfo is not None
        request = route.calls.last.request
        assert str(request.url) == MESSAGES
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        expected_auth = base64.b64encode(f"{ACCOUNT}:secret-token".encode()).decode()
        assert request.headers["authorization"] == f"Basic {expected_auth}"
        assert request.headers["idempotency-key"] == KEY_HASH
        assert request.headers["i-twilio-idempotency-token"] == KEY_HASH
        fields = form(request)
        assert fields["To"] == "+15550102030"
        assert fields["From"] == "+15550001111"
        assert fields["Body"] == "Su cita es mañana a las 9:00"
        callback = urlsplit(fields["StatusCallback"])
        assert callback._replace(query="").geturl() == "https://hooks.example.org/twilio/status"
        assert parse_qs(callback.query) == {"key": [KEY]}
        assert set(fields) == {"To", "From", "Body", "StatusCallback"}

    def test_key_joins_an_existing_callback_query(self, api: respx.MockRouter) -> None:
        route = api.post(MESSAGES).mock(return_value=httpx.Response(201, json={"sid": "SM1"}))
        TwilioSms(config(status_callback="https://h.example/s?tenant=a&key=stale")).send(sms())
        query = parse_qs(urlsplit(form(route.calls.last.request)["StatusCallback"]).query)
        assert query == {"tenant": ["a"], "key": [KEY]}

    def test_no_status_callback_when_not_configured(self, api: respx.MockRouter) -> None:
        route = api.post(MESSAGES).mock(return_value=httpx.Response(200, json={"sid": "SM2"}))
        assert TwilioSms(config(status_callback=None)).send(sms()).provider_ref == "SM2"
        assert "StatusCallback" not in form(route.calls.last.request)

    def test_uses_the_given_client(self, api: respx.MockRouter) -> None:
        api.post(MESSAGES).mock(return_value=httpx.Response(201, json={"sid": "SM3"}))
        with httpx.Client() as client:
            channel = TwilioSms(config(), client)
            assert channel.send(sms()).provider_ref == "SM3"
            channel.close()  # not ours: stays open
            assert not client.is_closed

    def test_invalid_number_is_permanent_and_names_the_code(self, api: respx.MockRouter) -> None:
        api.post(MESSAGES).mock(return_value=twilio_error(
            400, 21211, "The 'To' number +1555 is not a valid phone number."))
        with pytest.raises(ChannelError) as caught:
            TwilioSms(config()).send(sms())
        assert not caught.value.retryable
        assert "21211" in str(caught.value) and "not a valid phone number" in str(caught.value)

    def test_bad_credentials_are_permanent(self, api: respx.MockRouter) -> None:
        api.post(MESSAGES).mock(return_value=twilio_error(401, 20003, "Authenticate"))
        with pytest.raises(ChannelError) as caught:
            TwilioSms(config()).send(sms())
        assert not caught.value.retryable and "20003" in str(caught.value)

    @pytest.mark.parametrize(("response", "maybe_sent"), [
        (httpx.Response(503, text="Service Unavailable"), False),
        (twilio_error(429, 20429, "Too Many Requests"), False),
        (httpx.Response(408), False),
        (httpx.Response(500), True),
        (httpx.Response(502), True),
        (httpx.Response(504), True),
    ], ids=["503", "429", "408", "500", "502", "504"])
    def test_overload_and_server_errors_are_retryable(
        self, api: respx.MockRouter, response: httpx.Response, maybe_sent: bool
    ) -> None:
        """Refused before processing (408, 429, 503): Twilio did not act. Other 5xx: it may
        have, which the sender reads from ``maybe_sent``."""
        api.post(MESSAGES).mock(return_value=response)
        with pytest.raises(ChannelError) as caught:
            TwilioSms(config()).send(sms())
        assert caught.value.retryable
        assert getattr(caught.value, "maybe_sent", False) is maybe_sent
        assert str(response.status_code) in str(caught.value)

    def test_permanent_errors_are_not_maybe_sent(self, api: respx.MockRouter) -> None:
        api.post(MESSAGES).mock(return_value=twilio_error(400, 21211, "invalid"))
        with pytest.raises(ChannelError) as caught:
            TwilioSms(config()).send(sms())
        assert not getattr(caught.value, "maybe_sent", False)

    @pytest.mark.parametrize(("error", "maybe_sent"), [
        (httpx.ConnectError("connection refused"), False),
        (httpx.ConnectTimeout("connect timed out"), False),
        (httpx.PoolTimeout("no connection free"), False),
        (httpx.ReadTimeout("read timed out"), True),
        (httpx.WriteTimeout("write timed out"), True),
        (httpx.RemoteProtocolError("server disconnected"), True),
        (httpx.ReadError("connection reset"), True),
    ], ids=["connect", "connect-timeout", "pool-timeout", "read-timeout", "write-timeout",
            "disconnect", "reset"])
    def test_transport_failures_are_retryable(
        self, api: respx.MockRouter, error: Exception, maybe_sent: bool
    ) -> None:
        """Before the request left nothing was sent; once it left, Twilio may have taken it."""
        api.post(MESSAGES).mock(side_effect=error)
        with pytest.raises(ChannelError) as caught:
            TwilioSms(config()).send(sms())
        assert caught.value.retryable
        assert getattr(caught.value, "maybe_sent", False) is maybe_sent

    def test_success_without_a_sid_is_an_error(self, api: respx.MockRouter) -> None:
        api.post(MESSAGES).mock(return_value=httpx.Response(201, text="<html>ok</html>"))
        with pytest.raises(ChannelError, match="without a sid") as caught:
            TwilioSms(config()).send(sms())
        assert getattr(caught.value, "maybe_sent", False)

    def test_idempotent_follows_the_config(self) -> None:
        assert TwilioSms(config()).idempotent is False
        assert TwilioSms(config(idempotent=True)).idempotent is True
        assert TwilioVoice(config(idempotent=True)).idempotent is True
        assert FileChannel.idempotent is True

    def test_config_repr_hides_the_token(self) -> None:
        assert "secret-token" not in repr(config())


class TestVoice:
    def test_posts_a_call_with_gather_twiml(self, api: respx.MockRouter) -> None:
        route = api.post(CALLS).mock(return_value=httpx.Response(201, json={"sid": "CA9"}))
        receipt = TwilioVoice(config()).send(call())
        assert receipt.provider_ref == "CA9"
        request = route.calls.last.request
        assert str(request.url) == CALLS
        assert request.headers["idempotency-key"] == KEY_HASH
        assert request.headers["i-twilio-idempotency-token"] == KEY_HASH
        fields = form(request)
        assert fields["To"] == "+15550102030" and fields["From"] == "+15550001111"
        assert parse_qs(urlsplit(fields["StatusCallback"]).query) == {"key": [KEY]}
        assert "Body" not in fields
        root = ET.fromstring(fields["Twiml"])
        gather = root.find("Gather")
        assert gather is not None
        assert gather.get("action") == "https://hooks.example.org/twilio/gather?t=1"
        assert gather.get("numDigits") == "1" and gather.get("method") == "POST"
        say = gather.find("Say")
        assert say is not None and say.get("language") == "es-US"
        assert say.text == "Pulse 1 para confirmar <su> cita & 2 para cancelar"

    def test_without_reply_url_the_call_only_speaks(self, api: respx.MockRouter) -> None:
        route = api.post(CALLS).mock(return_value=httpx.Response(201, json={"sid": "CA8"}))
        TwilioVoice(config()).send(call(language="fr", reply_url=None))
        root = ET.fromstring(form(route.calls.last.request)["Twiml"])
        assert root.find("Gather") is None
        assert [child.tag for child in root] == ["Say", "Hangup"]
        assert root[0].get("language") == "fr-FR"

    def test_twiml_over_twilios_limit_is_permanent(self, api: respx.MockRouter) -> None:
        route = api.post(CALLS)
        long = OutgoingMessage(key=KEY, channel="voice", address="+1555", language="en",
                               subject="", body="x" * 3000, reply_url="https://h.example/g")
        with pytest.raises(ChannelError) as caught:
            TwilioVoice(config()).send(long)
        assert not caught.value.retryable and not route.called

    def test_busy_api_is_retryable(self, api: respx.MockRouter) -> None:
        api.post(CALLS).mock(return_value=httpx.Response(503))
        with pytest.raises(ChannelError) as caught:
            TwilioVoice(config()).send(call())
        assert caught.value.retryable


class TestTwiml:
    def test_gather_shape(self) -> None:
        twiml = gather_twiml("Press 1", "en", "https://h.example/g", prompt_repeat=False)
        assert twiml == (
            '<Response><Gather numDigits="1" action="https://h.example/g" method="POST" '
            'timeout="8"><Say language="en-US">Press 1</Say></Gather>'
            '<Say language="en-US">Goodbye.</Say></Response>'
        )

    def test_gather_repeats_the_prompt_once_by_default(self) -> None:
        root = ET.fromstring(gather_twiml("Pulse 1", "es", "https://h.example/g"))
        assert [child.tag for child in root] == ["Gather", "Gather", "Say"]
        assert root[2].text == "Adiós." and root[2].get("language") == "es-US"

    def test_escapes_text_and_attributes(self) -> None:
        twiml = gather_twiml('a <b> & "c"', "en", "https://h.example/g?x=1&y=<2>")
        assert "<b>" not in twiml and "&lt;b&gt; &amp;" in twiml
        assert 'action="https://h.example/g?x=1&amp;y=&lt;2&gt;"' in twiml
        root = ET.fromstring(twiml)
        assert root[0].get("action") == "https://h.example/g?x=1&y=<2>"
        assert root[0][0].text == 'a <b> & "c"'

    def test_characters_xml_cannot_carry_are_dropped(self) -> None:
        root = ET.fromstring(say_twiml("a\x00b\x0bc", "en"))
        assert root[0].text == "abc"

    @pytest.mark.parametrize(("language", "locale"), [
        ("en", "en-US"), ("es", "es-US"), ("es-MX", "es-MX"), ("es-419", "es-US"),
        ("fr", "fr-FR"), ("fr-CA", "fr-CA"), ("fr-BE", "fr-FR"), ("pt", "pt-BR"),
        ("de_de", "de-DE"), ("EN-gb", "en-GB"), ("tlh", "en-US"), ("", "en-US"),
    ])
    def test_say_language(self, language: str, locale: str) -> None:
        assert say_language(language) == locale

    def test_say_hangs_up(self) -> None:
        assert say_twiml("Hi & bye", "xx") == (
            '<Response><Say language="en-US">Hi &amp; bye</Say><Hangup /></Response>'
        )

    def test_message_reply(self) -> None:
        assert message_twiml(None) == "<Response/>"
        assert message_twiml("Gracias <3 & hasta pronto") == (
            "<Response><Message>Gracias &lt;3 &amp; hasta pronto</Message></Response>"
        )


# Twilio's worked example ("Webhooks security", validating signatures).
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
    "From": "+12349013030", "To": "+18005551212",
}
DOC_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


class TestSignature:
    def test_twilio_documented_vector(self) -> None:
        assert twilio_signature("12345", DOC_URL, DOC_PARAMS) == DOC_SIGNATURE
        assert verify_signature("12345", DOC_URL, DOC_PARAMS, DOC_SIGNATURE)

    def test_parameter_order_does_not_matter(self) -> None:
        shuffled = dict(reversed(list(DOC_PARAMS.items())))
        assert verify_signature("12345", DOC_URL, shuffled, DOC_SIGNATURE)

    def test_repeated_parameters(self) -> None:
        """The vector from Twilio's Python helper library tests: repeated names contribute
        every value, sorted."""
        params = {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234"]}
        assert twilio_signature("12345", DOC_URL, params) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="

    def test_forged_signature_fails(self) -> None:
        forged = base64.b64encode(b"\x00" * 20).decode()
        assert not verify_signature("12345", DOC_URL, DOC_PARAMS, forged)
        assert not verify_signature("12345", DOC_URL, DOC_PARAMS, "")
        assert not verify_signature("12345", DOC_URL, DOC_PARAMS, DOC_SIGNATURE[:-1])
        assert not verify_signature("other-token", DOC_URL, DOC_PARAMS, DOC_SIGNATURE)

    def test_changed_parameter_fails(self) -> None:
        assert not verify_signature("12345", DOC_URL, {**DOC_PARAMS, "Digits": "9"},
                                    DOC_SIGNATURE)
        assert not verify_signature("12345", DOC_URL, {**DOC_PARAMS, "Extra": "1"},
                                    DOC_SIGNATURE)
        without = {k: v for k, v in DOC_PARAMS.items() if k != "Digits"}
        assert not verify_signature("12345", DOC_URL, without, DOC_SIGNATURE)

    def test_changed_url_fails(self) -> None:
        assert not verify_signature("12345", DOC_URL.replace("bar=2", "bar=3"), DOC_PARAMS,
                                    DOC_SIGNATURE)
        assert not verify_signature("12345", DOC_URL.replace("https", "http"), DOC_PARAMS,
                                    DOC_SIGNATURE)

    def test_default_port_in_or_out_of_the_url(self) -> None:
        """Twilio signs some requests with the port in the URL, some without."""
        with_port = DOC_URL.replace(".com/", ".com:443/")
        assert verify_signature("12345", with_port, DOC_PARAMS, DOC_SIGNATURE)
        signed_with_port = twilio_signature("12345", with_port, DOC_PARAMS)
        assert verify_signature("12345", DOC_URL, DOC_PARAMS, signed_with_port)


class TestParsers:
    def test_message_status(self) -> None:
        event = parse_status({"MessageSid": "SM1", "MessageStatus": "undelivered",
                              "ErrorCode": "30003", "AccountSid": ACCOUNT})
        assert event == StatusEvent("SM1", "undelivered", "30003")

    def test_legacy_sms_names(self) -> None:
        assert parse_status({"SmsSid": "SM2", "SmsStatus": "sent"}) == StatusEvent("SM2", "sent")

    def test_call_status(self) -> None:
        event = parse_status({"CallSid": "CA1", "CallStatus": "no-answer", "ErrorCode": ""})
        assert event == StatusEvent("CA1", "no-answer", None)

    def test_status_without_sid_is_refused(self) -> None:
        with pytest.raises(ValueError, match="status callback"):
            parse_status({"MessageStatus": "sent"})

    def test_inbound_sms(self) -> None:
        event = parse_inbound({"MessageSid": "SM5", "From": "+15550102030",
                               "To": "+15550001111", "Body": "SI"})
        assert event == InboundEvent("SM5", "+15550102030", "+15550001111", "SI", "sms")

    def test_gather_on_our_outbound_call_names_the_patient_as_sender(self) -> None:
        event = parse_inbound({"CallSid": "CA5", "From": "+15550001111", "To": "+15550102030",
                               "Digits": "1", "Direction": "outbound-api",
                               "CallStatus": "in-progress"})
        assert event == InboundEvent("CA5", "+15550102030", "+15550001111", "1", "voice")

    def test_inbound_call(self) -> None:
        event = parse_inbound({"CallSid": "CA6", "From": "+15550102030", "To": "+15550001111",
                               "Direction": "inbound"})
        assert event == InboundEvent("CA6", "+15550102030", "+15550001111", "", "voice")

    def test_inbound_without_sid_is_refused(self) -> None:
        with pytest.raises(ValueError, match="inbound"):
            parse_inbound({"Body": "hi"})
