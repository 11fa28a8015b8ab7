"""Structured logging without PHI (DESIGN invariant 6).

structlog with stable snake_case event names. Context (inbox id, control id, connection, request
id) is bound through contextvars. The last processor keeps only allow-listed keys, so a name,
birth date, phone number or message text passed by mistake never reaches the output: it is
replaced by a note that a key was dropped.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["ALLOWED_KEYS", "configure_logging", "get_logger"]

# Keys a log line may carry. Values are ids, codes, counts, durations and addresses, never
# message content. Add to this list deliberately.
ALLOWED_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "logger",
        "inbox_id",
        "inbox_ids",
        "event_id",
        "booking_id",
        "control_id",
        "message_type",
        "sender",
        "peer",
        "source",
        "connection",
        "request_id",
        "client_id",
        "ack_code",
        "status",
        "count",
        "duplicates",
        "batch",
        "attempts",
        "error_code",
        "location",
        "reason",
        "error",
        "exc_type",
        "elapsed_ms",
        "host",
        "port",
        "tls",
        "url",
        "queue",
        "queues",
        "worker",
        "method",
        "path",
        "status_code",
        "size",
        "limit",
        "revision",
        "database",
        "broker",
        "skipped_bytes",
        "connections",
        "patient_id",
        "entry_id",
        "replaced_id",
        "survivor_id",
        "changes",
    }
)


def _allow_list(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    dropped = [k for k in event_dict if k not in ALLOWED_KEYS]
    for key in dropped:
        del event_dict[key]
    if dropped:
        event_dict["dropped_keys"] = len(dropped)
    return event_dict


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it), and never lets a
    logging failure (closed or full stream) break the request that logged."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Set up structlog (and the stdlib root logger, for uvicorn and celery) once at start."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _allow_list,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    logging.getLogger().setLevel(numeric)
    # Alembic narrates every plugin it loads at INFO; its migrations are reported by careloop.
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))
    # httpx logs every request URL at INFO; a search URL can carry an identifier (an MRN), so
    # FHIR traffic is reported through careloop's own allow-listed events instead.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
