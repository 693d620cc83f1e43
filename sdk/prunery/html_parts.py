"""The building blocks of `report.html`: inline SVG bar and line charts, tables and
figure cards (standard library only; every text is escaped)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from prunery.report import _fmt_int

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac")


# ------------------------------------------------------------------ SVG primitives


def num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e3:
        return _fmt_int(v)
    if a >= 10:
        return f"{v:.0f}"
    if a >= 0.1:
        return f"{v:.2f}"
    return f"{v:.2g}"


def _tick(v: float) -> str:
    """An axis label: round ticks without trailing zeros (5, 2.5, 0.25)."""
    return f"{v:g}" if abs(v) < 1e3 else num(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    out, t = [], start
    while t <= hi + step * 1e-9:
        out.append(round(t, 12))
        t += step
    if out[-1] < hi - step * 1e-9:  # the axis must reach the largest value
        out.append(round(t, 12))
    return out


def _legend(series: Sequence[str], x: float, y: float) -> str:
    parts = []
    xx = x
    for i, name in enumerate(series):
        parts.append(
            f'<rect x="{xx:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{xx + 14:.1f}" y="{y:.1f}">{escape(name)}</text>'
        )
        xx += max(170.0, 34 + 6.4 * len(name)) if len(series) <= 3 else 34 + 6.4 * len(name)
    return "".join(parts)


def _open(title: str, plot_id: str, width: int, height: float) -> list[str]:
    """An SVG plot's opening tag, accessible title and visible heading."""
    return [
        f'<svg class="plot" data-plot="{escape(plot_id or title)}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="16" style="font-weight:600;font-size:13px">{escape(title)}</text>',
    ]


