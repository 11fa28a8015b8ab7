"""The HL7 sender registry: the ``[[hl7_senders]]`` rules in effect, from the settings file and
from the console.

A sender is matched on the namespace ids of MSH-3 (application) and MSH-4 (facility). Its rule
gives the local time zone of its times, the FHIR systems of its identifier assigning
authorities, and ``ack_to``, where enhanced-mode application ACKs go. Rules come from two places:

* the settings file (``[[hl7_senders]]``), read once at start;
* the console (``sender_settings`` rows, saved by an administrator): a row overrides the file's
  rule with the same application and facility, and adds senders the file does not name.

The effective rules are the console rows plus the file rules they do not override. When several
rules match a message, one naming its facility beats one for any facility (``facility = ""``),
then a console rule beats a file rule, then the file's order decides.

**Every process sees a console change without a restart.** Each process (the serving process,
a Celery worker, a work process) keeps the rows in memory and checks the table with one small
query, ``SELECT count(*), max(updated_at)``, reloading the rows only when its answer changed:
the processing stage checks once per batch, so the message after a save is converted with the
saved rule; application ACK delivery checks every few seconds. Work processes
that cannot read the database are handed the serving process's snapshot with each batch
(:meth:`SenderRegistry.snapshot`, :meth:`SenderRegistry.adopt`). For that check to see every
change, :func:`save_sender` stamps ``updated_at`` later than every row already there, even when
two console hosts' clocks disagree.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from integration.db import dialect_insert, write_lock
from integration.logs import get_logger
from integration.models import audit_events, sender_settings
from integration.settings import HL7Sender, Settings

__all__ = [
    "ConsoleSender",
    "Origin",
    "SenderError",
    "SenderRegistry",
    "SenderRule",
    "SenderSnapshot",
    "delete_sender",
    "effective_rules",
    "find_rule",
    "load_console_senders",
    "namespace",
    "parse_identifier_systems",
    "save_sender",
    "sender_label",
    "unregistered_error",
    "validate_sender",
]

log = get_logger("careloop.senders")

Origin = Literal["settings", "console"]
NAMESPACE_MAX = 227
"""The longest MSH-3/MSH-4 namespace id ``sender_settings`` stores."""
_NAMESPACE = re.compile(r"^[^|^~\\&\s][^|^~\\&]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_STEP = timedelta(milliseconds=1)


class SenderError(ValueError):
    """A sender rule given in the console is not valid; the message says which field and why."""


@dataclass(frozen=True)
class ConsoleSender:
    """One ``sender_settings`` row: a rule saved in the console, and who saved it when."""

    rule: HL7Sender
    updated_by: str
    updated_at: datetime


@dataclass(frozen=True)
class SenderRule:
    """A rule in effect and where it comes from."""

    rule: HL7Sender
    origin: Origin
    updated_by: str | None = None
    updated_at: datetime | None = None
    overrides: bool = False
    """A console rule that replaces the settings file's rule for the same sender."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.rule.application, self.rule.facility)


@dataclass(frozen=True)
class SenderSnapshot:
    """The console's rules as one process loaded them, to hand to a work process."""

    token: str
    """Changes whenever the rules do."""
    console: tuple[ConsoleSender, ...] = ()


def namespace(hd: str) -> str:
    """The namespace id of an HD field as stored (``EPIC^1.2.3^ISO`` → ``EPIC``)."""
    return hd.split("^", 1)[0]


def sender_label(application: str, facility: str) -> str:
    """How a sender is written on pages and in errors: ``APPLICATION|FACILITY``."""
    return f"{application}|{facility}"


def unregistered_error(application: str, facility: str) -> str:
    """The processing error of a message held because no rule names its sender."""
    return (f'sender "{sender_label(application, facility)}" is not registered: add it under '
            "Senders in the console (or [[hl7_senders]]), then replay")


def effective_rules(settings: Settings | None,
                    console: Iterable[ConsoleSender]) -> tuple[SenderRule, ...]:
    """Console rules (newest first), then the settings file's rules they do not override."""
    from_console = sorted(console, key=lambda c: c.updated_at, reverse=True)
    file_rules = settings.hl7_senders if settings is not None else ()
    overridden = {(c.rule.application, c.rule.facility) for c in from_console}
    file_keys = {(r.application, r.facility) for r in file_rules}
    out = [SenderRule(c.rule, "console", c.updated_by, c.updated_at,
                      overrides=(c.rule.application, c.rule.facility) in file_keys)
           for c in from_console]
    out += [SenderRule(r, "settings") for r in file_rules
            if (r.application, r.facility) not in overridden]
    return tuple(out)


