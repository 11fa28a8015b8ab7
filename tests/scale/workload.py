"""The scale test's input: a deterministic mix of HL7 v2 messages (no real person).

:func:`build_workload` makes ``total`` distinct messages (distinct MSH-10 per sender) in two
phases:

* phase 1, the **near** patients: ADT^A04 registrations and SIU bookings (with some S14
  modifications and S15 cancellations) of appointments that start seven days after ``due``
  (plus 0 to 19 s), so that the pathway's ``-P7D`` reminder falls due during the run. The
  scale test sends phase 1 first and waits until it is processed and reconciled, so that each
  reminder is planned before it is due (a reminder planned after its time is skipped, "its
  time had passed", by design) and its final state cannot depend on timing; phase 2 never
  mentions these patients or appointments.
* phase 2, the **bulk**: a few thousand patients registered (A04) and updated (A08: a new
  mobile number), appointments 8 to 40 days ahead booked (S12), rescheduled (S13), modified
  (S14) and cancelled (S15), lab results (ORU^R01) and immunizations (VXU^V04), shuffled so
  that a later version often arrives before an earlier one (newest wins whatever the order).

Message times (MSH-7, EVN-2) are whole seconds with an explicit UTC offset and strictly
increasing per patient, so every version of a thing is ordered. The same ``seed``, ``now``
and ``due`` always give the same bytes: the reference run replays exactly this input.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = [
    "NEAR_SPREAD_S", "NEAR_STEP", "SENDERS", "Message", "build_workload", "config_toml",
    "hl7_time",
]

SENDERS = {"EPIC": "MAIN", "LAB": "MAIN"}
"""MSH-3 → MSH-4 of the two sending systems (ADT/SIU/VXU from EPIC, results from LAB)."""

NEAR_STEP = timedelta(days=7)
"""The reminder's offset before the appointment (the pathway's ``-P7D``)."""
NEAR_SPREAD_S = 20
"""The near reminders fall due over this many seconds from ``due``."""

LANGUAGES = ("en^English^HL70296", "es^Spanish^HL70296")
FIRST = ("ALEX", "BLAIR", "CASEY", "DREW", "EMERY", "FINLEY", "GRAY", "HAYDEN", "INDY", "JULES")
LAST = ("ASHFORD", "BRENNAN", "CALLOWAY", "DUNMORE", "ELLERBY", "FAIRLEIGH", "GARRISON",
        "HOLLOWELL", "IVERSON", "JAMESON")
SERVICES = ("CHECKUP^Check-up^L", "FOLLOWUP^Follow-up visit^L", "VACC^Vaccination^L")
LABS = (("2345-7", "Glucose", "mg/dL", "70-99"), ("2160-0", "Creatinine", "mg/dL", "0.6-1.3"),
        ("718-7", "Hemoglobin", "g/dL", "12.0-17.5"), ("6690-2", "WBC", "10*3/uL", "4.5-11.0"))
VACCINES = (("141", "Influenza, seasonal, injectable"), ("208", "COVID-19, mRNA, LNP-S"),
            ("115", "Tdap"), ("33", "pneumococcal polysaccharide PPV23"))

_PORTAL_SECRET = "scale-test-portal-secret-not-a-real-one-0123456789"
_CONFIG = """\
timezone = "America/New_York"

# Both senders use the hospital's MRNs: one patient, whichever system speaks about them.
[[hl7_senders]]
application = "EPIC"
facility = "MAIN"
identifier_systems = {{ HOSP = "urn:oid:2.16.840.1.113883.3.9999.1" }}

[[hl7_senders]]
application = "LAB"
facility = "MAIN"
identifier_systems = {{ HOSP = "urn:oid:2.16.840.1.113883.3.9999.1" }}

[organization]
name = "Scale Test Clinic"
phone = "+1 555 0100"

[outreach]
quiet_hours = "off"      # the test runs at any hour
max_per_day = 50         # caps would make the outcome depend on which touch is planned first
max_per_week = 100
sending_timeout_s = 30   # a send cut by a SIGKILL is resolved after this long
outbox_dir = "{outbox}"

[channels.portal]
secret = "{secret}"     # shared by every process (links signed by one, opened on another)

[[pathways]]
name = "appointment-reminder"
on = "appointment"
when = {{ status = ["booked"] }}
steps = [ {{ at = "-P7D", channel = "preferred", template = "appointment-reminder" }},
          {{ at = "-P1D", channel = "sms", template = "appointment-reminder-short" }} ]
