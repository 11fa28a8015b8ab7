"""Small charts drawn on the server as inline SVG: no JavaScript, no outside asset, nothing the
console's Content-Security-Policy would have to allow.

Every chart is a ``<figure>`` with

* a visible ``<figcaption>`` (the title),
* an ``<svg class="chart" role="img">`` labelled by its own ``<title>`` and a ``<desc>`` that
  says the total and the highest value in words (what a screen reader announces),
* each bar's number in a ``<title>`` tooltip, and
* the numbers as a table inside ``<details>`` (id ``<chart id>-data``): the text fallback, for
  people who cannot see the chart and for copying figures.

Colours come from the console's style sheet (``.chart rect.bar``, ``rect.bar.bad``,
``line.axis``, ``text``); the SVG carries no style attribute. The functions are pure: data in,
escaped markup out (:class:`markupsafe.Markup`, safe to put in a Jinja2 template as is).

Counts per time bucket come from the database grouped by :func:`bucket_key` (a UTC
``YYYY-MM-DD HH:MM`` or ``YYYY-MM-DD HH`` text, the same on SQLite and PostgreSQL, so the
grouping happens in SQL and only one row per bucket crosses the wire) and are laid on the
buckets of :func:`bucket_starts` by :func:`series`, empty buckets included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from markupsafe import Markup, escape
from sqlalchemy import func

__all__ = [
    "Point",
    "Unit",
    "bar_chart",
    "bucket_key",
    "bucket_label",
    "bucket_starts",
    "column_chart",
    "fmt",
    "heights",
    "nice_max",
    "series",
    "sparkline",
]

Unit = Literal["minute", "hour"]
_STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1)}
_PY_FORMAT = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H"}
_PG_FORMAT = {"minute": "YYYY-MM-DD HH24:MI", "hour": "YYYY-MM-DD HH24"}

_XMLNS = "http://www.w3.org/2000/svg"


@dataclass(frozen=True)
class Point:
    """One bar: a short ``label`` (an axis tick, ``09:00``), its ``value``, whether it counts
    something bad (drawn in the error colour), and an optional longer ``title`` for the tooltip
    and the table (``2025-03-04 09:00 UTC``)."""

    label: str
    value: float
    bad: bool = False
    title: str = ""

    @property
    def name(self) -> str:
        return self.title or self.label


def fmt(value: float) -> str:
    """A number as shown: whole numbers without decimals, others with at most one."""
    if math.isnan(value) or math.isinf(value):
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"


def nice_max(value: float) -> float:
    """The axis top for a largest value: 1, 2, 2.5 or 5 times a power of ten, at least
    ``value`` (1 for nothing or only zeros and negatives)."""
    if not value > 0 or math.isinf(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        top = step * power
        if top >= value * (1 - 1e-12):
            return float(top)
    return float(10 * power)  # pragma: no cover - the loop always returns


def heights(values: Sequence[float], span: float, top: float | None = None) -> list[float]:
    """Bar lengths for ``values`` on an axis ``span`` long whose end is ``top`` (default: the
    nice top of the largest value); negative or missing values are drawn as 0, and nothing is
    longer than ``span``."""
    end = top if top is not None and top > 0 else nice_max(max(values, default=0.0))
    out = []
    for v in values:
        length = 0.0 if not v > 0 else min(span, span * v / end)
        out.append(round(length, 2))
    return out


def _n(value: float) -> str:
    """A coordinate: two decimals at most, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


def _summary(points: Sequence[Point], unit: str) -> str:
    if not points:
        return "No data."
    total = sum(p.value for p in points if p.value > 0)
    unit_text = f" {unit}" if unit else ""
    if total <= 0:
        return f"All {len(points)} values are 0{unit_text}."
    peak = max(points, key=lambda p: p.value)
    return (f"{len(points)} values, total {fmt(total)}{unit_text}; highest {fmt(peak.value)} "
            f"at {peak.name}.")


def _svg_open(chart_id: str, width: int, height: int, title: str, desc: str) -> list[str]:
    cid = escape(chart_id)
    return [
        f'<svg xmlns="{_XMLNS}" class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-labelledby="{cid}-title {cid}-desc" '
        f'id="{cid}-svg">',
        f'<title id="{cid}-title">{escape(title)}</title>',
        f'<desc id="{cid}-desc">{escape(desc)}</desc>',
    ]


