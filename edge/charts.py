"""Bar charts drawn on the server as SVG (no script, no CDN, no inline style: the template
`admin/portal/bar_chart.html` draws the shapes computed here, and the stylesheet colours them by class).

Each chart is the weeks of a period on the x axis and one measure on the y axis, with a rounded
scale, its gridlines and a tooltip (an SVG <title>) on each bar. Stacked series share a bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 12, 30


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # the class that colours its bars (see environments/metrics.css)
    values: Sequence[float | None]


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    tooltip: str


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class Label:
    x: float
    text: str


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    description: str
    bars: list[Bar]
    ticks: list[Tick]
    labels: list[Label]
    legend: list[Series]
    empty: bool
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def middle(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2


def nice_ceiling(value: float) -> tuple[float, float]:
    """A round top for the scale and its step (1, 2 or 5 times a power of ten), about four steps."""
    if value <= 0:
        return 1.0, 0.25
    raw = value / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return step * math.ceil(value / step - 1e-9), step


def bar_chart(*, key: str, title: str, description: str, labels: Sequence[str], series: Sequence[Series],
              text: Callable[[float], str], maximum: float | None = None) -> Chart:
    """Bars per label (stacked when there are several series); `text` writes a value for the axis and
    the tooltips; `maximum` fixes the top of the scale (e.g. 1 for a rate)."""
    totals = [sum(s.values[i] or 0 for s in series) for i in range(len(labels))]
    present = any(v is not None for s in series for v in s.values)
    top, step = (maximum, maximum / 4) if maximum else nice_ceiling(max(totals, default=0))
    plot_height, plot_width = HEIGHT - BOTTOM - TOP, WIDTH - RIGHT - LEFT
    slot = plot_width / max(len(labels), 1)
    bar_width = max(slot * 0.7, 1.0)
    bars, label_marks = [], []
    # keep the labels readable: thirteen of a week's (W49) fit under a chart, six of a year's week (2025-W49)
    fit = 52 // max(4, max((len(label) for label in labels), default=0))
    every = max(1, math.ceil(len(labels) / fit))
    for i, label in enumerate(labels):
        x = LEFT + i * slot + (slot - bar_width) / 2
        base = float(HEIGHT - BOTTOM)
        for s in series:
            value = s.values[i]
            if value is None or value <= 0:
                continue
            height = plot_height * min(value, top) / top
            base -= height
            bars.append(Bar(round(x, 1), round(base, 1), round(bar_width, 1), round(height, 1), s.css,
                            f"{label}: {text(value)}" + (f" {s.name}" if len(series) > 1 else "")))
        if i % every == 0:
            label_marks.append(Label(round(x + bar_width / 2, 1), label))
    ticks, n = [], round(top / step)
    for k in range(n + 1):
        value = step * k
        ticks.append(Tick(round(HEIGHT - BOTTOM - plot_height * value / top, 1), text(value)))
    return Chart(key=key, title=title, description=description, bars=bars, ticks=ticks, labels=label_marks,
                 legend=list(series) if len(series) > 1 else [], empty=not present)


# --- writing values ---------------------------------------------------------------------------------

def duration_unit(longest_seconds: float) -> tuple[float, str]:
    """The unit a set of durations reads best in: (seconds per unit, unit)."""
    if longest_seconds < 2 * 3600:
        return 60.0, "min"
    if longest_seconds < 72 * 3600:
        return 3600.0, "h"
    return 86400.0, "d"


def duration_text(seconds: float | None) -> str:
    """A duration as a person reads it: 45 min, 6.5 h, 2.3 d."""
    if seconds is None:
        return "–"
    per, unit = duration_unit(seconds)
    value = seconds / per
    return f"{value:.0f} {unit}" if unit == "min" or value >= 10 else f"{value:.1f} {unit}"


def percent_text(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.0f}%"
