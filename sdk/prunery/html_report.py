"""`report.html`: the report as one self-contained page — inline CSS and inline SVG plots,
no script, no font, no image or stylesheet fetched from anywhere, so it opens offline, from
an artifact store, or attached to a CI run.

Rendered from the `Report` (and the `Analysis`, when there is one) with the standard library
only, so the engine, the API (`GET /v1/jobs/{id}/report.html`) and the SDK
(`prunery report JOB --open`) all produce the same page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from prunery.analysis import Analysis
from prunery.report import Report, _fmt_int, summary_rows

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.sub{color:#5a6570;margin:0 0 16px}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;min-width:50%}
th,td{padding:4px 10px;border-bottom:1px solid #e5e8ec;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1b7f3b;font-weight:600}.fail{color:#b42318;font-weight:600}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px;margin:10px 0}
figure{margin:0}figcaption{color:#5a6570;font-size:12px;margin-top:4px}
svg.plot{display:block;width:100%;height:auto;background:#fff}
svg text{font:11px system-ui,sans-serif;fill:#1d232a}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
ul.notes li{margin:2px 0}
"""


# ------------------------------------------------------------------ SVG primitives


def _num(v: float) -> str:
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
    for i, name in enumerate(series):
        xx = x + i * 170
        parts.append(
            f'<rect x="{xx:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{xx + 14:.1f}" y="{y:.1f}">{escape(name)}</text>'
        )
    return "".join(parts)


