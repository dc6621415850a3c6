"""Server-rendered SVG bar charts of a usage series: no script, no request elsewhere.

Each bar is a bucket's requests, its errors (4xx and 5xx) drawn over it in another colour;
the chart says its peak and total in words (``role="img"`` with a title and description),
so a screen reader hears what the eye sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

__all__ = ["Bucket", "bar_chart"]

WIDTH, HEIGHT = 1100, 170
_TOP, _BOTTOM, _LEFT = 12, 22, 44


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bar: when it starts, its requests and its errors."""

    start: datetime
    requests: int
    errors: int


def _label(moment: datetime, daily: bool) -> str:
    return moment.strftime("%d %b") if daily else moment.strftime("%H:%M")


def bar_chart(chart_id: str, title: str, buckets: Sequence[Bucket], *, daily: bool) -> str:
    """An ``<svg>`` of ``buckets`` (oldest first), labelled by ``title``."""
    peak = max((b.requests for b in buckets), default=0)
    total = sum(b.requests for b in buckets)
    errors = sum(b.errors for b in buckets)
    scale = max(peak, 1)
    inner_w = WIDTH - _LEFT - 4
    inner_h = HEIGHT - _TOP - _BOTTOM
    step = inner_w / max(len(buckets), 1)
    bar_w = max(step - 1.0, 1.0)
    parts = [
        f'<svg class="chart" id="{chart_id}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" '
        f'data-total="{total}" data-peak="{peak}">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{total} requests, {errors} errors; '
        f"the busiest {'day' if daily else 'minute'} had {peak}.</desc>",
        f'<line class="axis" x1="{_LEFT}" y1="{HEIGHT - _BOTTOM}" x2="{WIDTH - 4}" '
        f'y2="{HEIGHT - _BOTTOM}"/>',
        f'<text class="tick" x="{_LEFT - 6}" y="{_TOP + 8}" text-anchor="end">{peak}</text>',
        f'<text class="tick" x="{_LEFT - 6}" y="{HEIGHT - _BOTTOM}" text-anchor="end">0</text>',
    ]
    for index, bucket in enumerate(buckets):
        x = _LEFT + index * step
        if bucket.requests:
            h = inner_h * bucket.requests / scale
            y = HEIGHT - _BOTTOM - h
            tip = f"{_label(bucket.start, daily)}: {bucket.requests} requests"
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}"><title>{escape(tip)}, {bucket.errors} errors</title></rect>'
            )
            if bucket.errors:
                eh = inner_h * min(bucket.errors, bucket.requests) / scale
                parts.append(
                    f'<rect class="bar-error" x="{x:.1f}" y="{HEIGHT - _BOTTOM - eh:.1f}" '
                    f'width="{bar_w:.1f}" height="{eh:.1f}"/>'
                )
    if buckets:
        marks = (0, len(buckets) // 2, len(buckets) - 1)
        for index in dict.fromkeys(marks):
            x = _LEFT + index * step + bar_w / 2
            anchor = "start" if index == 0 else "end" if index == marks[-1] else "middle"
            parts.append(
                f'<text class="tick" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">'
                f"{escape(_label(buckets[index].start, daily))}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)
