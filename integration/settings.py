"""careloop's one settings object.

Built once at the entry point (:func:`load_settings`) and passed down; nothing reads the
environment at import time. Sources, strongest first: keyword arguments, ``CARELOOP_*``
environment variables, the TOML file named by ``CARELOOP_CONFIG``, then the defaults below.
A bad value stops the start with one line naming the setting (:func:`describe_error`).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from integration.outreach.pathways import Organization, OutreachSettings, Pathway, parse_offset

__all__ = [
    "Channels",
    "Connection",
    "ConsoleOidc",
    "EmailChannel",
    "HL7Sender",
    "PatientPage",
    "PortalChannel",
    "Retention",
    "Settings",
    "SettingsError",
    "SmsChannel",
    "Waitlist",
    "describe_error",
    "load_settings",
]

ENV_PREFIX = "CARELOOP_"


class SettingsError(ValueError):
    """A setting is missing or wrong; the message is one line naming it."""


def _resolve_secret(value: str, name: str) -> str:
    """``env:VAR`` reads the secret from another environment variable."""
    if value.startswith("env:"):
        var = value[4:]
        if var not in os.environ:
            raise ValueError(f"{name} names environment variable {var}, which is not set")
        return os.environ[var]
    return value


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
    return value


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class Connection(BaseModel):
    """One EHR reached over FHIR (``[[connections]]``); see INTERFACE.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    """Also the notification path: ``{base_url}/fhir/notify/{name}``."""
    fhir_base: str
    client_id: str
    private_key: Path | None = None
    """PEM written by ``careloop keys generate``; its ``kid`` is published in the JWKS."""
    scopes: tuple[str, ...] = (
        "system/Appointment.rs",
        "system/CarePlan.rs",
        "system/MedicationRequest.rs",
        "system/Patient.rs",
        "system/Communication.cu",
        "system/Subscription.cruds",
    )
    mode: Literal["backport", "classic", "poll"] = "backport"
    payload: Literal["empty", "id-only", "full-resource"] = "id-only"
    topics: dict[str, str] = Field(default_factory=dict)
    """Resource type → SubscriptionTopic canonical URL (backport mode)."""
    resource_types: tuple[str, ...] = ("Appointment", "CarePlan", "MedicationRequest")
    heartbeat_s: int = Field(default=60, ge=0)
    poll_interval_s: int = Field(default=60, ge=1)
    write_back: bool = True
    """Write a Communication for each touch and reply (and patients' requests) to this EHR."""
    scheduling: Literal["slots", "request"] = "request"
    """``slots``: the patient page offers the EHR's free Slots and books one (a transaction, or
    ordered conditional writes; ``Appointment/$book`` where offered). ``request``: the
    patient's preferred days and times go to staff as a Task."""
    appointment_updates: bool = False
    """The EHR lets careloop update Appointments: a confirmation sets the patient participant's
    status, a cancellation the appointment's status. Off: an AppointmentResponse records a
    confirmation and a Task asks staff to cancel or reschedule."""

    @field_validator("fhir_base")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")

    def model_post_init(self, _context: Any) -> None:
        if self.mode == "backport":
            missing = [t for t in self.resource_types if t not in self.topics]
            if missing:
                raise ValueError(
                    f"connection {self.name!r}: backport mode needs a topic for {missing[0]}"
                )


def _secret_value(v: object, info: Any) -> object:
    return _resolve_secret(v, info.field_name) if isinstance(v, str) else v


class SmsChannel(BaseModel):
    """``[channels.sms]`` and ``[channels.voice]``: ``file`` (development: one JSON file per
    message under ``outreach.outbox_dir``) or a Twilio-compatible REST API."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    provider: Literal["file", "twilio"] = "file"
    base_url: str = "https://api.twilio.com"
    account: str = ""
    """Account SID (``env:VAR`` reads it from the environment)."""
    token: str = ""
    """Auth token: signs requests to the provider and verifies its webhooks."""
    from_number: str = Field(default="", alias="from")
    status_callbacks: bool = True
    """Ask the provider for delivery receipts at ``{base_url}/channels/<name>/status``."""
    idempotent: bool = False
    """The provider honours our ``Idempotency-Key``: a send interrupted by a crash may then be
    repeated safely. Off (Twilio itself): an interrupted send is not repeated (at most once)."""

    _secrets = field_validator("account", "token")(_secret_value)

    def model_post_init(self, _context: Any) -> None:
        if self.provider == "twilio" and not (self.account and self.token and self.from_number):
            raise ValueError("provider twilio needs account, token and from")


class EmailChannel(BaseModel):
    """``[channels.email]``: ``file`` or SMTP."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    provider: Literal["file", "smtp"] = "file"
    host: str = "localhost"
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: str = ""
    from_address: str = Field(default="", alias="from")

    _secrets = field_validator("username", "password")(_secret_value)

    def model_post_init(self, _context: Any) -> None:
        if self.provider == "smtp" and not self.from_address:
            raise ValueError("provider smtp needs from")


