"""A known history for the outcome report, and the figures computed by hand from it.

The period is June 2024 (UTC). Pathways: ``appointment-reminder`` (two steps, on appointment),
``survey`` and ``visit-followup`` (one step each, on visit end). Appointments A1-A10, their
touches, replies, requests, opt-outs, bookings, freed slots and offers are listed below with
what each one must (or must not) add to the report; the ``EXPECTED_*`` figures are the sums.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert

from integration.db import write_lock
from integration.models import (
    address_optouts,
    bookings,
    channel_events,
    freed_slots,
    patient_requests,
    patients,
    timeline_entries,
    touches,
    waitlist_entries,
    waitlist_offers,
)

SINCE = datetime(2024, 6, 1, tzinfo=UTC)
UNTIL = datetime(2024, 7, 1, tzinfo=UTC)
NAME = "Quintero-Alvarado"

PATHWAYS: list[dict[str, Any]] = [
    {"name": "appointment-reminder", "on": "appointment",
     "steps": [{"at": "-P3D", "channel": "preferred", "template": "appointment-reminder"},
               {"at": "-PT2H", "channel": "sms", "template": "appointment-reminder-short"}]},
    {"name": "survey", "on": "visit-end",
     "steps": [{"at": "P1DT2H", "channel": "email", "template": "survey"}]},
    {"name": "visit-followup", "on": "visit-end",
     "steps": [{"at": "PT4H", "channel": "preferred", "template": "visit-followup"}]},
]
AR, SV, VF = "appointment-reminder", "survey", "visit-followup"


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pid(n: int) -> str:
    return _hex(f"patient-{n}")


def eid(name: str) -> str:
    return _hex(f"entry-{name}")


def phone(n: int) -> str:
    """As the EHR wrote it (the touch keeps it so)."""
    return f"+1 (555) 010-000{n}"


def phone_norm(n: int) -> str:
    return f"+1555010000{n}"


def email(n: int) -> str:
    return f" Pat{n}@Example.org"


def at(month: int, day: int, hour: int = 9, minute: int = 0) -> datetime:
    return datetime(2024, month, day, hour, minute, tzinfo=UTC)


# name -> (patient, time, status)
APPOINTMENTS = {
    "A1": (1, at(6, 10, 10), "fulfilled"),   # reminded (T1, T20), attended
    "A2": (2, at(6, 11, 10), "noshow"),      # reminded (T2, undelivered but sent), no-show
    "A3": (3, at(6, 12, 10), "arrived"),     # reminded (T3), attended
    "A4": (4, at(6, 13, 10), "noshow"),      # not reminded (T4 skipped), no-show
    "A5": (5, at(6, 14, 10), "fulfilled"),   # not reminded (only a survey, after), attended
    "A6": (6, at(6, 15, 10), "cancelled"),   # left out (cancelled)
    "A7": (7, at(6, 20, 10), "checked-in"),  # reminded (T6, T23), attended
    "A8": (8, at(7, 5, 10), "noshow"),       # after the period: left out
    "A9": (1, at(5, 20, 10), "fulfilled"),   # before the period: left out
    "A10": (2, at(6, 25, 10), "booked"),     # not final: left out
}


def _touch(  # noqa: PLR0917
    key: str, pathway: str, step: int, entry: str, patient: int, status: str, *,
    channel: str = "", address: str = "", sent_at: datetime | None = None,
    delivery: str | None = None, reason: str | None = None,
    updated_at: datetime | None = None,
) -> dict[str, Any]:
    changed = updated_at or sent_at
    assert changed is not None
    return {
        "key": f"{pathway}|{step}|{eid(entry)}|{key}", "pathway": pathway, "step": step,
        "entry_id": eid(entry), "patient_id": pid(patient), "due_at": sent_at or changed,
        "moment": None, "channel": channel, "address": address, "language": "en",
        "template": pathway, "status": status, "reason": reason, "attempts": 1,
        "sent_at": sent_at, "provider_ref": None,
        "body": f"Hello {NAME}, your appointment..." if sent_at else None,
        "delivery": delivery, "created_at": changed, "updated_at": changed,
    }


TOUCHES = {
    # appointment-reminder, step 0: 11 in the period (T8, T13 are not)
    "T1": _touch("T1", AR, 0, "A1", 1, "sent", channel="sms", address=phone(1),
                 sent_at=at(6, 7), delivery="delivered"),
    "T2": _touch("T2", AR, 0, "A2", 2, "sent", channel="sms", address=phone(2),
                 sent_at=at(6, 8), delivery="undelivered"),
    "T3": _touch("T3", AR, 0, "A3", 3, "sent", channel="voice", address=phone(3),
                 sent_at=at(6, 9), delivery="delivered"),
    "T4": _touch("T4", AR, 0, "A4", 4, "skipped", updated_at=at(6, 5),
                 reason="its time (2024-06-10T09:00:00+00:00) had passed when planned"),
    "T5": _touch("T5", AR, 0, "A6", 6, "sent", channel="sms", address=phone(6),
                 sent_at=at(6, 12), delivery="delivered"),
    "T6": _touch("T6", AR, 0, "A7", 7, "sent", channel="sms", address=phone(7),
                 sent_at=at(6, 17), delivery="delivered"),
    "T7": _touch("T7", AR, 0, "A8", 8, "sent", channel="sms", address="+1 555-010-0008",
                 sent_at=at(6, 30, 23), delivery="delivered"),
    "T8": _touch("T8", AR, 0, "A9", 1, "sent", channel="sms", address=phone(1),
                 sent_at=at(5, 17), delivery="delivered"),
    "T9": _touch("T9", AR, 0, "A10", 2, "failed", updated_at=at(6, 22), channel="sms",
                 address=phone(2),
                 reason="channel: HTTP 400 The 'To' number +15550100002 is not a valid "
                        "phone number"),
    "T10": _touch("T10", AR, 0, "X1", 3, "skipped", updated_at=at(6, 6),
                  reason="its time (2024-06-11T09:00:00+00:00) had passed when planned"),
    "T11": _touch("T11", AR, 0, "X2", 4, "cancelled", updated_at=at(6, 20),
                  channel="sms", address=phone(4), reason="opted out by reply"),
    "T12": _touch("T12", AR, 0, "X3", 5, "scheduled", updated_at=at(6, 25),
                  channel="sms", address=phone(5)),
    "T13": _touch("T13", AR, 0, "X4", 5, "skipped", updated_at=at(5, 30),
                  reason="opted out of every channel"),
    # appointment-reminder, step 1: 4 in the period
    "T20": _touch("T20", AR, 1, "A1", 1, "sent", channel="sms", address=phone(1),
                  sent_at=at(6, 10, 8), delivery="delivered"),
    "T21": _touch("T21", AR, 1, "A6", 6, "cancelled", updated_at=at(6, 13, 9, 30),
                  channel="sms", address=phone(6), reason="the patient asked to cancel"),
    "T22": _touch("T22", AR, 1, "A2", 2, "cancelled", updated_at=at(6, 9), channel="sms",
                  address=phone(2), reason="cap: 1 touch(es) already on 2024-06-11"),
    "T23": _touch("T23", AR, 1, "A7", 7, "sent", channel="sms", address=phone(7),
                  sent_at=at(6, 20, 6), delivery="delivered"),
    # survey: 4 in the period (T34 is not)
    "T30": _touch("T30", SV, 0, "A1", 1, "sent", channel="email", address=email(1),
                  sent_at=at(6, 11), delivery="delivered"),
    "T31": _touch("T31", SV, 0, "A3", 3, "sent", channel="email", address=email(3),
                  sent_at=at(6, 13), delivery="delivered"),
    "T32": _touch("T32", SV, 0, "A5", 5, "sent", channel="email", address=email(5),
                  sent_at=at(6, 15), delivery="delivered"),
    "T33": _touch("T33", SV, 0, "A7", 7, "sent", channel="email", address=email(7),
                  sent_at=at(6, 21), delivery="sent"),
    "T34": _touch("T34", SV, 0, "A9", 1, "sent", channel="email", address=email(1),
                  sent_at=at(5, 21), delivery="delivered"),
    # visit-followup: 1, sent, then the provider said failed
    "T40": _touch("T40", VF, 0, "A1", 1, "sent", channel="sms", address=phone(1),
                  sent_at=at(6, 10, 14), delivery="failed"),
}


def key(name: str) -> str:
    return str(TOUCHES[name]["key"])


def _event(  # noqa: PLR0917
    n: int, channel: str, kind: str, address: str, received: datetime,
    touch: str | None = None,
) -> dict[str, Any]:
    return {"id": n, "channel": channel, "kind": kind, "provider_id": f"ev{n}",
            "address": address, "touch_key": key(touch) if touch else None,
            "payload": {"From": address, "Body": f"message {n} from {NAME}"},
            "status": "processed", "result": "", "attempts": 1, "received_at": received,
            "processed_at": received}


EVENTS = [
    _event(1, "sms", "inbound", phone_norm(1), at(6, 7, 10)),          # C on T1
    _event(2, "sms", "inbound", phone_norm(1), at(6, 7, 11)),          # C again on T1
    _event(3, "voice", "inbound", phone_norm(3), at(6, 9, 9, 5), "T3"),  # 3 (repeat): a reply
    _event(4, "sms", "inbound", phone_norm(6), at(6, 12, 10)),         # X on T5
    _event(5, "sms", "inbound", phone_norm(7), at(6, 17, 10)),         # R on T6
    _event(6, "sms", "inbound", "+15559999999", at(6, 18)),            # unknown sender
    _event(7, "portal", "portal", "", at(6, 18, 12), "T6"),            # preferences: no request
    _event(8, "sms", "inbound", phone_norm(1), at(5, 17, 10)),         # C on T8 (before)
    _event(9, "sms", "inbound", phone_norm(8), at(7, 1, 2)),           # STOP: no touch key
    _event(10, "sms", "inbound", phone_norm(1), at(6, 10, 9)),         # C on T20
    _event(11, "portal", "portal", "", at(6, 12, 9), "T30"),           # survey 9
    _event(12, "portal", "portal", "", at(6, 12, 10), "T30"),          # survey 10 (latest)
    _event(13, "portal", "portal", "", at(6, 14), "T31"),              # survey 6
    _event(14, "portal", "portal", "", at(6, 16), "T32"),              # survey 8
    _event(15, "portal", "portal", "", at(6, 22), "T33"),              # survey 9
    _event(16, "portal", "portal", "", at(5, 22), "T34"),              # survey 0 (before)
    _event(17, "sms", "status", phone_norm(1), at(6, 7, 9, 1), "T1"),  # a receipt: no reply
]


def _request(  # noqa: PLR0917
    n: int, event: int, action: str, touch: str, patient: int, entry: str,
    source: str, created: datetime, score: int | None = None,
) -> dict[str, Any]:
    detail = {"score": score, "comment": f"thanks, {NAME}"} if score is not None else None
    return {"id": n, "entry_id": eid(entry), "patient_id": pid(patient), "action": action,
            "source": source, "event_id": event, "touch_key": key(touch), "detail": detail,
            "created_at": created}


REQUESTS = [
    _request(1, 1, "confirm", "T1", 1, "A1", "sms", at(6, 7, 10)),
    _request(2, 2, "confirm", "T1", 1, "A1", "sms", at(6, 7, 11)),
    _request(3, 4, "cancel", "T5", 6, "A6", "sms", at(6, 12, 10)),
    _request(4, 5, "reschedule", "T6", 7, "A7", "sms", at(6, 17, 10)),
    _request(5, 8, "confirm", "T8", 1, "A9", "sms", at(5, 17, 10)),
    _request(6, 10, "confirm", "T20", 1, "A1", "sms", at(6, 10, 9)),
    _request(7, 11, "survey", "T30", 1, "A1", "portal", at(6, 12, 9), 9),
    _request(8, 12, "survey", "T30", 1, "A1", "portal", at(6, 12, 10), 10),
    _request(9, 13, "survey", "T31", 3, "A3", "portal", at(6, 14), 6),
    _request(10, 14, "survey", "T32", 5, "A5", "portal", at(6, 16), 8),
    _request(11, 15, "survey", "T33", 7, "A7", "portal", at(6, 22), 9),
    _request(12, 16, "survey", "T34", 1, "A9", "portal", at(5, 22), 0),
]

OPTOUTS = [
    # after the period, but about T7 (sent in it): counted for appointment-reminder step 0
    {"channel": "sms", "address": phone_norm(8), "at": at(7, 1, 2), "event_id": 9},
    # the last sms to patient 1 before 12:00 on the 10th is T20 (not T1, not T40 at 14:00)
    {"channel": "sms", "address": phone_norm(1), "at": at(6, 10, 12), "event_id": None},
    # the last email to " Pat3@Example.org" (normalised) is T31
    {"channel": "email", "address": "pat3@example.org", "at": at(6, 14), "event_id": None},
    # nothing was ever sent there
    {"channel": "sms", "address": "+15550100099", "at": at(6, 15), "event_id": None},
]


def _booking(  # noqa: PLR0917
    n: int, source: str, status: str, old: str | None, started: datetime,
    patient: int,
) -> dict[str, Any]:
    return {"id": n, "patient_id": pid(patient), "old_entry_id": eid(old) if old else None,
            "connection": "ehr", "slot_ref": f"Slot/s{n}", "start": at(6, 28),
            "end": None, "source": source, "method": "transaction", "status": status,
            "new_appointment_ref": None, "error": None, "started_at": started,
            "finished_at": started}


BOOKINGS = [
    _booking(1, "portal", "booked", "A6", at(6, 13, 10), 6),     # after T5: AR step 0, portal
    _booking(2, "waitlist", "booked", "A1", at(6, 10, 12), 1),   # after T20: AR step 1, waitlist
    _booking(3, "portal", "conflict", "A2", at(6, 16), 2),       # not booked
    _booking(4, "portal", "booked", "A9", at(5, 19), 1),         # before the period
    _booking(5, "portal", "booked", None, at(6, 18), 3),         # replaced nothing
]


def _slot(n: int, status: str, freed: datetime, filled: datetime | None) -> dict[str, Any]:
    return {"id": n, "key": f"slot-{n}", "source": "fhir", "connection": "ehr",
            "slot_ref": f"Slot/f{n}", "service": "check-up", "location": "", "start": at(6, 28),
            "end": None, "status": status, "freed_at": freed, "filled_at": filled,
            "filled_by": None, "updated_at": filled or freed}


SLOTS = [
    _slot(1, "filled", at(6, 10, 8), at(6, 10, 11)),      # 3 h
    _slot(2, "filled", at(6, 12, 0), at(6, 13, 0)),       # 24 h
    _slot(3, "filled", at(6, 14, 0), at(6, 14, 6)),       # 6 h
    _slot(4, "expired", at(6, 15), None),
    _slot(5, "offering", at(6, 20), None),
    _slot(6, "filled", at(5, 25), at(6, 1, 1)),           # freed before the period
]


def _offer(n: int, slot: int, status: str, offered: datetime, patient: int) -> dict[str, Any]:
    return {"id": n, "slot_id": slot, "waitlist_id": n, "patient_id": pid(patient),
            "channel": "sms", "status": status, "offered_at": offered,
            "expires_at": offered, "responded_at": None}


OFFERS = [
    _offer(1, 1, "accepted", at(6, 10, 8, 5), 1),
    _offer(2, 1, "taken", at(6, 10, 8, 5), 2),
    _offer(3, 2, "declined", at(6, 12, 1), 3),
    _offer(4, 2, "accepted", at(6, 12, 3), 4),
    _offer(5, 3, "accepted", at(6, 14, 1), 5),
    _offer(6, 4, "expired", at(6, 15, 1), 6),
    _offer(7, 4, "expired", at(6, 15, 1), 7),
    _offer(8, 5, "offered", at(6, 20, 1), 8),
    _offer(9, 6, "accepted", at(5, 25, 1), 1),            # before the period
]


def seed(engine: Engine) -> None:
    now = at(7, 2)
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(patients), [{"id": pid(n), "created_at": now} for n in range(1, 9)])
        rows = []
        for name, (patient, time, status) in APPOINTMENTS.items():
            resource = {
                "resourceType": "Appointment", "id": name.lower(), "status": status,
                "start": time.isoformat(),
                "participant": [{"actor": {"reference": f"Patient/{pid(patient)}",
                                           "display": NAME}}],
            }
            rows.append({"id": eid(name), "patient_id": pid(patient), "kind": "appointment",
                         "status": status, "time": time, "end_time": None,
                         "summary": f"Appointment {status}", "resource_type": "Appointment",
                         "resource": resource, "ordinal": "x", "first_seen": time,
                         "created_at": time, "updated_at": time})
        conn.execute(insert(timeline_entries), rows)
        conn.execute(insert(touches), list(TOUCHES.values()))
        conn.execute(insert(channel_events), EVENTS)
        conn.execute(insert(patient_requests), REQUESTS)
        conn.execute(insert(address_optouts), OPTOUTS)
        conn.execute(insert(bookings), BOOKINGS)
        conn.execute(insert(waitlist_entries), [
            {"id": n, "patient_id": pid(n if n <= 8 else 1), "entry_id": None,
             "connection": "ehr", "service": "check-up", "location": "", "earliest": None,
             "latest": None, "status": "active", "created_at": at(5, 1),
             "updated_at": at(5, 1)} for n in range(1, 10)])
        conn.execute(insert(freed_slots), SLOTS)
        conn.execute(insert(waitlist_offers), OFFERS)
        if conn.dialect.name == "postgresql":
            # Rows went in with explicit ids: move the sequences past them.
            for table in ("channel_events", "patient_requests", "bookings", "freed_slots",
                          "waitlist_offers", "waitlist_entries"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))")


def _rate(n: int, d: int) -> dict[str, Any]:
    return {"numerator": n, "denominator": d, "value": round(n / d, 4) if d else None}


def _rates(s: dict[str, Any]) -> dict[str, Any]:
    rebooked = s["rebookings"]["total"]
    return {
        "delivery": _rate(s["delivered"], s["sent"]),
        "failure": _rate(s["failed"], s["attempted"]),
        "reply": _rate(s["replied"], s["sent"]),
        "confirmation": _rate(s["confirmations"], s["sent"]),
        "cancellation": _rate(s["cancellations"], s["sent"]),
        "reschedule": _rate(s["reschedules"], s["sent"]),
        "rebooking": _rate(rebooked, s["sent"]),
        "opt_out": _rate(s["opt_outs"], s["sent"]),
    }


def _step(pathway: str, step: int, trigger: str, **figures: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pathway": pathway, "step": step, "trigger": trigger, "touches": 0, "sent": 0,
        "delivered": 0, "failed": 0, "attempted": 0, "skipped": 0, "held": 0, "pending": 0,
        "replies": 0, "replied": 0, "confirmations": 0, "cancellations": 0,
        "reschedules": 0, "opt_outs": 0, "survey": None, "reasons": [],
    }
    portal, waitlist = figures.pop("rebookings", (0, 0))
    out.update(figures)
    out["rebookings"] = {"portal": portal, "waitlist": waitlist, "total": portal + waitlist}
    out["rates"] = _rates(out)
    return out


SURVEY = {"answers": 4, "mean_score": 8.25, "nps": 25.0, "promoters": 2, "passives": 1,
          "detractors": 1, "promoter_rate": _rate(2, 4), "detractor_rate": _rate(1, 4)}

EXPECTED_STEPS = [
    _step(AR, 0, "appointment", touches=11, sent=6, delivered=5, failed=2, attempted=7,
          skipped=2, held=1, pending=1, replies=5, replied=4, confirmations=1,
          cancellations=1, reschedules=1, rebookings=(1, 0), opt_outs=1,
          reasons=[
              {"status": "skipped", "reason": "its time … had passed when planned",
               "count": 2},
              {"status": "cancelled", "reason": "opted out by reply", "count": 1},
          ]),
    _step(AR, 1, "appointment", touches=4, sent=2, delivered=2, failed=0, attempted=2,
          held=2, replies=1, replied=1, confirmations=1, rebookings=(0, 1), opt_outs=1,
          reasons=[
              {"status": "cancelled", "reason": "cap: … touch(es) already on …", "count": 1},
              {"status": "cancelled", "reason": "the patient asked to cancel", "count": 1},
          ]),
    _step(SV, 0, "visit-end", touches=4, sent=4, delivered=3, attempted=4, replies=5,
          replied=4, opt_outs=1, survey=SURVEY),
    _step(VF, 0, "visit-end", touches=1, sent=1, delivered=0, failed=1, attempted=1),
]

EXPECTED_TOTALS = _step(
    "*", -1, "", touches=20, sent=13, delivered=10, failed=3, attempted=14, skipped=2,
    held=3, pending=1, replies=11, replied=9, confirmations=2, cancellations=1,
    reschedules=1, rebookings=(1, 1), opt_outs=3, survey=SURVEY,
    reasons=[
        {"status": "skipped", "reason": "its time … had passed when planned", "count": 2},
        {"status": "cancelled", "reason": "cap: … touch(es) already on …", "count": 1},
        {"status": "cancelled", "reason": "opted out by reply", "count": 1},
        {"status": "cancelled", "reason": "the patient asked to cancel", "count": 1},
    ])
for _key in ("pathway", "step", "trigger"):
    EXPECTED_TOTALS.pop(_key)


def _noshow(noshow: int, attended: int) -> dict[str, Any]:
    return {"noshow": noshow, "attended": attended, "total": noshow + attended,
            "noshow_rate": _rate(noshow, noshow + attended)}


EXPECTED_APPOINTMENTS = {
    "reminded": _noshow(1, 3),          # A2 | A1, A3, A7
    "not_reminded": _noshow(1, 1),      # A4 | A5
    "by_pathway": [{"pathway": AR, **_noshow(1, 3)}],
    "reminder_pathways": [AR],
    "reminded_means": "at least one touch of these pathways was sent for the appointment",
}

EXPECTED_WAITLIST = {
    "offers": 8, "accepted": 3, "declined": 1, "expired_offers": 2, "taken": 1,
    "open_offers": 1, "acceptance_rate": _rate(3, 8),
    "slots_freed": 5, "slots_filled": 3, "slots_expired": 1, "slots_withdrawn": 0,
    "slots_open": 1, "fill_rate": _rate(3, 5),
    "hours_to_fill": {"count": 3, "median": 6.0, "mean": 11.0},
}

EXPECTED_BOOKINGS = [
    {"source": "portal", "status": "booked", "count": 2},
    {"source": "portal", "status": "conflict", "count": 1},
    {"source": "waitlist", "status": "booked", "count": 1},
]


def expected_json() -> dict[str, Any]:
    return {
        "since": "2024-06-01T00:00:00Z",
        "until": "2024-07-01T00:00:00Z",
        "steps": EXPECTED_STEPS,
        "totals": EXPECTED_TOTALS,
        "appointments": EXPECTED_APPOINTMENTS,
        "waitlist": EXPECTED_WAITLIST,
        "bookings": EXPECTED_BOOKINGS,
    }


def identifiers() -> list[str]:
    """What must never appear in an output: patient and entry ids, addresses, the name."""
    out = [pid(n) for n in range(1, 9)] + [eid(name) for name in (*APPOINTMENTS, "X1", "X2",
                                                                  "X3", "X4")]
    out += [phone(n) for n in range(1, 9)] + [phone_norm(n) for n in range(1, 9)]
    out += ["(555)", "5550100", "010-000", "Example.org", "example.org", "Pat3", NAME, "Quintero"]
    return out
