"""Outcomes: what outreach changed, per pathway and step, over a period (``report``), served as
JSON, an HTML console page with charts and CSV (``api``). No patient identifiers anywhere."""

from integration.outcomes.report import (
    AppointmentOutcome,
    BookingCount,
    NoShow,
    OutcomeReport,
    Rate,
    ReasonCount,
    StepOutcome,
    SurveyFigures,
    WaitlistOutcome,
    outcome_report,
    scrub_reason,
)

__all__ = [
    "AppointmentOutcome",
    "BookingCount",
    "NoShow",
    "OutcomeReport",
    "Rate",
    "ReasonCount",
    "StepOutcome",
    "SurveyFigures",
    "WaitlistOutcome",
    "outcome_report",
    "scrub_reason",
]
