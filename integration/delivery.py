"""Wiring for outreach's way out: the channel class per ``[channels.*]`` setting, the patient
page links, and the write-back of every touch's outcome.

* ``sms`` / ``voice``: ``file`` (development: one JSON file per message under
  ``outreach.outbox_dir/<channel>/``) or a Twilio-compatible REST API, with delivery receipts
  requested at ``{base_url}/channels/<channel>/status?key=<touch key>``.
* ``email``: ``file`` or SMTP (STARTTLS by default).
* ``portal``: careloop's own patient page. "Sending" a portal touch publishes it: the page
  (:mod:`integration.portal.page`) shows what the touch is about once the row says ``sent``,
  so the database row is the delivery and :class:`PortalInbox` only acknowledges it.

:func:`writeback_recorder` gives the reconciler and the sender their
:data:`~integration.outreach.record.Recorder`: each final touch becomes a Communication row in
the EHR outbox, in the same transaction (:func:`integration.writeback.enqueue_touch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, select

from adapters.channels import Channel, FileChannel, OutgoingMessage, Receipt
from adapters.email import SmtpChannel, SmtpConfig
from adapters.twilio import TwilioConfig, TwilioSms, TwilioVoice
from integration.models import touches
from integration.outreach.record import Recorder
from integration.outreach.sender import Delivery
from integration.portal.links import LinkSigner, load_secret
from integration.settings import Settings, SmsChannel
from integration.writeback import enqueue_touch

__all__ = ["PortalInbox", "build_channels", "delivery_for", "link_signer", "writeback_recorder"]


class PortalInbox:
    """The portal channel: the touch's row is the message, shown on the patient page."""

    idempotent = True

    def send(self, message: OutgoingMessage) -> Receipt:
        return Receipt(message.key, f"portal:{message.key}"[:255], datetime.now(UTC))

    def lookup(self, key: str) -> Receipt | None:
        # A ``sending`` portal touch was published the moment its row says ``sent``; a crash
        # before that published nothing, and sending again is harmless.
        return None


def _twilio(settings: Settings, name: str, config: SmsChannel) -> TwilioConfig:
    base = settings.base_url.rstrip("/")
    return TwilioConfig(
        base_url=config.base_url, account=config.account, token=config.token,
        from_number=config.from_number,
        status_callback=f"{base}/channels/{name}/status" if config.status_callbacks else None,
        idempotent=config.idempotent,
    )


def build_channels(settings: Settings) -> dict[str, Channel]:
    """Channel name → the class its ``[channels.<name>]`` setting picks."""
    ch = settings.channels
    outbox = settings.outreach.outbox_dir
    out: dict[str, Channel] = {}
    out["sms"] = (TwilioSms(_twilio(settings, "sms", ch.sms)) if ch.sms.provider == "twilio"
                  else FileChannel(outbox / "sms"))
    out["voice"] = (TwilioVoice(_twilio(settings, "voice", ch.voice))
                    if ch.voice.provider == "twilio" else FileChannel(outbox / "voice"))
    if ch.email.provider == "smtp":
        e = ch.email
        out["email"] = SmtpChannel(SmtpConfig(
            host=e.host, port=e.port, security=e.security, username=e.username or None,
            password=e.password or None, from_address=e.from_address))
    else:
        out["email"] = FileChannel(outbox / "email")
    out["portal"] = PortalInbox()
    return out


def link_signer(settings: Settings) -> LinkSigner:
    portal = settings.channels.portal
    return LinkSigner(load_secret(portal.secret, settings.keys_dir), settings.base_url,
                      portal.link_ttl)


def writeback_recorder(settings: Settings) -> Recorder | None:
    """The write-back hook, or None when no connection takes write-backs."""
    if not any(c.write_back for c in settings.connections):
        return None
    def record(conn: Connection, ids: Sequence[int], now: datetime) -> None:
        for start in range(0, len(ids), 1000):
            rows = conn.execute(
                select(touches).where(touches.c.id.in_(list(ids[start : start + 1000])))
                .order_by(touches.c.id)
            ).mappings()
            for row in rows:
                enqueue_touch(conn, settings, row, now=now)

    return record


def delivery_for(settings: Settings, *,
                 after_commit: Callable[[], None] | None = None) -> Delivery:
    """Links, the write-back hook, and ``after_commit`` (called after each sweep batch)."""
    return Delivery(base_url=settings.base_url, links=link_signer(settings),
                    record=writeback_recorder(settings), after_commit=after_commit)