def bar_chart(
    title: str, labels: Sequence[str], series: dict[str, Sequence[float]], *, unit: str = "", plot_id: str = ""
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
        f'<svg class="plot" data-plot="{escape(plot_id or title)}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="16" style="font-weight:600;font-size:13px">{escape(title)}</text>',
        _legend(names, label_w, 32),
    ]
    bottom = top + row_h * len(labels)
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e5e8ec"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{_num(t)}{escape(unit)}</text>')
    for r, label in enumerate(labels):
        y0 = top + r * row_h + 4
        out.append(f'<text x="{label_w - 6:.1f}" y="{y0 + row_h / 2:.1f}" text-anchor="end">{escape(label)}</text>')
        for k, name in enumerate(names):
            v = float(series[name][r])
            y = y0 + k * 9
            w = max(sx(v) - label_w, 0.0)
            out.append(
                f'<rect x="{label_w:.1f}" y="{y:.1f}" width="{w:.1f}" height="8" fill="{PALETTE[k % len(PALETTE)]}">'
                f"<title>{escape(label)} {escape(name)}: {_num(v)}{escape(unit)}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def line_chart(
    title: str, series: dict[str, Sequence[float]], *, xlabel: str = "", ylabel: str = "",
    hline: float | None = None, plot_id: str = "",
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
        f'<svg class="plot" data-plot="{escape(plot_id or title)}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="16" style="font-weight:600;font-size:13px">{escape(title)}</text>',
        _legend(list(series), left, 32),
    ]
    for t in ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e5e8ec"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(t)}</text>')
    for i in sorted({0, n - 1, *range(0, n, max(1, n // 8))}):
        out.append(f'<text x="{sx(i):.1f}" y="{top + ph + 16}" text-anchor="middle">{i + 1}</text>')
    if xlabel:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{top + ph / 2:.1f}" transform="rotate(-90 12 {top + ph / 2:.1f})" text-anchor="middle">{escape(ylabel)}</text>')
    if hline is not None:
        out.append(f'<line x1="{left}" y1="{sy(hline):.1f}" x2="{width - right}" y2="{sy(hline):.1f}" stroke="#888" stroke-dasharray="5,4"/>')
    for k, (name, vals) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(vals) if math.isfinite(v))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        for i, v in enumerate(vals):
            if math.isfinite(v) and len(vals) <= 60:
                out.append(f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{color}"><title>{escape(name)} {i + 1}: {_num(v)}</title></circle>')
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------ page sections


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    th = "".join(f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>" for i, h in enumerate(head))
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            text = c if isinstance(c, _Raw) else escape(str(c))
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _figure(svg: str, caption: str) -> str:
    return f'<div class="card"><figure>{svg}<figcaption>{escape(caption)}</figcaption></figure></div>'


def _numeric_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) >= 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _method_panels(report: Report) -> list[str]:
    d = report.method_details or {}
    panels: list[str] = []
    curves = d.get("search_curves")
    if isinstance(curves, dict):
        lists = {k: v for k, v in curves.items() if _numeric_list(v)}
        if lists:
            panels.append(_figure(
                line_chart(f"{report.method['name']}: search curves", lists, xlabel="search epoch", plot_id="search-curves"),
                "What the method optimised while it searched, one point per epoch (values as the method logged them).",
            ))
    for key, value in d.items():
        if key in ("recovery_loss_per_epoch",) or not _numeric_list(value):
            continue
        if "histogram" in key:
            labels = [f"{i / len(value):.1f}–{(i + 1) / len(value):.1f}" for i in range(len(value))]
            panels.append(_figure(bar_chart(key.replace("_", " "), labels, {"count": value}, plot_id=key),
                                  f"{key}: counts per bin of [0, 1]."))
        else:
            panels.append(_figure(line_chart(key.replace("_", " "), {key: value}, xlabel="epoch", plot_id=key),
                                  f"method_details.{key}"))
    rob = report.robustness
    if isinstance(rob, dict) and isinstance(rob.get("original"), dict) and isinstance(rob.get("pruned"), dict):
        keys = [k for k, v in rob["original"].items() if isinstance(v, (int, float)) and k in rob["pruned"]]
        if keys:
            panels.append(_figure(
                bar_chart("Robustness: accuracy under attack", keys,
                          {"original": [rob["original"][k] for k in keys], "pruned": [rob["pruned"][k] for k in keys]},
                          plot_id="robustness"),
                f"{rob.get('measured_with', '')}; {rob.get('samples', '?')} samples.",
            ))
    dyn = report.dynamic
    if isinstance(dyn, dict) and dyn.get("macs_mean") is not None:
        labels, values = [], []
        for k, label in (("macs_before", "original"), ("macs_static", "static graph"), ("macs_max", "per-sample max"),
                         ("macs_mean", "per-sample mean"), ("macs_min", "per-sample min")):
            if isinstance(dyn.get(k), (int, float)):
                labels.append(label)
                values.append(float(dyn[k]))
        hist = dyn.get("histogram") or dyn.get("macs_histogram")
        panels.append(_figure(bar_chart("Dynamic model: MACs per sample", labels, {"MACs": values}, plot_id="dynamic-macs"),
                              f"{dyn.get('measured_on', '')} ({dyn.get('samples', '?')} samples; std {_num(float(dyn.get('macs_std', 0)))})."))
        if _numeric_list(hist):
            panels.append(_figure(bar_chart("Per-sample MACs histogram", [str(i) for i in range(len(hist))], {"samples": hist},
                                            plot_id="dynamic-hist"), "samples per MACs bin"))
    return panels


def render_html(report: Report, analysis: Analysis | None = None, title: str | None = None) -> str:
    """The whole page as one string."""
    t = report.target
    what = {"params": "parameters", "flops": "MACs"}.get(t.kind, "channels per layer list")
    head = title or f"Prunery report — {report.method.get('name')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may load from elsewhere: the policy makes the browser refuse it if it tried.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{escape(head)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{escape(head)}</h1>",
        f'<p class="sub">{escape(report.method.get("paper", ""))}</p>',
        f"<p>Target: keep <b>{t.requested}</b> of the {what}; achieved <b>{t.achieved:.4f}</b> "
        f'(<span class="{"pass" if t.met else "fail"}">{"met" if t.met else "NOT met"}</span>, tolerance {t.tolerance}; {escape(t.measured_on)}).</p>',
        "<h2>Summary</h2>",
        _table(["metric", "before", "after", "change"], summary_rows(report), numeric=(1, 2, 3)),
    ]
    if report.gates:
        parts.append("<h2>Gates</h2>")
        parts.append(_table(["gate", "limit", "value", "result"], [
            (g.name, g.limit, f"{g.value:.3f}", _Raw(f'<span class="{"pass" if g.passed else "fail"}">{"pass" if g.passed else "FAIL"}</span>'))
            for g in report.gates
        ], numeric=(1, 2)))

    parts.append("<h2>Layers</h2>")
    if report.layers:
        labels = [r.name for r in report.layers]
        parts.append(_figure(
            bar_chart("Channels per layer: before → after", labels,
                      {"before": [r.channels_before for r in report.layers], "after": [r.channels_after for r in report.layers]},
                      plot_id="layer-channels"),
            "Output channels (or features) of every Conv/Linear layer of the original model and of the pruned model.",
        ))
        parts.append(_figure(
            bar_chart("MACs per layer: before → after", labels,
                      {"before": [r.macs_before for r in report.layers], "after": [r.macs_after for r in report.layers]},
                      plot_id="layer-macs"),
            "Multiply-accumulates per sample of each layer, counted on the torch modules (totals are counted on the ONNX graphs). "
            "Latency is measured for the whole model (see the summary), not per layer.",
        ))
        total = max(report.macs.before, 1)
        parts.append(_table(
            ["layer", "op", "channels", "MACs before", "MACs after", "share of MACs before"],
            [(r.name, r.op, f"{r.channels_before} → {r.channels_after}", _fmt_int(r.macs_before), _fmt_int(r.macs_after),
              f"{r.macs_before / total:.1%}") for r in report.layers],
            numeric=(3, 4, 5),
        ))
    parts.append("<h2>Excluded from pruning</h2>")
    if report.excluded:
        parts.append(_table(["layer", "reason"], [(e.name, e.reason) for e in report.excluded]))
    else:
        parts.append("<p>None: every Conv/Linear group could be pruned.</p>")

    curve = (report.method_details or {}).get("recovery_loss_per_epoch") or []
    parts.append("<h2>Recovery</h2>")
    rec = report.recovery
    parts.append(f"<p>{escape(str(rec.get('mode_used')))} for {escape(str(rec.get('epochs_used')))} epochs "
                 f"(lr {escape(str(rec.get('lr')))}, batch {escape(str(rec.get('batch_size')))}).</p>")
    if curve:
        parts.append(_figure(line_chart("Recovery: training loss per epoch", {"loss": curve}, xlabel="epoch",
                                        ylabel="loss", plot_id="recovery-curve"),
                             "Mean training loss of each recovery epoch."))
    panels = _method_panels(report)
    if panels:
        parts.append(f"<h2>Method: {escape(str(report.method.get('name')))}</h2>")
        parts.extend(panels)
    if analysis is not None and analysis.groups:
        parts.append("<h2>Analysis</h2>")
        parts.append(f"<p>{len(analysis.groups)} prunable groups, {len(analysis.excluded)} excluded; smallest reachable: "
                     f"{analysis.min_macs_fraction:.3f} of the MACs, {analysis.min_params_fraction:.3f} of the parameters.</p>")
        parts.append(_figure(
            bar_chart("Share of the model's MACs per prunable group", [g.name for g in analysis.groups],
                      {"MACs share %": [100 * g.macs_share for g in analysis.groups],
                       "params share %": [100 * g.params_share for g in analysis.groups]}, plot_id="analysis-shares"),
            "Layers each group touches (its outputs and the inputs of its consumers); groups overlap.",
        ))
    if report.notes:
        parts.append("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Run</h2>")
    parts.append(_table(["", ""], [
        ("stage seconds", ", ".join(f"{k} {v:.1f}" for k, v in report.stage_seconds.items())),
        ("parity", f"max abs diff {report.parity.get('max_abs_diff', 0):.2e}, rel {report.parity.get('max_rel_diff', 0):.2e}"),
        ("seed", report.seed),
        ("model sha256", report.model_sha256),
        ("spec hash", report.spec_hash),
        ("device", report.device),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items()))),
        ("report schema", report.schema_version),
    ]))
    parts.append("</main></body></html>")
    return "\n".join(parts)
