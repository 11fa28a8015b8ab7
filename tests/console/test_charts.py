"""The console's inline SVG charts: scaling, escaping, empty data, the text fallback, and the
time buckets (grouped in SQL the same way on SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, insert, select

from integration.console.charts import (
    Point,
    bar_chart,
    bucket_key,
    bucket_starts,
    column_chart,
    fmt,
    heights,
    nice_max,
    series,
    sparkline,
)
from integration.db import write_lock
from integration.models import inbox

NOW = datetime(2025, 3, 4, 10, 17, 42, tzinfo=UTC)


def test_nice_max_rounds_up_to_a_round_top() -> None:
    assert [nice_max(v) for v in (0, -3, 1, 3, 7, 11, 20, 21, 250, 251, 0.3)] == [
        1, 1, 1, 5, 10, 20, 20, 25, 250, 500, 0.5]
    assert nice_max(float("inf")) == 1
    assert nice_max(float("nan")) == 1


def test_heights_scale_to_the_span_and_clip() -> None:
    assert heights([0, 5, 10], 100) == [0, 50, 100]
    assert heights([3, 7], 100) == [30, 70]  # top 10
    assert heights([-4, 2], 50, top=4) == [0, 25]  # negative drawn as nothing
    assert heights([8], 100, top=4) == [100]  # never longer than the span
    assert heights([], 100) == []
    assert heights([0, 0], 100) == [0, 0]  # nothing to divide by: no bar


def test_fmt() -> None:
    assert [fmt(3.0), fmt(2.5), fmt(1 / 3), fmt(float("nan"))] == ["3", "2.5", "0.3", "-"]


def _svg(markup: str) -> str:
    return markup.split("<svg", 1)[1].split("</svg>", 1)[0]


def test_column_chart_bars_title_and_text_fallback() -> None:
    points = [Point("09:00", 3, title="2025-03-04 09:00 UTC"), Point("10:00", 0),
              Point("11:00", 8, bad=True)]
    html = str(column_chart("c1", "Messages per hour", points, unit="messages"))
    assert html.startswith('<figure id="c1"') and html.endswith("</figure>")
    assert '<figcaption id="c1-caption">Messages per hour</figcaption>' in html
    assert 'role="img"' in html and 'aria-labelledby="c1-title c1-desc"' in html
    assert '<title id="c1-title">Messages per hour</title>' in html
    assert "3 values, total 11 messages; highest 8 at 11:00." in html
    rects = re.findall(r'<rect class="([^"]+)"[^>]*height="([\d.]+)"', html)
    # top is 10: 3 → 30% and 8 → 80% of the 104 px plot; the zero bar is not drawn
    assert rects == [("bar", "31.2"), ("bar bad", "83.2")]
    assert "<title>2025-03-04 09:00 UTC: 3</title>" in html
    # the numbers as a table, every bucket including the empty one
    data = html.split('id="c1-data"', 1)[1]
    assert re.findall(r'<th scope="row">(.*?)</th><td>(.*?)</td>', data) == [
        ("2025-03-04 09:00 UTC", "3"), ("10:00", "0"), ("11:00", "8")]
    assert "<details><summary>The numbers</summary>" in html
    assert "style=" not in html and "<script" not in html


def test_labels_are_escaped_everywhere() -> None:
    evil = '<script>alert("x")</script>&'
    for chart in (column_chart("c", evil, [Point(evil, 2, title=evil)]),
                  bar_chart("c", evil, [Point(evil, 2)], label_head=evil, note=evil),
                  sparkline(evil, [1.0, 2.0])):
        html = str(chart)
        assert "<script" not in html
        assert "&lt;script&gt;" in html and "&amp;" in html
        assert 'alert("x")' not in html  # quotes escaped too (attributes)


def test_chart_id_is_escaped() -> None:
    html = str(column_chart('x" onload="y', "t", []))
    assert 'onload="y' not in html


def test_empty_and_all_zero_data() -> None:
    empty = str(column_chart("e", "Nothing", []))
    assert "No data" in empty and "<desc id=\"e-desc\">No data.</desc>" in empty
    assert "<rect" not in empty
    assert '<th scope="row">none</th><td>0</td>' in empty
    zeros = str(column_chart("z", "Zeros", [Point("a", 0), Point("b", 0)], unit="rows"))
    assert "All 2 values are 0 rows." in zeros and "<rect" not in zeros
    bars = str(bar_chart("b", "None", []))
    assert "No data" in bars and "<rect" not in bars
    assert "<rect" not in str(sparkline("s", []))


def test_bar_chart_rows() -> None:
    html = str(bar_chart("acks", "ACK codes", [Point("AA", 40), Point("AE", 10, bad=True)],
                         unit="messages", label_head="ACK code"))
    widths = re.findall(r'<rect class="([^"]+)" x="140" y="[\d.]+" width="([\d.]+)"', html)
    assert widths == [("bar", "227.2"), ("bar bad", "56.8")]  # 40/50 and 10/50 of 284 px
    assert '<th scope="col" class="text">ACK code</th><th scope="col">Messages</th>' in html
    long_label = str(bar_chart("l", "t", [Point("x" * 40, 1)]))
    assert "x" * 21 + "…" in long_label  # cut in the drawing
    assert f'<th scope="row">{"x" * 40}</th>' in long_label  # whole in the table


def test_sparkline_says_what_it_shows() -> None:
    html = str(sparkline("LAB|HOSP", [0, 2, 4]))
    assert 'aria-label="LAB|HOSP: 3 values, total 6, highest 4"' in html
    assert html.count("<rect") == 2


def test_many_buckets_label_only_a_few() -> None:
    points = [Point(f"{i:02d}", i) for i in range(60)]
    html = str(column_chart("m", "t", points, max_ticks=6))
    labels = re.findall(r'<text x="[\d.]+" y="125" text-anchor="middle">(\d+)</text>', html)
    assert labels == ["00", "10", "20", "30", "40", "50"]


def test_bucket_starts_end_with_the_current_bucket() -> None:
    hours = bucket_starts(NOW, "hour", 24)
    assert len(hours) == 24
    assert hours[-1] == datetime(2025, 3, 4, 10, tzinfo=UTC)
    assert hours[0] == datetime(2025, 3, 3, 11, tzinfo=UTC)
    minutes = bucket_starts(NOW, "minute", 60)
    assert (minutes[0], minutes[-1]) == (datetime(2025, 3, 4, 9, 18, tzinfo=UTC),
                                         datetime(2025, 3, 4, 10, 17, tzinfo=UTC))


def test_series_fills_empty_buckets() -> None:
    starts = bucket_starts(NOW, "hour", 3)
    points = series({"2025-03-04 09": 4, "2025-03-04 07": 99}, starts, "hour", bad=True)
    assert [(p.label, p.value, p.bad) for p in points] == [
        ("08:00", 0, True), ("09:00", 4, True), ("10:00", 0, True)]
    assert points[1].title == "2025-03-04 09:00 UTC"


def _row(n: int, at: datetime) -> dict[str, object]:
    return {"source": "mllp", "peer": "p", "sender": "A|B", "dedup_key": f"k{n}",
            "message_type": "ADT^A01", "control_id": f"c{n}", "version": "2.5", "raw": b"MSH",
            "status": "processed", "ack_code": "AA", "attempts": 0, "received_at": at}


@pytest.mark.parametrize("unit", ["minute", "hour"])
def test_bucket_key_groups_the_same_on_both_databases(engine: Engine, unit: str) -> None:
    times = [NOW, NOW - timedelta(seconds=43), NOW - timedelta(minutes=3),
             NOW - timedelta(hours=2, minutes=5), datetime(2025, 3, 4, 8, 0, 0, tzinfo=UTC)]
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(inbox), [_row(i, at) for i, at in enumerate(times)])
    with engine.connect() as conn:
        key = bucket_key(conn.dialect.name, inbox.c.received_at, unit)  # type: ignore[arg-type]
        got = dict(conn.execute(select(key, func.count()).group_by(key)).all())
    if unit == "minute":
        assert got == {"2025-03-04 10:17": 1, "2025-03-04 10:16": 1, "2025-03-04 10:14": 1,
                       "2025-03-04 08:12": 1, "2025-03-04 08:00": 1}
    else:
        assert got == {"2025-03-04 10": 3, "2025-03-04 08": 2}
