"""The closed loop, end to end: an HL7 SIU booking in, a reminder out, its Communication in the
stand-in EHR (../shared/ehr).

    python bench/bench_closed_loop.py [--touches 1000]

``careloop serve`` (SQLite, in-process worker, the file SMS channel) with one connection to the
EHR (SMART Backend Services required, write-back on, poll mode so no subscription traffic) and
one pathway whose reminder is due as soon as the booking lands. N SIU^S12 bookings for N
patients are sent over MLLP from 4 connections; each becomes a timeline entry and a reminder,
all due at one moment a few seconds ahead (a reminder already past due when planned is skipped,
so the bookings are planned first); then each reminder is sent and its Communication written
back with a conditional create (``If-None-Exist`` on its identifier).

Reported: the time to take in and plan the bookings, touches/s from the due moment to the last
Communication written (sent, recorded and written back), the write-back latency (touch recorded
→ Communication written: p50/p99) in that burst and again with reminders falling due at a
steady rate (``--rate`` a second for ``--steady-s``), and the exactly-once check: the EHR holds
exactly one Communication per touch. The peer: the same N Communications
written straight to the EHR by one client, one conditional create at a time and in batch
Bundles of 100, each from an empty EHR as careloop's run is: the EHR's own ceiling for this
work (its conditional create scans every Communication it holds, so the rate falls as N
grows). Target (issue 9): 200 touches/s with exactly-once write-back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402

from adapters.fhir import (  # noqa: E402
    FHIRClient,
    FHIRRequest,
    generate_signing_key,
    save_private_key,
)
from adapters.mllp import MLLPClient  # noqa: E402
from bench.harness import free_port, install_ehr, pct, serve  # noqa: E402
from integration.models import ehr_outbox, touches  # noqa: E402
from tests.e2e.ehr import CLIENT_ID, running_ehr  # noqa: E402

SYSTEM = "urn:careloop:writeback"


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def siu(n: int, start: datetime) -> tuple[bytes, bytes]:
    control = f"CL{n:07d}"
    end = start + timedelta(minutes=30)
    segments = [
        f"MSH|^~\\&|EPIC|MAIN|CARELOOP|HOSP|{_ts(datetime.now(UTC))}||SIU^S12^SIU_S12|{control}"
        "|P|2.5.1",
        f"SCH|P{n}|F{n}|||||||30|min|^^30^{_ts(start)}^{_ts(end)}",
        f"PID|1||MRN{n:07d}^^^HOSP^MR||Doe^Jane||19800101|F|||||^PRN^CP^^1^555^{n % 10_000_000:07d}"
        "||en^English^HL70296",
        "RGS|1|A",
        "AIS|1||CHECKUP^Check-up^L",
        "AIL|1||CLINIC1^^^MAIN^^^^^Main Street Clinic|",
    ]
    return ("\r".join(segments) + "\r").encode(), control.encode()


CONFIG = """
timezone = "America/New_York"

[[hl7_senders]]
application = "EPIC"
facility = "MAIN"
identifier_systems = {{ HOSP = "urn:oid:2.16.840.1.113883.19.5" }}

[[connections]]
name = "main-ehr"
fhir_base = "{origin}/fhir/R4"
client_id = "{client}"
private_key = "{pem}"
scopes = ["system/*.*"]
mode = "poll"
poll_interval_s = 3600
resource_types = ["Appointment"]
write_back = true

[[pathways]]
name = "appointment-reminder"
on = "appointment"
when = {{ status = ["booked"] }}
steps = [ {{ at = "-P3D", channel = "sms", template = "appointment-reminder" }} ]