class PortalChannel(BaseModel):
    """``[channels.portal]``: careloop's own patient page, reached by signed expiring links."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = ""
    """Signs the links (``env:VAR`` allowed). Empty: a random secret kept in ``keys_dir``."""
    link_ttl: timedelta = timedelta(days=14)
    """How long a link in a message stays valid (ISO 8601 duration, e.g. ``P14D``)."""

    _secrets = field_validator("secret")(_secret_value)

    @field_validator("link_ttl", mode="before")
    @classmethod
    def _ttl(cls, v: object) -> object:
        return parse_offset(v) if isinstance(v, str) else v


class Waitlist(BaseModel):
    """``[waitlist]``: offering freed slots to waitlisted patients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offer_ttl: timedelta = timedelta(hours=2)
    """How long an offer stands before it expires and the next patients are asked."""
    wave: int = Field(default=3, ge=1, le=50)
    """How many waitlisted patients are offered a slot at once (the first to accept gets it)."""
    min_notice: timedelta = timedelta(hours=2)
    """A slot starting sooner than this is not offered."""

    @field_validator("offer_ttl", "min_notice", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        return parse_offset(v) if isinstance(v, str) else v


class Retention(BaseModel):
    """``[retention]``: how long careloop keeps what it stored (ISO 8601 durations, at least
    one day; unset keeps forever). ``careloop purge`` and the daily beat task remove the rest;
    unprocessed rows are never removed, whatever their age."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    raw_messages: timedelta | None = None
    """Inbox rows processed, failed or rejected this long ago (by ``received_at``), with their
    mapped resources."""
    resources: timedelta | None = None
    """``mapped_resources`` (by ``created_at``)."""
    touches: timedelta | None = None
    """Touches sent, cancelled, skipped or failed (by ``updated_at``)."""
    channel_events: timedelta | None = None
    """Provider webhooks and portal actions processed or failed (by ``received_at``)."""
    writeback: timedelta | None = None
    """Write-back outbox rows written to the EHR (by ``updated_at``)."""
    audit_events: timedelta | None = None
    """Audit events (by ``at``)."""
    timeline_changes: timedelta | None = None
    """The timeline's change log (by ``at``) once every consumer of it (outreach, waitlist)
    has read past it; the timeline itself is kept."""

    @field_validator("raw_messages", "resources", "touches", "channel_events", "writeback",
                     "audit_events", "timeline_changes", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        return parse_offset(v) if isinstance(v, str) else v

    @field_validator("raw_messages", "resources", "touches", "channel_events", "writeback",
                     "audit_events", "timeline_changes")
    @classmethod
    def _at_least_a_day(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and v < timedelta(days=1):
            raise ValueError("a retention period must be at least one day (P1D)")
        return v

    def any_set(self) -> bool:
        """Whether anything is ever purged."""
        return any(getattr(self, name) is not None for name in type(self).model_fields)


class PatientPage(BaseModel):
    """``[patient_page]``: the patient's own page (a ``p`` link, date of birth to open)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_dob_attempts: int = Field(default=3, ge=1, le=10)
    """Wrong dates of birth before the link locks."""
    session_ttl: timedelta = timedelta(minutes=30)
    """How long the page stays open after the date of birth was confirmed (idle)."""
    slot_days: int = Field(default=7, ge=1, le=60)
    """Days of free slots shown at a time."""

    @field_validator("session_ttl", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        return parse_offset(v) if isinstance(v, str) else v


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConsoleOidc(BaseModel):
    """``[console_oidc]``: people sign in to the console through the hospital's OpenID Connect
    provider (authorization code flow with PKCE); see :mod:`integration.console.oidc`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str
    """The provider's issuer URL (https; plain http only for a loopback address, for tests);
    its metadata is read from ``{issuer}/.well-known/openid-configuration``."""
    client_id: str
    client_secret: str = ""
    """``env:VAR`` reads it from the environment. Empty: a public client (PKCE only)."""
    name: str = Field(default="your organisation's sign-in", min_length=1, max_length=80)
    """Shown on the sign-in page: "Sign in with {name}"."""
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    roles_claim: str = "groups"
    """The ID token claim listing the person's groups or roles (a dotted path reaches into
    nested objects, e.g. ``realm_access.roles``)."""
    role_map: dict[str, Literal["admin", "operator", "viewer"]]
    """Claim value → console role; the highest matching role wins, no match is refused."""
    phi_values: tuple[str, ...] = ()
    """Claim values that grant the sight of patient data."""
    username_claim: str = "preferred_username"
    """The claim that names a new user (then ``email``, then ``sub``)."""

    _secrets = field_validator("client_secret")(_secret_value)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        url = urlsplit(v)
        if not url.hostname or url.query or url.fragment or url.username:
            raise ValueError("must be the provider's issuer URL (no query or fragment)")
        if url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname)):
            return v
        raise ValueError("must be an https URL (plain http only for a loopback address)")

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be the client id registered with the provider")
        return v

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in v:
            raise ValueError("must include openid")
        return v

    @field_validator("role_map")
    @classmethod
    def _role_map(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("must map at least one claim value to admin, operator or viewer")
        return v


class Channels(BaseModel):
    """``[channels.*]``: which class sends each channel (see INTERFACE.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sms: SmsChannel = SmsChannel()
    voice: SmsChannel = SmsChannel()
    email: EmailChannel = EmailChannel()
    portal: PortalChannel = PortalChannel()


class HL7Sender(BaseModel):
    """Per-sender rules, matched on MSH-3 (application) and MSH-4 (facility) namespace ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    application: str
    facility: str = ""
    timezone: str | None = None
    identifier_systems: dict[str, str] = Field(default_factory=dict)
    ack_to: str | None = None
    """``host:port`` where enhanced-mode application acknowledgements are sent over MLLP."""

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return None if v is None else _check_timezone(v)

    @field_validator("ack_to")
    @classmethod
    def _ack_to(cls, v: str | None) -> str | None:
        if v is None:
            return None
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{v!r} is not host:port")
        return v

    def matches(self, application: str, facility: str) -> bool:
        return self.application == application and (
            not self.facility or self.facility == facility
        )


class Settings(BaseSettings):
    """Every setting careloop reads. Environment names are ``CARELOOP_`` + the upper-case name."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    # storage and work
    database_url: str = "sqlite:///var/careloop.db"
    """SQLAlchemy URL. SQLite (WAL, synchronous=FULL) for one process; PostgreSQL
    (``postgresql+psycopg://...``) for many."""
    broker_url: str | None = None
    """Celery broker (``redis://...``). Unset: an in-process worker runs inside ``serve``."""
    broker_key_prefix: str = ""
    """Prefix for every Redis key Celery writes (to share one Redis between deployments)."""
    inprocess_worker: bool = True
    """With no broker, run the pipeline inside ``careloop serve`` (turn off only to measure)."""
    worker_threads: int = Field(default=2, ge=1, le=64)
    work_processes: int = Field(default=1, ge=0, le=64)
    """In ``serve`` without a broker: child processes that parse and convert (0: in the worker
    threads, sharing the GIL with the ACK path)."""
    sweep_interval_s: float = Field(default=15.0, gt=0)
    stale_after_s: float = Field(default=60.0, gt=0)
    """A row still pending this long after it was stored or last tried is enqueued again."""
    max_attempts: int = Field(default=5, ge=1)
    """Unexpected processing errors are retried this many times before the row is failed."""

    # network
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    http_max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    mllp_host: str = "127.0.0.1"
    mllp_port: int = Field(default=2575, ge=0, le=65535)
    mllp_max_frame_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    mllp_idle_timeout_s: float = Field(default=600.0, gt=0)
    """A connection with no traffic for this long is closed."""
    mllp_frame_timeout_s: float = Field(default=30.0, gt=0)
    """A frame that has started but not ended after this long (a slow or stuck sender) closes
    the connection."""
    mllp_max_connections: int = Field(default=1000, ge=1)
    mllp_tls_cert: Path | None = None
    mllp_tls_key: Path | None = None
    mllp_tls_client_ca: Path | None = None
    """With a CA bundle, clients must present a certificate it signed (mutual TLS)."""
    base_url: str = "http://127.0.0.1:8000"
    auth: Literal["required", "disabled"] = "required"
    token_ttl_s: int = Field(default=300, ge=30, le=3600)
    """Lifetime of OAuth access tokens from ``POST /oauth/token``."""

    keys_dir: Path = Path("var/keys")
    """careloop's SMART Backend Services keys and the JWKS it publishes (``jwks.json``)."""

    # operations
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"

    # behaviour (TOML file)
    timezone: str = "UTC"
    default_language: str = "en"
    hl7_senders: tuple[HL7Sender, ...] = ()
    hl7_unregistered_senders: Literal["accept", "hold"] = "accept"
    """A message from a sender no rule names (``[[hl7_senders]]`` or the console's Senders):
    ``accept`` processes it with the defaults; ``hold`` stores and acknowledges it, then fails
    it in processing ("not registered"), to be replayed once the sender is registered."""
    connections: tuple[Connection, ...] = ()
    subscription_renew_s: int = Field(default=3600, ge=0)
    """How often serve and the Celery timer re-run ``subscriptions ensure`` (renew before
    ``end``, repair, reactivate after catch-up); 0 turns it off."""
    pathways: tuple[Pathway, ...] = ()
    outreach: OutreachSettings = OutreachSettings()
    organization: Organization = Organization()
    """``[organization]``: name, phone and portal link shown in outreach messages."""
    channels: Channels = Channels()
    waitlist: Waitlist = Waitlist()
    patient_page: PatientPage = PatientPage()
    retention: Retention = Retention()
    """``[retention]``: how long stored messages, resources, touches and audit events are kept."""
    console_oidc: ConsoleOidc | None = None
    """``[console_oidc]``: console sign-in through the hospital's OpenID Connect provider."""
    write_back_connection: str | None = None
    """The connection that receives write-backs for entries that came from HL7v2 feeds
    (default: the first ``[[connections]]`` entry with ``write_back``). Entries that came from
    an EHR over FHIR are written back to that EHR."""
    authoritative_identifier_systems: tuple[str, ...] = ()
    """Identifier systems (strongest first) that decide which patient wins when one resource's
    identifiers name several known patients (e.g. the enterprise MPI's, then the main MRN)."""

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _check_timezone(v)

    @field_validator("database_url")
    @classmethod
    def _db(cls, v: str) -> str:
        if not v.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        if v == "":
            return None
        if v is not None and not v.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return v

    @field_validator("mllp_tls_cert", "mllp_tls_key", "mllp_tls_client_ca")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file {str(v)!r} does not exist")
        return v

    def model_post_init(self, _context: Any) -> None:
        if (self.mllp_tls_cert is None) != (self.mllp_tls_key is None):
            raise ValueError("mllp_tls_cert and mllp_tls_key go together: set both or neither")
        if self.mllp_tls_client_ca is not None and self.mllp_tls_cert is None:
            raise ValueError("mllp_tls_client_ca needs mllp_tls_cert and mllp_tls_key")
        if self.write_back_connection and self.connection(self.write_back_connection) is None:
            raise ValueError(f"write_back_connection: no [[connections]] entry is called "
                             f"{self.write_back_connection!r}")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def write_back_target(self, source_connection: str | None = None) -> Connection | None:
        """Where write-backs for an entry go: its own FHIR connection when it has write-back
        on, else ``write_back_connection``, else the first connection with write-back."""
        if source_connection:
            own = self.connection(source_connection)
            if own is not None:
                return own if own.write_back else None
        if self.write_back_connection:
            return self.connection(self.write_back_connection)
        return next((c for c in self.connections if c.write_back), None)

    def connection(self, name: str) -> Connection | None:
        """The ``[[connections]]`` entry called ``name``, if any."""
        for conn in self.connections:
            if conn.name == name:
                return conn
        return None

    def sender(self, application: str, facility: str) -> HL7Sender | None:
        """The ``[[hl7_senders]]`` rule for MSH-3/MSH-4 namespace ids, if any."""
        for rule in self.hl7_senders:
            if rule.matches(application, facility):
                return rule
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"CARELOOP_CONFIG: file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"CARELOOP_CONFIG: {path}: {exc}") from None


def describe_error(exc: ValidationError, environ: Mapping[str, str]) -> str:
    """One line naming the first bad setting the way the user wrote it."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    name = loc[0] if loc else "settings"
    env_name = ENV_PREFIX + name.upper()
    where = env_name if env_name in environ else ".".join(loc) if loc else name
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict | list | tuple) or value is None else f" (got {value!r})"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown setting"
    return f"{where}: {msg}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment and the ``CARELOOP_CONFIG`` TOML file.

    Raises :class:`SettingsError` with a one-line message on any bad value.
    """
    env = os.environ
    file_values: dict[str, Any] = {}
    config_path = env.get("CARELOOP_CONFIG")
    if config_path:
        file_values = _read_toml(config_path)
    # Environment beats the file: drop file keys the environment sets.
    for key in list(file_values):
        if ENV_PREFIX + key.upper() in env:
            del file_values[key]
    values = {**file_values, **overrides}
    try:
        for secret_key in ("database_url", "broker_url"):
            if isinstance(values.get(secret_key), str):
                values[secret_key] = _resolve_secret(values[secret_key], secret_key)
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(describe_error(exc, env)) from None
    except ValueError as exc:
        raise SettingsError(str(exc).splitlines()[0]) from None
