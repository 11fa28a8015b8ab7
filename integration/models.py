"""Database tables (SQLAlchemy 2 Core metadata; Alembic migrations in ``migrations/``).

The database is the source of truth for all work: a row's ``status`` says what remains to be
done, and a Celery task or the in-process worker only carries its id.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

__all__ = [
    "InboxStatus",
    "access_tokens",
    "address_optouts",
    "api_clients",
    "audit_events",
    "bookings",
    "channel_events",
    "console_sessions",
    "console_users",
    "ehr_outbox",
    "entry_keys",
    "entry_sources",
    "fhir_secrets",
    "fhir_subscriptions",
    "freed_slots",
    "inbox",
    "mapped_resources",
    "metadata",
    "outreach_cursors",
    "patient_identifiers",
    "patient_merges",
    "patient_preferences",
    "patient_requests",
    "patients",
    "portal_access",
    "timeline_changes",
    "timeline_entries",
    "touches",
    "waitlist_entries",
    "waitlist_offers",
]

# Stable constraint names, so that migrations can refer to them on every database.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class InboxStatus(StrEnum):
    RECEIVED = "received"
    """Stored and acknowledged; waiting for the processing stage."""
    PROCESSED = "processed"
    FAILED = "failed"
    """Processing found a problem in the content; kept for inspection and replay."""
    REJECTED = "rejected"
    """Unreadable (no usable MSH): answered AR/CR, kept for inspection only."""


inbox = Table(
    "inbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("source", String(16), nullable=False, doc="mllp | http | fhir"),
    Column("peer", String(255), nullable=False, default="", doc="remote address or client id"),
    Column("sender", String(255), nullable=False, default="", doc="MSH-3|MSH-4 as sent"),
    Column("dedup_key", String(512), nullable=False, unique=True),
    Column("message_type", String(32), nullable=False, default=""),
    Column("control_id", String(199), nullable=False, default=""),
    Column("version", String(16), nullable=False, default=""),
    Column("raw", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("ack_code", String(2), nullable=False, default=""),
    Column("ack", Text, nullable=True, doc="the acknowledgement sent, ER7"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("app_ack", Text, nullable=True, doc="enhanced mode: the application ACK, once built"),
    Column("warnings", JSON, nullable=True, doc="fields the mapping could not read"),
    Column("app_ack_sent_at", DateTime(timezone=True), nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Index("ix_inbox_status_next", "status", "next_attempt_at"),
    Index("ix_inbox_received_at", "received_at"),
    Index("ix_inbox_control_id", "control_id"),
    Index(
        "ix_inbox_app_ack_pending",
        "id",
        sqlite_where=text("app_ack IS NOT NULL AND app_ack_sent_at IS NULL"),
        postgresql_where=text("app_ack IS NOT NULL AND app_ack_sent_at IS NULL"),
    ),
)

mapped_resources = Table(
    "mapped_resources",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "inbox_id",
        BigId,
        ForeignKey("inbox.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("resource", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("inbox_id", "resource_type", "resource_id"),
    Index("ix_mapped_resources_resource", "resource_type", "resource_id"),
)
"""FHIR R4 resources each processed inbox row became, for the timeline stage to consume."""

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target_type", String(64), nullable=False, default=""),
    Column("target_id", String(255), nullable=False, default=""),
    Column("detail", JSON, nullable=True),
    Index("ix_audit_events_at", "at"),
)

api_clients = Table(
    "api_clients",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("client_id", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("secret_hash", String(128), nullable=False),
    Column("scopes", String(1024), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("jwks", JSON, nullable=True, doc="public keys for private_key_jwt"),
)

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("scopes", String(1024), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_access_tokens_expires_at", "expires_at"),
)
"""OAuth access tokens, by SHA-256; the token itself is never stored."""

used_assertions = Table(
    "used_assertions",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_used_assertions_expires_at", "expires_at"),
)
"""JWT client assertions seen, kept until they expire, so none can be replayed."""


# --- identity and timeline (see integration/identity.py and integration/timeline/) -----------

PatientId = String(32)

patients = Table(
    "patients",
    metadata,
    Column("id", PatientId, primary_key=True, doc="careloop's own id (uuid4 hex)"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("merged_into", PatientId, nullable=True, doc="the survivor, once merged"),
    Column("merged_at", DateTime(timezone=True), nullable=True),
    Index("ix_patients_merged_into", "merged_into"),
)
"""One row per person careloop knows; a merged row points at its survivor (one hop)."""

patient_identifiers = Table(
    "patient_identifiers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("system", String(512), nullable=False),
    Column("value", String(255), nullable=False),
    Column(
        "patient_id", PatientId, ForeignKey("patients.id"), nullable=True,
        doc="NULL only inside the transaction that claims the key",
    ),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("system", "value", name="uq_patient_identifiers_system_value"),
    Index("ix_patient_identifiers_patient_id", "patient_id"),
)
"""Identifier ``system|value`` → patient. Also holds source references (``urn:careloop:ref:``
systems) so that ``Patient/x`` in a later resource finds the same patient."""

patient_merges = Table(
    "patient_merges",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("survivor_id", PatientId, nullable=False),
    Column("replaced_id", PatientId, nullable=False, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("source_system", String(16), nullable=False),
    Column("source_ref", String(512), nullable=False),
    Index("ix_patient_merges_survivor_id", "survivor_id"),
)

timeline_entries = Table(
    "timeline_entries",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("patient_id", PatientId, ForeignKey("patients.id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("status", String(32), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False,
           doc="clinical time, else the earliest version's time; the paging key with id"),
    Column("end_time", DateTime(timezone=True), nullable=True),
    Column("summary", String(255), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource", JSON, nullable=False, doc="the newest version, FHIR R4 JSON"),
    Column("ordinal", String(160), nullable=False, doc="the newest version's ordinal"),
    Column("first_seen", DateTime(timezone=True), nullable=False,
           doc="the earliest version's time"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_timeline_entries_patient_time", "patient_id", "time", "id"),
)
"""One row per real-world thing (an appointment, an encounter...), whatever its sources."""

entry_keys = Table(
    "entry_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("resource_type", String(64), nullable=False),
    Column("system", String(512), nullable=False),
    Column("value", String(255), nullable=False),
    Column(
        "entry_id", String(32), ForeignKey("timeline_entries.id", ondelete="CASCADE"),
        nullable=True, doc="NULL only inside the transaction that claims the key",
    ),
    UniqueConstraint("resource_type", "system", "value", name="uq_entry_keys_key"),
    Index("ix_entry_keys_entry_id", "entry_id"),
)
"""Business identifiers (and source references) → entry."""

entry_sources = Table(
    "entry_sources",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "entry_id", String(32), ForeignKey("timeline_entries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("system", String(16), nullable=False, doc="hl7v2 | fhir"),
    Column("connection", String(255), nullable=False, doc="HL7 sender or EHR connection"),
    Column("ref", String(512), nullable=False),
    Column("version", String(64), nullable=False),
    Column("ordinal", String(160), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("entry_id", "system", "ref", name="uq_entry_sources_entry_ref"),
)
"""Every version seen of an entry, applied or not (an older version arriving late)."""

timeline_changes = Table(
    "timeline_changes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("entry_id", String(32), nullable=False),
    Column("patient_id", PatientId, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("change", String(16), nullable=False, doc="created | updated | moved | removed"),
    Column("status", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)
"""What the timeline stage changed, in order (``id``), for the outreach stage to consume."""


# --- outreach (see integration/outreach/) ------------------------------------------------------

ADDRESS_NORM = (
    "replace(replace(replace(replace(replace(replace(lower(trim(address)),' ',''),'-',''),"
    "'.',''),'(',''),')',''),'/','')"
)
"""A touch address as replies are matched on it (:func:`integration.replies.matching.
address_expr` builds the same expression): indexed, so a reply finds its touch at once."""

touches = Table(
    "touches",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(255), nullable=False, unique=True,
           doc="idempotency key: pathway|step|entry[|activity:i:n]"),
    Column("pathway", String(64), nullable=False),
    Column("step", Integer, nullable=False),
    Column("entry_id", String(32), nullable=False),
    Column("patient_id", PatientId, nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=True, doc="NULL for a skipped step"),
    Column("moment", DateTime(timezone=True), nullable=True,
           doc="what the step is relative to (appointment start, visit end...)"),
    Column("channel", String(16), nullable=False, default=""),
    Column("address", String(320), nullable=False, default=""),
    Column("language", String(35), nullable=False, default=""),
    Column("template", String(64), nullable=False, default=""),
    Column("status", String(16), nullable=False,
           doc="scheduled | sending | sent | cancelled | skipped | failed"),
    Column("reason", String(255), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("provider_ref", String(255), nullable=True),
    Column("body", Text, nullable=True, doc="the message as sent (rendered), for the record"),
    Column("delivery", String(16), nullable=True,
           doc="the provider's last delivery status: queued | sent | delivered | failed ..."),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_touches_status_due", "status", "due_at"),
    Index("ix_touches_address", "address", "sent_at"),
    Index("ix_touches_channel_address_norm", "channel", text(ADDRESS_NORM)),
    Index("ix_touches_sent_at", "sent_at"),
    Index("ix_touches_unsent_updated_at", "updated_at",
          sqlite_where=text("sent_at IS NULL"), postgresql_where=text("sent_at IS NULL")),
    Index("ix_touches_entry_id", "entry_id"),
    Index("ix_touches_patient_id", "patient_id", "due_at"),
)
"""One row per pathway step and timeline entry: what outreach will send, sent, or why not."""

patient_preferences = Table(
    "patient_preferences",
    metadata,
    Column("patient_id", PatientId, primary_key=True),
    Column("preferred_channel", String(16), nullable=True),
    Column("language", String(35), nullable=True),
    Column("timezone", String(64), nullable=True),
    Column("opted_out", JSON, nullable=True, doc="channel names the patient opted out of"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""What the patient told us (STOP replies, portal settings); overrides the EHR's record."""