[outreach]
quiet_hours = "off"
max_per_day = 10
max_per_week = 20
batch = 500
interval_s = 0.2
"""


class Database:
    def __init__(self, path: Path) -> None:
        self.engine = create_engine(f"sqlite:///{path}")

    def counts(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            sent = conn.execute(select(func.count()).select_from(touches).where(
                touches.c.status == "sent")).scalar_one()
            written = conn.execute(select(func.count()).select_from(ehr_outbox).where(
                ehr_outbox.c.status == "written")).scalar_one()
        return int(sent), int(written)

    def latencies_ms(self, after_id: int = 0) -> list[float]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(ehr_outbox.c.created_at, ehr_outbox.c.updated_at).where(
                ehr_outbox.c.status == "written", ehr_outbox.c.id > after_id))
            return [(r.updated_at - r.created_at).total_seconds() * 1000 for r in rows]

    def last_outbox_id(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(ehr_outbox.c.id))).scalar_one() or 0)

    def scheduled(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(touches).where(
                touches.c.status == "scheduled")).scalar_one())

    def statuses(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(touches.c.status, touches.c.reason, func.count())
                                .group_by(touches.c.status, touches.c.reason))
            return {f"{r[0]}: {r[1]}": int(r[2]) for r in rows}

    def failed(self) -> list[str]:
        with self.engine.connect() as conn:
            return [str(r.last_error) for r in conn.execute(select(ehr_outbox.c.last_error).where(
                ehr_outbox.c.status == "failed").limit(3))]


async def _send(port: int, messages: list[tuple[bytes, bytes]], connections: int) -> None:
    async def one(chunk: list[tuple[bytes, bytes]]) -> None:
        client = await MLLPClient.connect("127.0.0.1", port)
        try:
            for raw, control in chunk:
                ack = await client.send(raw, control)
                if b"|AA|" not in ack and b"|CA|" not in ack:
                    raise RuntimeError(f"not accepted: {ack[:200]!r}")
        finally:
            await client.close()

    await asyncio.gather(*(one(messages[i::connections]) for i in range(connections)))


async def _steady(database: Database, mllp: int, args: argparse.Namespace) -> dict[str, Any]:
    """Write-back latency at a steady rate: reminders falling due ``args.rate`` a second."""
    first = await asyncio.to_thread(database.last_outbox_id)
    n = int(args.rate * args.steady_s)
    lead = 10.0
    due = datetime.now(UTC) + timedelta(seconds=lead)
    messages = [siu(args.touches + i, due + timedelta(days=3, seconds=i / args.rate))
                for i in range(n)]
    await _send(mllp, messages, 4)
    deadline = time.monotonic() + lead + args.steady_s + args.timeout
    while True:
        _, written = await asyncio.to_thread(database.counts)
        if written >= args.touches + n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"steady phase: {written - args.touches} of {n} written")
        await asyncio.sleep(0.1)
    latencies = await asyncio.to_thread(database.latencies_ms, first)
    return {"touches": n, "rate_per_s": args.rate,
            "writeback_latency_ms": {"p50": round(statistics.median(latencies), 1),
                                     "p99": round(pct(latencies, 0.99), 1),
                                     "max": round(max(latencies), 1)}}


async def _count_communications(ehr: FHIRClient) -> int:
    response = await ehr.send(FHIRRequest.get("Communication", {
        "identifier": f"{SYSTEM}|", "_summary": "count"}))
    return int(response.resource.get("total", -1))


async def _peer(ehr: FHIRClient, n: int, admin: httpx.AsyncClient) -> dict[str, Any]:
    """The EHR's own ceiling: N conditional creates, one by one and in batches of 100, each
    from an empty EHR."""
    def communication(tag: str, i: int) -> dict[str, Any]:
        return {"resourceType": "Communication", "status": "completed",
                "identifier": [{"system": "urn:bench:peer", "value": f"{tag}-{i}"}],
                "payload": [{"contentString": "Reminder: your appointment."}]}

    t0 = time.monotonic()
    for i in range(n):
        await ehr.create(communication("one", i),
                         if_none_exist=f"identifier=urn:bench:peer|one-{i}")
    single = n / (time.monotonic() - t0)
    (await admin.post("/_admin/reset")).raise_for_status()
    t0 = time.monotonic()
    for start in range(0, n, 100):
        entries = [{"resource": communication("batch", i),
                    "request": {"method": "POST", "url": "Communication",
                                "ifNoneExist": f"identifier=urn:bench:peer|batch-{i}"}}
                   for i in range(start, min(n, start + 100))]
        await ehr.send(FHIRRequest("POST", "", body={"resourceType": "Bundle", "type": "batch",
                                                    "entry": entries}, retry_safe=True))
    batch = n / (time.monotonic() - t0)
    (await admin.post("/_admin/reset")).raise_for_status()
    return {"one_by_one_per_s": round(single, 1), "batch_100_per_s": round(batch, 1)}


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    key = generate_signing_key("ES384")
    pem = save_private_key(key, work / "careloop.pem")
    harness = install_ehr(work)
    out: dict[str, Any] = {"touches": args.touches}
    with running_ehr(harness, key, work) as origin:
        # The peer first, each way from an empty EHR (its conditional create searches every
        # Communication it holds, so its cost grows with what it holds: careloop starts from
        # empty too).
        peer = FHIRClient.connect(fhir_base=f"{origin}/fhir/R4", client_id=CLIENT_ID,
                                  private_key=pem, scopes=["system/*.*"])
        async with peer, httpx.AsyncClient(base_url=origin) as admin:
            out["peer_ehr"] = await _peer(peer, args.touches, admin)
        mllp = free_port()
        config = CONFIG.format(origin=origin, client=CLIENT_ID, pem=pem)
        with serve(work, config, mllp_port=mllp, env={"CARELOOP_LOG_LEVEL": "warning"}) as server:
            db = server.db
            database = Database(db)
            # Every reminder falls due at one moment, ``lead`` seconds ahead: time enough to
            # take in and plan every booking (a touch already past due when planned is skipped).
            lead = max(20.0, args.touches / 50)
            due_wall = datetime.now(UTC) + timedelta(seconds=lead)
            start = due_wall + timedelta(days=3)
            messages = [siu(i, start) for i in range(args.touches)]
            t0 = time.monotonic()
            t_due = t0 + lead
            await _send(mllp, messages, 4)
            acked = time.monotonic()
            while await asyncio.to_thread(database.scheduled) < args.touches:
                if time.monotonic() > t_due:
                    raise RuntimeError("not every booking was planned before the reminders "
                                       f"fell due; touches: {database.statuses()}")
                await asyncio.sleep(0.05)
            planned = time.monotonic()
            await asyncio.sleep(max(0.0, t_due - time.monotonic()))
            deadline = time.monotonic() + args.timeout
            sent_at = None
            while True:
                sent, written = await asyncio.to_thread(database.counts)
                if sent >= args.touches and sent_at is None:
                    sent_at = time.monotonic()
                if written >= args.touches:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {sent} sent and {written} written after "
                                       f"{args.timeout} s; failed: {database.failed()}; "
                                       f"touches: {database.statuses()}")
                await asyncio.sleep(0.05)
            done = time.monotonic()
            latencies = await asyncio.to_thread(database.latencies_ms)
            out["steady"] = await _steady(database, mllp, args)
            ehr = FHIRClient.connect(fhir_base=f"{origin}/fhir/R4", client_id=CLIENT_ID,
                                     private_key=pem, scopes=["system/*.*"])
            async with ehr:
                in_ehr = await _count_communications(ehr)
            out.update({
                "bookings_acked_s": round(acked - t0, 2),
                "bookings_planned_s": round(planned - t0, 2),
                "all_sent_after_due_s": round((sent_at or done) - t_due, 2),
                "all_written_after_due_s": round(done - t_due, 2),
                "touches_per_s": round(args.touches / (done - t_due), 1),
                "writeback_latency_ms": {"p50": round(statistics.median(latencies), 1),
                                         "p99": round(pct(latencies, 0.99), 1),
                                         "max": round(max(latencies), 1)},
                "communications_in_ehr": in_ehr,
                "exactly_once": in_ehr == args.touches + out["steady"]["touches"],
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--touches", type=int, default=1000, help="bookings (one touch each)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--rate", type=float, default=20, help="steady phase: touches/s due")
    parser.add_argument("--steady-s", type=float, default=15, help="steady phase length")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="careloop-bench-loop-") as tmp:
        r = asyncio.run(bench(args, Path(tmp)))
    lat, peer = r["writeback_latency_ms"], r["peer_ehr"]
    verdict = "PASS" if r["touches_per_s"] >= 200 and r["exactly_once"] else "FAIL"
    print(f"{r['touches']} SIU bookings ACKed in {r['bookings_acked_s']} s and planned in "
          f"{r['bookings_planned_s']} s; the reminders, due at one moment, were all sent "
          f"{r['all_sent_after_due_s']} s and all written back {r['all_written_after_due_s']} s "
          f"after it: {r['touches_per_s']} touches/s sent and written (target 200/s with "
          f"exactly-once: {verdict})")
    print(f"write-back latency in that burst (queued behind the EHR): p50 {lat['p50']} ms, "
          f"p99 {lat['p99']} ms, max {lat['max']} ms")
    st = r["steady"]
    sl = st["writeback_latency_ms"]
    print(f"write-back latency at a steady {st['rate_per_s']} touches/s ({st['touches']} "
          f"touches): p50 {sl['p50']} ms, p99 {sl['p99']} ms, max {sl['max']} ms")
    print(f"Communications in the EHR: {r['communications_in_ehr']} for "
          f"{r['touches'] + st['touches']} touches (exactly once: {r['exactly_once']})")
    print(f"peer, the EHR alone: {peer['one_by_one_per_s']} conditional creates/s one by one, "
          f"{peer['batch_100_per_s']}/s in batches of 100; careloop end to end = "
          f"{r['touches_per_s'] / peer['batch_100_per_s']:.2f}× the EHR's batch ceiling")
    report = {"benchmark": "careloop closed loop (issue 9)", "command": shlex.join(sys.argv),
              "python": platform.python_version(), "cpus": os.cpu_count(), **r}
    target = ROOT / "bench" / "results" / "closed_loop.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