def find_rule(rules: Iterable[SenderRule], application: str,
              facility: str) -> SenderRule | None:
    """The rule for MSH-3/MSH-4 namespace ids: one naming the facility beats one for any
    facility; among equals the first (console rules come first)."""
    fallback: SenderRule | None = None
    for rule in rules:
        if rule.rule.application != application:
            continue
        if rule.rule.facility == facility and facility:
            return rule
        if not rule.rule.facility and fallback is None:
            fallback = rule
    return fallback


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _row_rule(row: Any) -> ConsoleSender | None:
    try:
        rule = HL7Sender(
            application=row.application, facility=row.facility or "",
            timezone=row.timezone or None,
            identifier_systems=dict(row.identifier_systems or {}),
            ack_to=row.ack_to or None,
        )
    except (ValidationError, ValueError, TypeError):
        # Written by hand, not through the console: ignored rather than stopping processing.
        log.warning("sender_setting_invalid", application=row.application,
                    facility=row.facility)
        return None
    return ConsoleSender(rule, row.updated_by, _aware(row.updated_at))


def load_console_senders(conn: Connection) -> tuple[ConsoleSender, ...]:
    """Every valid ``sender_settings`` row."""
    t = sender_settings
    rows = conn.execute(select(t).order_by(t.c.application, t.c.facility)).all()
    return tuple(c for row in rows if (c := _row_rule(row)) is not None)


_Signature = tuple[int, datetime | None]


def _signature(conn: Connection) -> _Signature:
    count, latest = conn.execute(
        select(func.count(), func.max(sender_settings.c.updated_at))).one()
    return int(count), _aware(latest) if latest is not None else None


