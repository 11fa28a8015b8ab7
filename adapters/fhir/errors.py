"""Errors from FHIR servers and their token endpoints, split by what the caller should do.

* :class:`RetryableFHIRError`: try again later (408, 429, 500, 502, 503, 504, a dropped or
  refused connection, a timeout). The client has already retried with backoff when one reaches
  the caller; ``retry_after`` carries the server's ``Retry-After`` when it sent one.
* :class:`FatalFHIRError`: retrying the same request will not help (400, 403, 404, 409, 412,
  422, a response that is not FHIR JSON). Subclasses name the cases callers branch on:
  :class:`AuthenticationError` (the token endpoint refused us, or a fresh token still got 401),
  :class:`ResourceNotFound` (404, or 410 for a deleted resource), :class:`PreconditionFailed`
  (412: stale ``If-Match``, or ``If-None-Exist`` matching several resources) and
  :class:`InvalidResponse`.

Every error carries the HTTP status (``None`` when no response came back), a message that says
what was asked and what the server said (the OperationOutcome's text, or the OAuth
``error_description``), and the OperationOutcome itself when there was one.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx

__all__ = [
    "RETRYABLE_STATUSES",
    "AuthenticationError",
    "FHIRError",
    "FatalFHIRError",
    "InvalidResponse",
    "PreconditionFailed",
    "ResourceNotFound",
    "RetryableFHIRError",
    "error_from_response",
    "outcome_text",
    "parse_retry_after",
]

# 500 is generic enough that servers send it for blips and for real faults alike (Oracle Health
# does both); it is retried a bounded number of times, like cumulus-fhir-support does.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class FHIRError(Exception):
    """A FHIR or token-endpoint request that failed. ``status`` is ``None`` without a response."""

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        status: int | None,
        message: str,
        outcome: Mapping[str, Any] | None = None,
        *,
        url: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = dict(outcome) if outcome is not None else None
        self.url = url
        self.retry_after = retry_after


class RetryableFHIRError(FHIRError):
    """Trying again later may succeed (busy or failing server, network trouble)."""

    retryable = True


class FatalFHIRError(FHIRError):
    """The same request will fail again: fix the request, the data or the configuration."""


class AuthenticationError(FatalFHIRError):
    """SMART Backend Services authentication failed (discovery, token endpoint, or a 401 that a
    fresh token did not cure). Usually configuration: client id, registered key, scopes."""


class ResourceNotFound(FatalFHIRError):
    """404, or 410 Gone for a deleted resource (``gone`` is then true)."""

    @property
    def gone(self) -> bool:
        return self.status == 410


class PreconditionFailed(FatalFHIRError):
    """412: ``If-Match`` names an old version, or ``If-None-Exist`` matched several resources."""


class InvalidResponse(FatalFHIRError):
    """The server answered with something that is not the FHIR JSON asked for."""


def outcome_text(body: Any) -> str:
    """The human text of an OperationOutcome (every issue's details.text or diagnostics, joined
    with ``; ``) or of an OAuth error (``error_description``, else ``error``); ``""`` if none."""
    if not isinstance(body, Mapping):
        return ""
    if body.get("resourceType") == "OperationOutcome":
        texts = []
        for issue in body.get("issue") or []:
            if not isinstance(issue, Mapping):
                continue
            details = issue.get("details")
            text = details.get("text") if isinstance(details, Mapping) else None
            if not text and isinstance(details, Mapping):
                codings = details.get("coding") or []
                text = next((c.get("display") for c in codings
                             if isinstance(c, Mapping) and c.get("display")), None)
            text = text or issue.get("diagnostics")
            if text:
                where = issue.get("expression") or issue.get("location") or []
                suffix = f" (at {', '.join(map(str, where))})" if where else ""
                texts.append(f"{text}{suffix}")
            elif issue.get("code"):
                texts.append(f"{issue.get('severity', 'error')}: {issue['code']}")
        return "; ".join(texts)
    if "error_description" in body or "error" in body:
        return str(body.get("error_description") or body.get("error"))
    return ""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); ``None``
    when absent or unreadable, never negative."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None


def error_from_response(response: httpx.Response, *, what: str = "") -> FHIRError:
    """The error for a response with status 400 or above (the body must already be read)."""
    status = response.status_code
    body = _json_or_none(response)
    said = outcome_text(body)
    if not said:
        text = response.text.strip() if response.content else ""
        said = text[:300] if text and body is None else response.reason_phrase or "no details"
    what = what or f"{response.request.method} {response.request.url}"
    message = f"{what}: HTTP {status}: {said}"
    outcome = body if isinstance(body, Mapping) and body.get("resourceType") == "OperationOutcome" \
        else None
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    url = str(response.request.url)
    cls: type[FHIRError]
    if status in RETRYABLE_STATUSES:
        cls = RetryableFHIRError
    elif status in (404, 410):
        cls = ResourceNotFound
    elif status == 412:
        cls = PreconditionFailed
    elif status == 401:
        cls = AuthenticationError
    else:
        cls = FatalFHIRError
    return cls(status, message, outcome, url=url, retry_after=retry_after)
