"""Channels: how a touch leaves careloop (SMS, email, voice, portal).

Every channel sits behind :class:`Channel`, two methods:

* ``send(message) -> Receipt``: deliver one message. ``message.key`` is the touch's idempotency
  key; a second ``send`` with the same key must not deliver again, and returns the first
  delivery's receipt (``duplicate=True``).
* ``lookup(key) -> Receipt | None``: whether a message with this key was delivered. The
  sender asks this for touches left in ``sending`` by a crash between the provider's answer and
  the database commit, and marks them sent instead of sending again.

:class:`FileChannel` is the development channel: each message is one JSON file in a folder,
named after its key and published atomically (written to a temporary file, then hard-linked into
place, which fails if the name exists), so a send is idempotent by key even across processes
and crashes.

Real providers carry the key to the provider so that it, too, can drop a repeat: Twilio's
``Idempotency-Key`` / ``I-Twilio-Idempotency-Token`` headers (:mod:`adapters.twilio`), an SMTP
``Message-ID`` derived from the key (:mod:`adapters.email`), a ``StatusCallback`` URL tagged
with the key so that delivery receipts name the touch. Neither Twilio nor SMTP keeps a memory
the channel can ask, so their ``lookup`` returns ``None``; the integration layer answers the
question from the status callbacks it stored (they carry the key).

Whether a repeated ``send`` is safe is told by an optional attribute, not a protocol member:
``idempotent: bool`` on the channel object (read as ``getattr(channel, "idempotent", False)``).
``True`` means the channel itself drops a second delivery of a key (:class:`FileChannel`, or a
provider that honours the idempotency key); ``False`` means a retry after an ambiguous failure
(a timeout once the request was sent) may deliver twice, so the caller should ``lookup`` or ask
its stored callbacks first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

__all__ = ["Channel", "ChannelError", "FileChannel", "OutgoingMessage", "Receipt", "file_name"]


@dataclass(frozen=True)
class OutgoingMessage:
    key: str
    """The touch's idempotency key: the same key is delivered at most once."""
    channel: str
    address: str
    language: str
    subject: str
    body: str
    html: str | None = None
    reply_url: str | None = None
    """Where the recipient's answer goes: for voice, the URL Twilio posts the pressed key to
    (the ``<Gather action>``); ``None`` when no answer is collected."""


@dataclass(frozen=True)
class Receipt:
    key: str
    provider_ref: str
    at: datetime
    duplicate: bool = False
    """True when the key had been delivered before and nothing was sent now."""


class ChannelError(Exception):
    """A message could not be handed to the channel; ``retryable`` says whether to try again
    later (provider down, rate limited) or give up (bad address). ``maybe_sent`` is true when
    the provider may have taken the message anyway (a timeout after the request went out): a
    channel that is not ``idempotent`` must not be asked again for that key."""

    maybe_sent: bool = False

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Channel(Protocol):
    """What the sender needs of a channel: :meth:`send` and :meth:`lookup`.

    Implementations may also carry ``idempotent: bool`` (see the module docstring); it is read
    with ``getattr(channel, "idempotent", False)`` and is deliberately not part of the protocol,
    so a channel without it is taken as not idempotent.
    """

    def send(self, message: OutgoingMessage) -> Receipt: ...

    def lookup(self, key: str) -> Receipt | None: ...


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(key: str) -> str:
    """A file name for ``key``: readable, and unique by a hash of the whole key."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{_UNSAFE.sub('_', key)[:120].strip('_.')}-{digest}.json"


class FileChannel:
    """Writes each message as ``<folder>/<key-safe-name>.json`` (development and tests)."""

    idempotent = True
    """A second send of a key finds the first file and delivers nothing."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / file_name(key)

    def send(self, message: OutgoingMessage) -> Receipt:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self._path(message.key)
        existing = self.lookup(message.key)
        if existing is not None:
            return existing
        at = datetime.now(UTC)
        record = {**asdict(message), "sent_at": at.isoformat()}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh, ensure_ascii=False, indent=1)
            try:
                os.link(tmp, final)  # atomic, and refuses to replace: one winner per key
            except FileExistsError:
                found = self.lookup(message.key)
                if found is not None:
                    return found
                raise
        except OSError as exc:
            raise ChannelError(f"cannot write {final}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return Receipt(message.key, f"file:{final.name}", at)

    def lookup(self, key: str) -> Receipt | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        if data.get("key") != key:
            return None
        at = datetime.fromisoformat(str(data.get("sent_at")))
        return Receipt(key, f"file:{path.name}", at, duplicate=True)