class SenderRegistry:
    """The rules in effect for one process: the settings file's plus the console's, kept in
    memory and refreshed cheaply (see the module's docstring).

    ``refresh_s`` is how long a check stays good: 0 checks on every :meth:`refresh` (the
    processing stage, once per batch), a few seconds suits callers that only need to catch up
    eventually (application ACK delivery). Safe to share between threads.
    """

    def __init__(self, settings: Settings | None = None, *, refresh_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._console: tuple[ConsoleSender, ...] = ()
        self._rules = effective_rules(settings, ())
        self._signature: _Signature = (0, None)  # what an empty table answers
        self._checked_at: float | None = None
        self._token = uuid.uuid4().hex

    @property
    def token(self) -> str:
        """Changes whenever the rules do (contexts built from older rules are dropped)."""
        return self._token

    @property
    def hold_unregistered(self) -> bool:
        """``hl7_unregistered_senders = "hold"``: messages from senders without a rule fail."""
        return self.settings is not None and self.settings.hl7_unregistered_senders == "hold"

    def rules(self) -> tuple[SenderRule, ...]:
        """The rules in effect as last loaded."""
        return self._rules

    def find(self, application: str, facility: str) -> HL7Sender | None:
        """The rule for MSH-3/MSH-4 namespace ids, if any."""
        found = find_rule(self._rules, application, facility)
        return found.rule if found is not None else None

    def _fresh(self, now: float) -> bool:
        checked = self._checked_at
        return checked is not None and now - checked < self.refresh_s

    def refresh(self, engine: Engine, *, force: bool = False) -> bool:
        """Check the console's rows (one small query) unless checked less than ``refresh_s``
        ago, and load them again when they changed; True when the rules changed.

        A database error keeps the rules already loaded (logged): processing goes on with
        them, and the next call checks again.
        """
        if not force and self._fresh(self._clock()):
            return False
        with self._lock:
            now = self._clock()
            if not force and self._fresh(now):
                return False  # another thread checked meanwhile
            try:
                with engine.connect() as conn:
                    signature = _signature(conn)
                    if signature == self._signature:
                        self._checked_at = now
                        return False
                    console = load_console_senders(conn)
            except SQLAlchemyError as exc:
                log.warning("sender_settings_unreadable", exc_type=type(exc).__name__)
                return False
            self._set(console)
            self._signature = signature
            self._checked_at = now
            return True

    def invalidate(self) -> None:
        """Check the database at the next :meth:`refresh`, however recent the last check."""
        self._checked_at = None

    def snapshot(self) -> SenderSnapshot:
        """The console's rules as loaded here (picklable), for :meth:`adopt` elsewhere."""
        return SenderSnapshot(self._token, self._console)

    def adopt(self, snapshot: SenderSnapshot) -> bool:
        """Take another process's rules (a work process has no database to read); True when
        they differ from the ones held."""
        if snapshot.token == self._token:
            return False
        with self._lock:
            self._set(snapshot.console, token=snapshot.token)
        return True

    def _set(self, console: tuple[ConsoleSender, ...], *, token: str | None = None) -> None:
        rules = effective_rules(self.settings, console)
        self._console = console
        self._rules = rules
        self._token = token or uuid.uuid4().hex
        log.info("sender_rules_loaded", console=len(console), total=len(rules))


# --- the console's form -------------------------------------------------------------------------


def parse_identifier_systems(text: str) -> dict[str, str]:
    """``AUTHORITY = system-uri`` lines (blank lines and ``#`` comments ignored) → a mapping."""
    systems: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        authority, eq, system = (part.strip() for part in line.partition("="))
        if not eq or not authority or not system:
            raise SenderError(f"identifier systems, line {number}: write AUTHORITY = "
                              f"system-uri (got {line[:80]!r})")
        if len(authority) > 255:
            raise SenderError(f"identifier systems, line {number}: the assigning authority "
                              "is longer than 255 characters")
        if not _URI.match(system) or len(system) > 512:
            raise SenderError(f"identifier systems, line {number}: {system[:80]!r} is not a "
                              "URI (e.g. urn:oid:1.2.3 or https://hospital.example/mrn)")
        if authority in systems and systems[authority] != system:
            raise SenderError(f"identifier systems, line {number}: {authority} is given "
                              "twice with different systems")
        systems[authority] = system
    return systems


def _check_namespace(value: str, name: str, *, required: bool) -> str:
    value = value.strip()
    if not value:
        if required:
            raise SenderError(f"{name}: required (the MSH-{3 if name == 'application' else 4} "
                              "namespace id)")
        return ""
    if len(value) > NAMESPACE_MAX:
        raise SenderError(f"{name}: at most {NAMESPACE_MAX} characters")
    if not _NAMESPACE.match(value):
        raise SenderError(f"{name}: {value[:80]!r} may not contain | ^ ~ \\ & or start with a "
                          "space (the namespace id alone, e.g. EPIC)")
    return value


def validate_sender(form: Mapping[str, str]) -> HL7Sender:
    """The console form's fields (``application``, ``facility``, ``timezone``,
    ``identifier_systems``, ``ack_to``) as a rule; :class:`SenderError` names a bad field."""
    application = _check_namespace(form.get("application", ""), "application", required=True)
    facility = _check_namespace(form.get("facility", ""), "facility", required=False)
    timezone = form.get("timezone", "").strip() or None
    ack_to = form.get("ack_to", "").strip() or None
    systems = parse_identifier_systems(form.get("identifier_systems", ""))
    if ack_to is not None:
        host, _, port = ack_to.rpartition(":")
        if (not host or not port.isdigit() or not 0 < int(port) < 65536
                or any(c.isspace() for c in host) or len(ack_to) > 255):
            raise SenderError(f"ACK to: {ack_to[:80]!r} is not host:port (e.g. "
                              "engine.hospital.example:2576)")
    try:
        return HL7Sender(application=application, facility=facility, timezone=timezone,
                         identifier_systems=systems, ack_to=ack_to)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = {"timezone": "time zone", "ack_to": "ACK to"}.get(
            str(err["loc"][0]) if err["loc"] else "", "sender")
        raise SenderError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


def _rule_json(rule: HL7Sender | None) -> dict[str, object] | None:
    if rule is None:
        return None
    return {"timezone": rule.timezone, "identifier_systems": dict(rule.identifier_systems),
            "ack_to": rule.ack_to}


def save_sender(engine: Engine, rule: HL7Sender, *, actor: str, now: datetime) -> bool:
    """Insert or replace the console's row for ``rule``'s sender and audit it
    (``console.sender_saved``, target ``sender`` ``APPLICATION|FACILITY``, with the values
    before and after); True when it was new.

    ``updated_at`` is ``now``, or just after the latest row's when that is later (another
    host's clock), so that every process's check sees the change.
    """
    t = sender_settings
    key = (rule.application, rule.facility)
    with write_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Saves take turns, so each one's stamp is later than the one before.
            conn.exec_driver_sql("LOCK TABLE sender_settings IN SHARE ROW EXCLUSIVE MODE")
        latest = conn.execute(select(func.max(t.c.updated_at))).scalar_one()
        stamp = now if latest is None or _aware(latest) < now else _aware(latest) + _STEP
        before = conn.execute(select(t).where(t.c.application == key[0],
                                              t.c.facility == key[1])).first()
        values = {"timezone": rule.timezone, "identifier_systems": dict(rule.identifier_systems),
                  "ack_to": rule.ack_to, "updated_by": actor[:255], "updated_at": stamp}
        stmt = dialect_insert(conn, t).values(application=key[0], facility=key[1], **values)
        conn.execute(stmt.on_conflict_do_update(index_elements=["application", "facility"],
                                                set_=values))
        previous = _row_rule(before) if before is not None else None
        conn.execute(audit_events.insert().values(
            at=now, actor=actor[:255], action="console.sender_saved", target_type="sender",
            target_id=sender_label(*key)[:255],
            detail={"before": _rule_json(previous.rule if previous else None),
                    "after": _rule_json(rule)}))
    return before is None


def delete_sender(engine: Engine, application: str, facility: str, *, actor: str,
                  now: datetime) -> bool:
    """Remove the console's row for a sender (the settings file's rule, if any, applies again)
    and audit it (``console.sender_deleted``); False when there was none."""
    t = sender_settings
    with write_lock(engine), engine.begin() as conn:
        before = conn.execute(select(t).where(t.c.application == application,
                                              t.c.facility == facility)).first()
        if before is None:
            return False
        conn.execute(delete(t).where(t.c.application == application, t.c.facility == facility))
        previous = _row_rule(before)
        conn.execute(audit_events.insert().values(
            at=now, actor=actor[:255], action="console.sender_deleted", target_type="sender",
            target_id=sender_label(application, facility)[:255],
            detail={"before": _rule_json(previous.rule if previous else None)}))
    return True