def _data_table(chart_id: str, title: str, points: Sequence[Point], label_head: str,
                unit: str) -> str:
    rows = "".join(
        f'<tr><th scope="row">{escape(p.name)}</th><td>{fmt(p.value)}</td></tr>'
        for p in points
    ) or '<tr><th scope="row">none</th><td>0</td></tr>'
    return (
        f'<details><summary>The numbers</summary><div class="scroll">'
        f'<table id="{escape(chart_id)}-data"><caption>{escape(title)}</caption>'
        f'<thead><tr><th scope="col" class="text">{escape(label_head)}</th>'
        f'<th scope="col">{escape(unit.capitalize() or "Value")}</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div></details>"
    )


def _figure(chart_id: str, title: str, svg: list[str], table: str, note: str) -> Markup:
    cid = escape(chart_id)
    parts = [f'<figure id="{cid}" aria-labelledby="{cid}-caption">',
             f'<figcaption id="{cid}-caption">{escape(title)}</figcaption>', *svg]
    if note:
        parts.append(f'<p class="note">{escape(note)}</p>')
    parts += [table, "</figure>"]
    return Markup("\n".join(parts))  # noqa: S704 - every piece of text above is escaped


def column_chart(
    chart_id: str,
    title: str,
    points: Sequence[Point],
    *,
    unit: str = "",
    label_head: str = "Time",
    note: str = "",
    width: int = 480,
    height: int = 130,
    max_ticks: int = 6,
) -> Markup:
    """Vertical bars, one per point, in order (a count per time bucket): the y axis from 0 to
    a round top, at most ``max_ticks`` labels under the bars."""
    left, right, top_m, bottom = 34, 4, 8, 18
    plot_w, plot_h = width - left - right, height - top_m - bottom
    top = nice_max(max((p.value for p in points), default=0.0))
    svg = _svg_open(chart_id, width, height, title, _summary(points, unit))
    base = top_m + plot_h
    svg.append(f'<line class="axis" x1="{left}" y1="{top_m}" x2="{left}" y2="{base}"/>')
    svg.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{width - right}" '
               f'y2="{base}"/>')
    svg.append(f'<text x="{left - 3}" y="{top_m + 8}" text-anchor="end">{fmt(top)}</text>')
    svg.append(f'<text x="{left - 3}" y="{base}" text-anchor="end">0</text>')
    if not points:
        svg.append(f'<text x="{_n(left + plot_w / 2)}" y="{_n(top_m + plot_h / 2)}" '
                   'text-anchor="middle">No data</text>')
    else:
        slot = plot_w / len(points)
        bar_w = max(0.5, slot * 0.8)
        every = max(1, math.ceil(len(points) / max(1, max_ticks)))
        for i, (p, h) in enumerate(zip(points, heights([p.value for p in points], plot_h,
                                                         top), strict=True)):
            x = left + i * slot + (slot - bar_w) / 2
            if h > 0:
                css = "bar bad" if p.bad else "bar"
                svg.append(
                    f'<rect class="{css}" x="{_n(x)}" y="{_n(base - h)}" width="{_n(bar_w)}" '
                    f'height="{_n(h)}"><title>{escape(p.name)}: {fmt(p.value)}</title></rect>')
            if i % every == 0:
                svg.append(f'<text x="{_n(left + i * slot + slot / 2)}" y="{height - 5}" '
                           f'text-anchor="middle">{escape(_short(p.label, 8))}</text>')
    svg.append("</svg>")
    return _figure(chart_id, title, svg, _data_table(chart_id, title, points, label_head, unit),
                   note)


