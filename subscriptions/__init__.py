"""FHIR Subscription lifecycle: decides what to create, renew and catch up; ``adapters`` call.

Everything here is pure (no I/O, no clock: ``now`` is passed in) or a flow: a generator that
yields :class:`adapters.fhir.FHIRRequest` and receives the responses, run by :func:`run_flow`
against an :class:`adapters.fhir.FHIRApi`. The public surface:

Building and ensuring (``careloop subscriptions ensure``)
    :class:`SubscriptionSpec`, :func:`build_subscription`, :func:`read_subscription`
    (:class:`SubscriptionInfo`), :func:`find_request`, :func:`plan_ensure` with its actions
    :class:`Create`, :class:`Update`, :class:`Delete`, :class:`Keep`, :class:`CatchUpFirst`.
The notification endpoint
    :func:`secret_matches` / :func:`notification_secret` (the channel secret, constant time),
    :func:`parse_notification` and :func:`parse_status_bundle` (:class:`Notification`,
    :class:`NotificationEvent`, :class:`Reference`; :class:`NotificationError`).
Missing nothing
    :class:`TrackerState` (JSON for a database row), :func:`observe`, :func:`check`,
    :func:`caught_up`; decisions :class:`CatchUp` and :class:`Wait`.
Catch-up, resolution and polling
    :class:`ServerCapabilities`, :func:`catch_up_flow` (:class:`CatchUpResult`),
    :func:`resolve_flow` (:class:`Resolved`), :class:`PollCursor`, :func:`poll_flow`
    (:class:`PollResult`, :class:`Change`).

See docs/subscriptions.md for the rules and the vendor leniencies.
"""

from subscriptions._json import Reference, format_instant, parse_instant
from subscriptions.build import (
    BACKPORT_PROFILE,
    SubscriptionInfo,
    SubscriptionSpec,
    SubscriptionSpecError,
    build_subscription,
    notification_secret,
    read_subscription,
    secret_header_line,
    secret_matches,
)
from subscriptions.catchup import (
    CatchUpResult,
    Resolved,
    ServerCapabilities,
    catch_up_flow,
    events_request,
    resolve_flow,
    since_search_request,
)
from subscriptions.ensure import (
    Action,
    CatchUpFirst,
    Create,
    Delete,
    Keep,
    Update,
    find_request,
    matches_spec,
    plan_ensure,
)
from subscriptions.flow import Flow, run_flow
from subscriptions.notifications import (
    Notification,
    NotificationError,
    NotificationEvent,
    NotificationType,
    PayloadContent,
    parse_notification,
    parse_status_bundle,
)
from subscriptions.polling import (
    DEFAULT_OVERLAP,
    Change,
    PollCursor,
    PollResult,
    advance,
    changes_in,
    poll_flow,
    poll_request,
)
from subscriptions.tracking import (
    CatchUp,
    Decision,
    EventRange,
    TrackerState,
    Wait,
    caught_up,
    check,
    observe,
)

__all__ = [
    "BACKPORT_PROFILE",
    "DEFAULT_OVERLAP",
    "Action",
    "CatchUp",
    "CatchUpFirst",
    "CatchUpResult",
    "Change",
    "Create",
    "Decision",
    "Delete",
    "EventRange",
    "Flow",
    "Keep",
    "Notification",
    "NotificationError",
    "NotificationEvent",
    "NotificationType",
    "PayloadContent",
    "PollCursor",
    "PollResult",
    "Reference",
    "Resolved",
    "ServerCapabilities",
    "SubscriptionInfo",
    "SubscriptionSpec",
    "SubscriptionSpecError",
    "TrackerState",
    "Update",
    "Wait",
    "advance",
    "build_subscription",
    "catch_up_flow",
    "caught_up",
    "changes_in",
    "check",
    "events_request",
    "find_request",
    "format_instant",
    "matches_spec",
    "notification_secret",
    "observe",
    "parse_instant",
    "parse_notification",
    "parse_status_bundle",
    "plan_ensure",
    "poll_flow",
    "poll_request",
    "read_subscription",
    "resolve_flow",
    "run_flow",
    "secret_header_line",
    "secret_matches",
    "since_search_request",
]
