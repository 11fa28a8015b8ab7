"""The MSFC SIU S12–S26 corpus files (one appointment through its whole life) processed by the
real pipeline in several orders end as one entry with the right final status."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select

from integration.models import entry_sources, inbox, timeline_entries
from integration.pipeline import process_batch, process_message

pytestmark = pytest.mark.corpus


def _files(corpus: Path) -> list[Path]:
    folder = corpus / "hl7v2" / "microsoft-fhir-converter"
    files = sorted([*folder.glob("SIU-S1*.hl7"), *folder.glob("SIU-S26*.hl7")])
    if len(files) < 14:
        pytest.skip("the MSFC SIU files are not in the corpus")
    return files


def _store(engine: Engine, files: list[Path]) -> list[int]:
    now = datetime.now(UTC)
    ids = []
    with engine.begin() as conn:
        for n, path in enumerate(files):
            ids.append(conn.execute(insert(inbox).values(
                source="mllp", peer="test", sender="", dedup_key=f"{n}|{path.name}",
                message_type="SIU", control_id="", version="", raw=path.read_bytes(),
                status="received", ack_code="AA", attempts=0, received_at=now,
                next_attempt_at=now,
            ).returning(inbox.c.id)).scalar_one())
    return ids


@pytest.mark.parametrize("order", ["sorted", "reversed", "seed-1", "seed-2", "one-batch"])
def test_siu_life_ends_as_one_entry_in_any_order(
    engine: Engine, corpus: Path, order: str
) -> None:
    """Whatever the order, SCHApp's appointment (filler 36996) is one entry with status noshow
    (S26-01 is the newest by MSH-7) and every message as a source; ADTApp's S12 with the same
    local filler id is another sender's appointment."""
    files = _files(corpus)
    if order == "reversed":
        files.reverse()
    elif order.startswith("seed"):
        random.Random(order).shuffle(files)
    ids = _store(engine, files)
    if order == "one-batch":
        outcomes = process_batch(engine, ids)
    else:
        outcomes = [o for i in ids if (o := process_message(engine, i)) is not None]
    assert {o.status for o in outcomes} == {"processed"}
    with engine.connect() as conn:
        rows = conn.execute(select(timeline_entries).where(
            timeline_entries.c.kind == "appointment")).all()
        by_sender = {
            next(t["code"] for t in r.resource["meta"]["tag"] if "sender" in t["system"]): r
            for r in rows
        }
        assert len(rows) == 2
        sched = by_sender["SCHApp^GHHSFacility"]
        assert sched.status == "noshow"
        assert conn.execute(select(func.count()).select_from(entry_sources).where(
            entry_sources.c.entry_id == sched.id)).scalar_one() == len(files) - 1
        assert by_sender["ADTApp^GHHSFacility"].status == "booked"
    # a replay of everything changes nothing
    from integration.pipeline import requeue

    with engine.connect() as conn:
        before = conn.execute(select(timeline_entries.c.id, timeline_entries.c.status,
                                     timeline_entries.c.ordinal)).all()
    requeue(engine, status="processed")
    process_batch(engine, ids)
    with engine.connect() as conn:
        after = conn.execute(select(timeline_entries.c.id, timeline_entries.c.status,
                                    timeline_entries.c.ordinal)).all()
    assert sorted(before) == sorted(after)