def bar_chart(
    chart_id: str,
    title: str,
    points: Sequence[Point],
    *,
    unit: str = "",
    label_head: str = "",
    note: str = "",
    width: int = 480,
) -> Markup:
    """Horizontal bars, one labelled row per point (a count per category)."""
    row, label_w, value_w, pad = 18, 140, 56, 6
    plot_w = width - label_w - value_w
    height = max(1, len(points)) * row + 2 * pad
    top = nice_max(max((p.value for p in points), default=0.0))
    svg = _svg_open(chart_id, width, height, title, _summary(points, unit))
    svg.append(f'<line class="axis" x1="{label_w}" y1="{pad - 2}" x2="{label_w}" '
               f'y2="{height - pad + 2}"/>')
    if not points:
        svg.append(f'<text x="{label_w + 6}" y="{pad + 12}">No data</text>')
    lengths = heights([p.value for p in points], plot_w, top)
    for i, (p, length) in enumerate(zip(points, lengths, strict=True)):
        y = pad + i * row
        svg.append(f'<text x="{label_w - 4}" y="{y + 12}" text-anchor="end">'
                   f'{escape(_short(p.label, 22))}</text>')
        if length > 0:
            css = "bar bad" if p.bad else "bar"
            svg.append(f'<rect class="{css}" x="{label_w}" y="{y + 2}" width="{_n(length)}" '
                       f'height="{row - 4}"><title>{escape(p.name)}: {fmt(p.value)}</title>'
                       "</rect>")
        svg.append(f'<text x="{_n(label_w + length + 4)}" y="{y + 12}">{fmt(p.value)}</text>')
    svg.append("</svg>")
    return _figure(chart_id, title, svg,
                   _data_table(chart_id, title, points, label_head or "Item", unit), note)


def sparkline(label: str, values: Sequence[float], *, width: int = 96, height: int = 20,
              bad: bool = False) -> Markup:
    """A tiny column chart for a table cell: no axes, no table (the row holds the numbers);
    its ``aria-label`` says the total and the highest value."""
    total = sum(v for v in values if v > 0)
    peak = max(values, default=0.0)
    text = f"{label}: {len(values)} values, total {fmt(total)}, highest {fmt(max(peak, 0.0))}"
    parts = [f'<svg xmlns="{_XMLNS}" class="chart spark" role="img" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" aria-label="{escape(text)}">',
             f"<title>{escape(text)}</title>"]
    if values:
        slot = width / len(values)
        bar_w = max(0.5, slot * 0.8)
        for i, h in enumerate(heights(list(values), height - 1)):
            if h > 0:
                css = "bar bad" if bad else "bar"
                parts.append(f'<rect class="{css}" x="{_n(i * slot + (slot - bar_w) / 2)}" '
                             f'y="{_n(height - h)}" width="{_n(bar_w)}" height="{_n(h)}"/>')
    parts.append(f'<line class="axis" x1="0" y1="{height - 0.5}" x2="{width}" '
                 f'y2="{height - 0.5}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - the only text is escaped


# ------------------------------------------------------------------------------ time buckets


def bucket_key(dialect: str, column: Any, unit: Unit) -> Any:
    """A SQL expression: the UTC minute or hour of ``column`` as text (``2025-03-04 09:05`` or
    ``2025-03-04 09``), for ``GROUP BY``; ``dialect`` is the connection's dialect name."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), _PG_FORMAT[unit])
    return func.strftime(_PY_FORMAT[unit], column)  # SQLite stores UTC text


def _floor(moment: datetime, unit: Unit) -> datetime:
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    return moment.replace(minute=0) if unit == "hour" else moment


def bucket_starts(now: datetime, unit: Unit, count: int) -> list[datetime]:
    """The ``count`` buckets (their UTC starts, oldest first) ending with the one ``now`` is
    in (which is still filling)."""
    last = _floor(now, unit)
    return [last - _STEP[unit] * (count - 1 - i) for i in range(count)]


def bucket_label(start: datetime, unit: Unit) -> str:
    """A bucket's short label: ``09:05`` or ``09:00``."""
    return start.strftime("%H:%M")


def series(counts: Mapping[str, float], starts: Sequence[datetime], unit: Unit, *,
           bad: bool = False) -> list[Point]:
    """``counts`` (by :func:`bucket_key` text) on ``starts``; a bucket with no row is 0."""
    out = []
    for start in starts:
        key = start.strftime(_PY_FORMAT[unit])
        title = start.strftime("%Y-%m-%d %H:%M") + " UTC"
        out.append(Point(bucket_label(start, unit), float(counts.get(key, 0)), bad, title))
    return out