outreach_cursors = Table(
    "outreach_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_id", BigInteger, nullable=False, default=0),
    Column("held_since", DateTime(timezone=True), nullable=True,
           doc="when the consumer first waited on a gap in timeline_changes ids"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""How far a stage has consumed ``timeline_changes`` (by id)."""


# --- FHIR in (see integration/fhir_notify.py, integration/fhir_ingest.py) ---------------------

fhir_secrets = Table(
    "fhir_secrets",
    metadata,
    Column("connection", String(64), primary_key=True),
    Column("secret", String(512), nullable=False,
           doc="the channel secret given to the EHR (it must be sent again on each ensure)"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""One notification secret per ``[[connections]]`` entry."""

fhir_subscriptions = Table(
    "fhir_subscriptions",
    metadata,
    Column("connection", String(64), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("subscription_id", String(255), nullable=True),
    Column("mode", String(16), nullable=False, doc="backport | classic | poll"),
    Column("topic", String(512), nullable=True),
    Column("status", String(32), nullable=True),
    Column("tracker", JSON, nullable=True, doc="subscriptions.TrackerState.to_json()"),
    Column("poll_cursor", JSON, nullable=True, doc="subscriptions.PollCursor as JSON"),
    Column("last_notification_at", DateTime(timezone=True), nullable=True),
    Column("last_heartbeat_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("catchup_claimed_at", DateTime(timezone=True), nullable=True,
           doc="set while a catch-up runs: only one per subscription"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_fhir_subscriptions_subscription_id", "subscription_id"),
)
"""Per connection and resource type: the Subscription careloop keeps there and how far it is."""


# --- channels, replies and write-back (integration/replies/, integration/writeback/) ---------

channel_events = Table(
    "channel_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("channel", String(16), nullable=False, doc="sms | email | voice | portal"),
    Column("kind", String(16), nullable=False, doc="status | inbound | portal"),
    Column("provider_id", String(255), nullable=False,
           doc="the provider's id for the event (idempotency: one row per id)"),
    Column("address", String(320), nullable=False, default="", doc="the patient's address"),
    Column("touch_key", String(255), nullable=True, doc="the touch it is about, when known"),
    Column("payload", JSON, nullable=False, doc="the webhook's parameters as received"),
    Column("status", String(16), nullable=False, doc="pending | processed | failed"),
    Column("result", String(255), nullable=True, doc="what processing did, or why it failed"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("channel", "kind", "provider_id",
                     name="uq_channel_events_channel_kind_provider_id"),
    Index("ix_channel_events_status", "status", "id"),
)
"""Provider webhooks (delivery receipts, replies) and portal actions, stored before the 2xx."""

address_optouts = Table(
    "address_optouts",
    metadata,
    Column("channel", String(16), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("event_id", BigInteger, nullable=True, doc="the channel event that opted out"),
)
"""Per channel and address (CTIA: STOP opts that number out of that channel)."""

patient_requests = Table(
    "patient_requests",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("entry_id", String(32), nullable=False),
    Column("patient_id", PatientId, nullable=False),
    Column("action", String(16), nullable=False,
           doc="confirm | cancel | reschedule | survey"),
    Column("source", String(16), nullable=False, doc="sms | voice | email | portal"),
    Column("event_id", BigInteger, nullable=True, doc="channel_events row that carried it"),
    Column("touch_key", String(255), nullable=True),
    Column("detail", JSON, nullable=True, doc="survey answers, preferred times..."),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("event_id", "action", name="uq_patient_requests_event_id"),
    Index("ix_patient_requests_entry_id", "entry_id", "action"),
)
"""What patients asked for (confirm, cancel, reschedule, survey answers), one row per request."""

ehr_outbox = Table(
    "ehr_outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(255), nullable=False, unique=True,
           doc="identifier value (system urn:careloop:writeback): one write per key, ever"),
    Column("connection", String(64), nullable=False),
    Column("resource_type", String(64), nullable=False,
           doc="Communication | AppointmentResponse | Task | Appointment"),
    Column("operation", String(16), nullable=False, doc="create | update"),
    Column("target", String(512), nullable=True, doc="update: the resource (Type/id) to change"),
    Column("resource", JSON, nullable=False, doc="create: the resource; update: the change"),
    Column("status", String(16), nullable=False, doc="pending | sending | written | failed"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True, doc="OperationOutcome text of a rejection"),
    Column("ehr_ref", String(512), nullable=True, doc="Type/id in the EHR once written"),
    Column("touch_id", BigInteger, nullable=True),
    Column("event_id", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_ehr_outbox_status_next", "status", "next_attempt_at"),
)
"""The write-back outbox: every write careloop owes an EHR, retried until written or rejected."""


# --- self-service: rebooking, waitlist, the patient's own page (issue 11) ---------------------

bookings = Table(
    "bookings",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("patient_id", PatientId, nullable=False),
    Column("old_entry_id", String(32), nullable=True, doc="the appointment replaced, if any"),
    Column("connection", String(64), nullable=False),
    Column("slot_ref", String(512), nullable=False, doc="Slot/<id> in the EHR"),
    Column("start", DateTime(timezone=True), nullable=False),
    Column("end", DateTime(timezone=True), nullable=True),
    Column("source", String(16), nullable=False, doc="portal | waitlist"),
    Column("method", String(16), nullable=True, doc="transaction | book-operation | ordered"),
    Column("status", String(16), nullable=False, doc="pending | booked | conflict | failed"),
    Column("new_appointment_ref", String(512), nullable=True),
    Column("error", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_bookings_patient_id", "patient_id", "started_at"),
    Index("ix_bookings_started_at", "started_at"),
)
"""Every attempt to book a slot for a patient (rebooking from the page, a waitlist offer)."""

waitlist_entries = Table(
    "waitlist_entries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("patient_id", PatientId, nullable=False),
    Column("entry_id", String(32), nullable=True, doc="the appointment held now (to move up)"),
    Column("connection", String(64), nullable=True),
    Column("service", String(255), nullable=False, default="",
           doc="service type code or text the slot must match"),
    Column("location", String(255), nullable=False, default=""),
    Column("earliest", DateTime(timezone=True), nullable=True),
    Column("latest", DateTime(timezone=True), nullable=True,
           doc="only slots before this (e.g. the appointment held now)"),
    Column("status", String(16), nullable=False, doc="active | booked | withdrawn"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_waitlist_entries_status", "status", "service", "created_at"),
    Index("ix_waitlist_entries_patient_id", "patient_id"),
)
"""Patients who asked for an earlier slot of the same service."""

freed_slots = Table(
    "freed_slots",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(255), nullable=False, unique=True,
           doc="what freed it: slot ref, or the cancelled entry id and time"),
    Column("source", String(16), nullable=False, doc="hl7v2 | fhir | rebooking"),
    Column("connection", String(64), nullable=True),
    Column("slot_ref", String(512), nullable=True, doc="Slot/<id> when the EHR has Slots"),
    Column("service", String(255), nullable=False, default=""),
    Column("location", String(255), nullable=False, default=""),
    Column("start", DateTime(timezone=True), nullable=False),
    Column("end", DateTime(timezone=True), nullable=True),
    Column("status", String(16), nullable=False,
           doc="open | offering | filled | expired | withdrawn"),
    Column("freed_at", DateTime(timezone=True), nullable=False),
    Column("filled_at", DateTime(timezone=True), nullable=True),
    Column("filled_by", BigInteger, nullable=True, doc="waitlist_offers.id that won"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_freed_slots_status", "status", "start"),
)
"""Slots freed by a cancellation or a rebooking, offered to the waitlist."""

waitlist_offers = Table(
    "waitlist_offers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("slot_id", BigInteger, nullable=False),
    Column("waitlist_id", BigInteger, nullable=False),
    Column("patient_id", PatientId, nullable=False),
    Column("channel", String(16), nullable=False, default=""),
    Column("status", String(16), nullable=False,
           doc="offered | accepted | declined | expired | taken"),
    Column("offered_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("responded_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("slot_id", "waitlist_id", name="uq_waitlist_offers_slot_id"),
    Index("ix_waitlist_offers_status", "status", "expires_at"),
)
"""One offer of a freed slot to one waitlisted patient."""

portal_access = Table(
    "portal_access",
    metadata,
    Column("token_hash", String(64), primary_key=True, doc="sha256 of the link token"),
    Column("patient_id", PatientId, nullable=False),
    Column("failures", Integer, nullable=False, default=0),
    Column("locked_at", DateTime(timezone=True), nullable=True),
    Column("verified_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""Date-of-birth checks per patient-page link: failures, and the lock after too many."""


# --- the web console: people who sign in (issue 10) -------------------------------------------

console_users = Table(
    "console_users",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False, doc="argon2id (PHC string)"),
    Column("role", String(16), nullable=False, doc="admin | operator | viewer"),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", DateTime(timezone=True), nullable=True),
    Column("last_login_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("phi", Boolean, nullable=False, default=False,
           doc="may see patient data: raw messages, resources, timelines (each view audited)"),
    Column("oidc_subject", String(512), nullable=True, unique=True,
           doc="issuer|sub of a person who signs in through OpenID Connect"),
)
"""People who sign in to the console (not API clients): ``careloop users create``, or made on
their first OpenID Connect sign-in."""

console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id", String(64), primary_key=True, doc="sha256 of the session cookie's token"),
    Column("user_id", BigInteger, nullable=False),
    Column("csrf", String(64), nullable=False, doc="the token every form of the session posts"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, doc="the absolute limit"),
    Index("ix_console_sessions_user_id", "user_id"),
)
"""Console sessions: idle timeout from ``last_seen_at``, absolute limit ``expires_at``."""

sender_settings = Table(
    "sender_settings",
    metadata,
    Column("application", String(227), primary_key=True, doc="MSH-3 namespace id"),
    Column("facility", String(227), primary_key=True, doc="MSH-4 namespace id ('' for any)"),
    Column("timezone", String(64), nullable=True),
    Column("identifier_systems", JSON, nullable=True),
    Column("ack_to", String(255), nullable=True),
    Column("updated_by", String(255), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""HL7 senders registered or changed in the console; a row overrides the ``[[hl7_senders]]``
rule with the same application and facility."""

replay_jobs = Table(
    "replay_jobs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("actor", String(255), nullable=False),
    Column("filters", JSON, nullable=False, doc="the message filter the replay was asked for"),
    Column("inbox_ids", JSON, nullable=False, doc="the rows put back to received"),
    Column("total", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""A replay of several messages from the console; its progress is read from their statuses."""

fhir_tokens = Table(
    "fhir_tokens",
    metadata,
    Column("connection", String(64), primary_key=True),
    Column("obtained_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("scope", Text, nullable=False, default=""),
    Column("holder", String(255), nullable=False, doc="host:pid of the process that holds it"),
)
"""The latest SMART access token each connection obtained (its expiry, never its value), from
whichever process asked, for the console's connections page."""