def _axis_labels(xlabel: str, ylabel: str, x_mid: float, y_mid: float, height: float) -> list[str]:
    """The x label under the plot, the y label rotated along its left edge."""
    out = []
    if xlabel:
        out.append(
            f'<text x="{x_mid:.1f}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>'
        )
    if ylabel:
        out.append(
            f'<text x="12" y="{y_mid:.1f}" transform="rotate(-90 12 {y_mid:.1f})" text-anchor="middle">{escape(ylabel)}</text>'
        )
    return out


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    unit: str = "",
    plot_id: str = "",
) -> str:
    """Horizontal grouped bars: one row per label, one bar per series."""
    names = list(series)
    row_h = 8 + 9 * len(names)
    label_w = min(330, 12 + 6.2 * max((len(s) for s in labels), default=4))
    width, top = 900, 40
    height = top + row_h * len(labels) + 34
    vmax = max((v for vals in series.values() for v in vals), default=1.0) or 1.0
    ticks = _ticks(0.0, vmax)
    vmax = ticks[-1]
    plot_w = width - label_w - 30

    def sx(v: float) -> float:
        return label_w + plot_w * v / vmax

    out = [
        *_open(title, plot_id, width, height),
        _legend(names, label_w, 32),
    ]
    bottom = top + row_h * len(labels)
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e5e8ec"/>')
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{_tick(t)}{escape(unit)}</text>'
        )
    for r, label in enumerate(labels):
        y0 = top + r * row_h + 4
        out.append(
            f'<text x="{label_w - 6:.1f}" y="{y0 + row_h / 2:.1f}" text-anchor="end">{escape(label)}</text>'
        )
        for k, name in enumerate(names):
            v = float(series[name][r])
            y = y0 + k * 9
            w = max(sx(v) - label_w, 0.0)
            out.append(
                f'<rect x="{label_w:.1f}" y="{y:.1f}" width="{w:.1f}" height="8" fill="{PALETTE[k % len(PALETTE)]}">'
                f"<title>{escape(label)} {escape(name)}: {num(v)}{escape(unit)}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def line_chart(
    title: str,
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    hline: float | None = None,
    plot_id: str = "",
) -> str:
    """Lines over their index (epochs, search steps); a dashed horizontal reference when given."""
    series = {k: [float(v) for v in vals] for k, vals in series.items() if len(vals)}
    width, height, left, right, top, bottom = 900, 300, 64, 16, 40, 44
    values = [v for vals in series.values() for v in vals if math.isfinite(v)]
    if hline is not None:
        values.append(hline)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    ticks = _ticks(lo, hi)
    lo, hi = min(ticks[0], lo), max(ticks[-1], hi)
    n = max((len(v) for v in series.values()), default=1)
    pw, ph = width - left - right, height - top - bottom

    def sx(i: float) -> float:
        return left + (pw * i / (n - 1) if n > 1 else pw / 2)

    def sy(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    out = [
        *_open(title, plot_id, width, height),
        _legend(list(series), left, 32),
    ]
    for t in ticks:
        y = sy(t)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e5e8ec"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{num(t)}</text>')
    for i in sorted({0, n - 1, *range(0, n, max(1, n // 8))}):
        out.append(f'<text x="{sx(i):.1f}" y="{top + ph + 16}" text-anchor="middle">{i + 1}</text>')
    out += _axis_labels(xlabel, ylabel, left + pw / 2, top + ph / 2, height)
    if hline is not None:
        out.append(
            f'<line x1="{left}" y1="{sy(hline):.1f}" x2="{width - right}" y2="{sy(hline):.1f}" stroke="#888" stroke-dasharray="5,4"/>'
        )
    for k, (name, vals) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(vals) if math.isfinite(v))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        for i, v in enumerate(vals):
            if math.isfinite(v) and len(vals) <= 60:
                out.append(
                    f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{color}"><title>{escape(name)} {i + 1}: {num(v)}</title></circle>'
                )
    out.append("</svg>")
    return "".join(out)


def scatter_chart(
    title: str,
    points: Sequence[tuple[float, float, str, bool]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    plot_id: str = "",
) -> str:
    """Labelled points (x, y, label, highlighted); highlighted points (e.g. Pareto-optimal)
    are filled and joined in x order, the others hollow."""
    pts = [(float(x), float(y), lab, hl) for x, y, lab, hl in points]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    width, height, left, right, top, bottom = 900, 320, 64, 24, 40, 44
    xs = [p[0] for p in pts] or [0.0, 1.0]
    ys = [p[1] for p in pts] or [0.0, 1.0]
    xt, yt = _ticks(min(0.0, min(xs)), max(xs)), _ticks(min(ys), max(ys))
    x_lo, x_hi, y_lo, y_hi = xt[0], xt[-1], yt[0], yt[-1]
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pw, ph = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + pw * (v - x_lo) / ((x_hi - x_lo) or 1.0)

    def sy(v: float) -> float:
        return top + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [
        *_open(title, plot_id, width, height),
    ]
    for t in yt:
        y = sy(t)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e5e8ec"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick(t)}</text>'
        )
    for t in xt:
        out.append(
            f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_tick(t)}</text>'
        )
    out += _axis_labels(xlabel, ylabel, left + pw / 2, top + ph / 2, height)
    front = sorted((p for p in pts if p[3]), key=lambda p: p[0])
    if len(front) > 1:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _l, _h in front)
        out.append(
            f'<polyline fill="none" stroke="{PALETTE[0]}" stroke-width="1.5" points="{line}"/>'
        )
    for x, y, lab, hl in pts:
        fill = PALETTE[0] if hl else "#fff"
        out.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{fill}" stroke="{PALETTE[0]}" '
            f'stroke-width="2"><title>{escape(lab)}: {num(x)}, {num(y)}</title></circle>'
            f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 8:.1f}">{escape(lab)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------ page sections


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    th = "".join(
        f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
        for i, h in enumerate(head)
    )
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            text = c if isinstance(c, Raw) else escape(str(c))
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw(str):
    """Already-escaped HTML for a table cell."""


def figure(svg: str, caption: str) -> str:
    return (
        f'<div class="card"><figure>{svg}<figcaption>{escape(caption)}</figcaption></figure></div>'
    )