"""


def config_toml(outbox: Path) -> str:
    """The configuration the workload is meant for (``CARELOOP_CONFIG``): an appointment
    reminder pathway, ``-P7D`` (the near patients' reminder) and ``-P1D``, on the development
    file channel writing under ``outbox``; no quiet hours and high caps, so that what is sent
    depends on the timeline only."""
    return _CONFIG.format(outbox=outbox, secret=_PORTAL_SECRET)


@dataclass(frozen=True)
class Message:
    """One message of the workload."""

    sender: str
    """MSH-3 (the dedup key is MSH-3 + MSH-4 + MSH-10)."""
    control_id: str
    """MSH-10."""
    kind: str
    """MSH-9 without the structure, e.g. ``SIU^S12``."""
    phase: int
    """1: near patients, sent and settled first; 2: the bulk."""
    raw: bytes
    """ER7, CR segment ends."""


@dataclass(frozen=True)
class _Appointment:
    mrn: str
    person: dict[str, str]
    filler: str
    start: datetime
    service: str


def hl7_time(moment: datetime) -> str:
    """An HL7 TS to the second with an explicit offset (UTC)."""
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


class _Builder:
    def __init__(self, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = now.astimezone(UTC).replace(microsecond=0)
        self.counter = 0
        self.appointments = 0

    def control(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter:07d}"

    @staticmethod
    def join(segments: list[str]) -> bytes:
        return ("\r".join(segments) + "\r").encode()

    def msh(self, sender: str, kind: str, structure: str, control: str, at: datetime) -> str:
        return (f"MSH|^~\\&|{sender}|{SENDERS[sender]}|CARELOOP|HOSP|{hl7_time(at)}||"
                f"{kind}^{structure}|{control}|P|2.5.1")

    @staticmethod
    def pid(mrn: str, person: dict[str, str]) -> str:
        return (f"PID|1||{mrn}^^^HOSP^MR||{person['last']}^{person['first']}||"
                f"{person['dob']}|{person['sex']}|||{person['street']}^^SPRINGFIELD^IL^62704^USA"
                f"||^PRN^CP^^1^217^{person['phone']}~^NET^Internet^{mrn.lower()}@example.org"
                f"||{person['lang']}")

    def person(self, index: int) -> dict[str, str]:
        rng = self.rng
        return {
            "first": FIRST[index % len(FIRST)],
            "last": f"{LAST[(index // len(FIRST)) % len(LAST)]}{index}",
            "dob": f"{rng.randint(1935, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "sex": rng.choice("FM"),
            "street": f"{rng.randint(1, 9999)} WILLOW CREEK RD",
            "phone": f"555{rng.randint(0, 9999):04d}",
            "lang": LANGUAGES[0] if rng.random() < 0.8 else LANGUAGES[1],
        }

    def adt(self, trigger: str, mrn: str, person: dict[str, str], at: datetime,
            phase: int) -> Message:
        control = self.control("A")
        raw = self.join([
            self.msh("EPIC", f"ADT^{trigger}", "ADT_A01", control, at),
            f"EVN|{trigger}|{hl7_time(at)}",
            self.pid(mrn, person),
            f"PV1|1|O|CLINIC1^^^MAIN||||||||||||||||V{control}^^^HOSP^VN",
        ])
        return Message("EPIC", control, f"ADT^{trigger}", phase, raw)

    def siu(self, trigger: str, appt: _Appointment, *, minutes: int, at: datetime,
            phase: int) -> Message:
        control = self.control("S")
        start, filler = appt.start, appt.filler
        end = start + timedelta(minutes=minutes)
        status = "Booked" if trigger != "S15" else "Cancelled"
        raw = self.join([
            self.msh("EPIC", f"SIU^{trigger}", "SIU_S12", control, at),
            f"SCH|P{filler}|{filler}|||||||{minutes}|min|^^{minutes}^{hl7_time(start)}"
            f"^{hl7_time(end)}|||||||||||||||{status}",
            self.pid(appt.mrn, appt.person),
            "RGS|1|A",
            f"AIS|1||{appt.service}",
            "AIL|1||CLINIC1^^^MAIN^^^^^Main Street Clinic|",
        ])
        return Message("EPIC", control, f"SIU^{trigger}", phase, raw)

    def oru(self, mrn: str, person: dict[str, str], at: datetime) -> Message:
        control = self.control("R")
        code, name, unit, ref = self.rng.choice(LABS)
        value = round(self.rng.uniform(0.5, 150.0), 1)
        raw = self.join([
            self.msh("LAB", "ORU^R01", "ORU_R01", control, at),
            self.pid(mrn, person),
            f"ORC|RE||L{control}^LAB",
            f"OBR|1||L{control}^LAB|{code}^{name}^LN|||{hl7_time(at)}|||||||||||||||"
            f"{hl7_time(at)}|||F",
            f"OBX|1|NM|{code}^{name}^LN||{value}|{unit}^{unit}^UCUM|{ref}|N|||F|||"
            f"{hl7_time(at)}",
        ])
        return Message("LAB", control, "ORU^R01", 2, raw)

    def vxu(self, mrn: str, person: dict[str, str], at: datetime) -> Message:
        control = self.control("V")
        cvx, name = self.rng.choice(VACCINES)
        raw = self.join([
            self.msh("EPIC", "VXU^V04", "VXU_V04", control, at),
            self.pid(mrn, person),
            f"ORC|RE||I{control}^EPIC",
            f"RXA|0|1|{hl7_time(at)}||{cvx}^{name}^CVX|0.5|mL^mL^UCUM||00^New Record^NIP001"
            "|||||||||||CP|A",
            "RXR|C28161^Intramuscular^NCIT|LD^Left Deltoid^HL70163",
        ])
        return Message("EPIC", control, "VXU^V04", 2, raw)

    def filler(self) -> str:
        self.appointments += 1
        return f"F{self.appointments:07d}"


def build_workload(total: int, *, now: datetime, due: datetime, seed: int = 20_000,
                   near_patients: int | None = None) -> list[Message]:
    """``total`` distinct messages, phase 1 first (see the module docstring).

    ``now`` anchors message times (all in the past) and the bulk's appointments (8 to 40 days
    ahead); ``due`` is when the near patients' reminders fall due.
    """
    if total < 100:
        raise ValueError("the workload needs at least 100 messages")
    b = _Builder(seed, now)
    near = near_patients if near_patients is not None else max(20, total // 100)
    history = b.now - timedelta(days=2)  # message times start here and only increase
    phase1: list[Message] = []
    for i in range(near):
        mrn = f"N{i:06d}"
        person = b.person(i)
        at = history + timedelta(seconds=10 * i)
        phase1.append(b.adt("A04", mrn, person, at, 1))
        filler = b.filler()
        start = (due + NEAR_STEP + timedelta(seconds=i % NEAR_SPREAD_S)).replace(microsecond=0)
        appt = _Appointment(mrn, person, filler, start, b.rng.choice(SERVICES))
        phase1.append(b.siu("S12", appt, minutes=30, at=at + timedelta(seconds=1), phase=1))
        roll = b.rng.random()
        if roll < 0.2:  # a modification: longer slot, same start
            phase1.append(b.siu("S14", appt, minutes=45, at=at + timedelta(seconds=2), phase=1))
        elif roll < 0.3:  # cancelled: its reminder must never go out
            phase1.append(b.siu("S15", appt, minutes=30, at=at + timedelta(seconds=2), phase=1))
    budget = total - len(phase1)
    phase2: list[Message] = []
    index = near
    while len(phase2) < budget:
        mrn = f"P{index:06d}"
        person = b.person(index)
        at = history + timedelta(seconds=37 * index)
        step = timedelta(minutes=1)
        batch = [b.adt("A04", mrn, person, at, 2)]
        if b.rng.random() < 0.3:  # a new mobile number: scheduled reminders follow it
            person = {**person, "phone": f"556{b.rng.randint(0, 9999):04d}"}
            at += step
            batch.append(b.adt("A08", mrn, person, at, 2))
        for _ in range(b.rng.choice((0, 1, 1, 1, 2, 2))):
            filler = b.filler()
            start = (b.now + timedelta(days=8, minutes=b.rng.randint(0, 32 * 24 * 60))
                     ).replace(second=0)
            appt = _Appointment(mrn, person, filler, start, b.rng.choice(SERVICES))
            at += step
            batch.append(b.siu("S12", appt, minutes=30, at=at, phase=2))
            roll = b.rng.random()
            if roll < 0.25:  # rescheduled
                appt = replace(appt, start=start + timedelta(days=b.rng.randint(1, 5), minutes=30))
                at += step
                batch.append(b.siu("S13", appt, minutes=30, at=at, phase=2))
            if 0.25 <= roll < 0.5:  # modified: a longer slot
                at += step
                batch.append(b.siu("S14", appt, minutes=60, at=at, phase=2))
            if b.rng.random() < 0.1:  # cancelled in the end
                at += step
                batch.append(b.siu("S15", appt, minutes=30, at=at, phase=2))
        for _ in range(b.rng.choice((0, 1, 1, 2))):
            at += step
            batch.append(b.oru(mrn, person, at))
        if b.rng.random() < 0.5:
            at += step
            batch.append(b.vxu(mrn, person, at))
        phase2.extend(batch)
        index += 1
    del phase2[budget:]
    b.rng.shuffle(phase2)
    return phase1 + phase2
