"""The patient timeline: one de-duplicated entry per real-world thing, newest version wins.

The public surface, for the processing stage and (next) FHIR ingestion::

    from integration.timeline import SourceRef, apply
    changes = apply(conn, resources, SourceRef("fhir", "main-ehr", "Appointment/7/_history/3",
                                               "3", last_updated), now)

and for the API: :func:`read_page` with a :class:`TimelineQuery`. Modules: ``facts`` (resource →
kind, status, time, summary; pure), ``source`` (origins and ordinals), ``store`` (upserts),
``pages`` (reads and cursors).
"""

from integration.timeline.facts import KINDS, EntryFacts, facts_for
from integration.timeline.pages import Cursor, CursorError, Page, TimelineQuery, read_page
from integration.timeline.source import SourceRef, hl7v2_source
from integration.timeline.store import Change, apply, apply_batch

__all__ = [
    "KINDS",
    "Change",
    "Cursor",
    "CursorError",
    "EntryFacts",
    "Page",
    "SourceRef",
    "TimelineQuery",
    "apply",
    "apply_batch",
    "facts_for",
    "hl7v2_source",
    "read_page",
]
