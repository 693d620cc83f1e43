"""`report.html`: the report as one self-contained page — inline CSS and inline SVG plots,
no script, no font, no image or stylesheet fetched from anywhere, so it opens offline, from
an artifact store, or attached to a CI run.

Rendered from the `Report` (and the `Analysis`, when there is one) with the standard library
only, so the engine, the API (`GET /v1/jobs/{id}/report.html`) and the SDK
(`prunery report JOB --open`) all produce the same page.
"""

from __future__ import annotations

from html import escape
from typing import Any, TypeGuard

from prunery.analysis import Analysis
from prunery.html_parts import Raw, bar_chart, figure, line_chart, num, scatter_chart, table
from prunery.report import Report, _fmt_int, summary_rows

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


def _numeric_list(v: Any) -> TypeGuard[list[float]]:
    return (
        isinstance(v, list)
        and len(v) >= 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )


def _method_panels(report: Report) -> list[str]:
    d = report.method_details or {}
    panels: list[str] = []
    curves = d.get("search_curves")
    if isinstance(curves, dict):
        lists = {k: v for k, v in curves.items() if _numeric_list(v)}
        if lists:
            panels.append(
                figure(
                    line_chart(
                        f"{report.method['name']}: search curves",
                        lists,
                        xlabel="search epoch",
                        plot_id="search-curves",
                    ),
                    "What the method optimised while it searched, one point per epoch (values as the method logged them).",
                )
            )
    for key, value in d.items():
        if key in ("recovery_loss_per_epoch",) or not _numeric_list(value):
            continue
        if "histogram" in key:
            labels = [f"{i / len(value):.1f}–{(i + 1) / len(value):.1f}" for i in range(len(value))]
            panels.append(
                figure(
                    bar_chart(key.replace("_", " "), labels, {"count": value}, plot_id=key),
                    f"{key}: counts per bin of [0, 1].",
                )
            )
        else:
            panels.append(
                figure(
                    line_chart(key.replace("_", " "), {key: value}, xlabel="epoch", plot_id=key),
                    f"method_details.{key}",
                )
            )
    rob = report.robustness
    if (
        isinstance(rob, dict)
        and isinstance(rob.get("original"), dict)
        and isinstance(rob.get("pruned"), dict)
    ):
        keys = [
            k
            for k, v in rob["original"].items()
            if isinstance(v, (int, float)) and k in rob["pruned"]
        ]
        if keys:
            panels.append(
                figure(
                    bar_chart(
                        "Robustness: accuracy under attack",
                        keys,
                        {
                            "original": [rob["original"][k] for k in keys],
                            "pruned": [rob["pruned"][k] for k in keys],
                        },
                        plot_id="robustness",
                    ),
                    f"{rob.get('measured_with', '')}; {rob.get('samples', '?')} samples.",
                )
            )
    dyn = report.dynamic
    if isinstance(dyn, dict) and dyn.get("macs_mean") is not None:
        labels, values = [], []
        for k, label in (
            ("macs_before", "original"),
            ("macs_static", "static graph"),
            ("macs_max", "per-sample max"),
            ("macs_mean", "per-sample mean"),
            ("macs_min", "per-sample min"),
        ):
            if isinstance(dyn.get(k), (int, float)):
                labels.append(label)
                values.append(float(dyn[k]))
        hist = dyn.get("histogram") or dyn.get("macs_histogram")
        panels.append(
            figure(
                bar_chart(
                    "Dynamic model: MACs per sample",
                    labels,
                    {"MACs": values},
                    plot_id="dynamic-macs",
                ),
                f"{dyn.get('measured_on', '')} ({dyn.get('samples', '?')} samples; std {num(float(dyn.get('macs_std', 0)))}).",
            )
        )
        if _numeric_list(hist):
            panels.append(
                figure(
                    bar_chart(
                        "Per-sample MACs histogram",
                        [str(i) for i in range(len(hist))],
                        {"samples": hist},
                        plot_id="dynamic-hist",
                    ),
                    "samples per MACs bin",
                )
            )
    return panels


def _head(report: Report, title: str | None) -> list[str]:
    t = report.target
    what = {"params": "parameters", "flops": "MACs"}.get(t.kind, "channels per layer list")
    head = title or f"Prunery report — {report.method.get('name')}"
    return [
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
        table(["metric", "before", "after", "change"], summary_rows(report), numeric=(1, 2, 3)),
    ]


def _gates(report: Report) -> list[str]:
    if not report.gates:
        return []
    rows = [
        (
            g.name,
            g.limit,
            f"{g.value:.3f}",
            Raw(
                f'<span class="{"pass" if g.passed else "fail"}">{"pass" if g.passed else "FAIL"}</span>'
            ),
        )
        for g in report.gates
    ]
    return ["<h2>Gates</h2>", table(["gate", "limit", "value", "result"], rows, numeric=(1, 2))]


def _layers(report: Report) -> list[str]:
    parts = ["<h2>Layers</h2>"]
    if not report.layers:
        return parts
    labels = [r.display_name for r in report.layers]
    channels = {
        "before": [float(r.channels_before) for r in report.layers],
        "after": [float(r.channels_after) for r in report.layers],
    }
    macs = {
        "before": [float(r.macs_before) for r in report.layers],
        "after": [float(r.macs_after) for r in report.layers],
    }
    parts.append(
        figure(
            bar_chart(
                "Channels per layer: before → after", labels, channels, plot_id="layer-channels"
            ),
            "Output channels (or features) of every Conv/Linear layer of the original model and of the pruned model.",
        )
    )
    parts.append(
        figure(
            bar_chart("MACs per layer: before → after", labels, macs, plot_id="layer-macs"),
            "Multiply-accumulates per sample of each layer, counted on the torch modules (totals are counted on the ONNX graphs).",
        )
    )
    shares = layer_shares(report)
    if shares is not None:
        parts.append(
            figure(
                bar_chart(
                    "Share per layer: MACs and measured latency, before → after",
                    labels,
                    shares,
                    unit="%",
                    plot_id="layer-latency-share",
                ),
                "Each layer's share of the original model's Conv/Linear MACs and of its summed one-op "
                "latency (each layer timed alone in onnxruntime, batch 1), before and after pruning; "
                "both after-bars are shares of the original's totals, so they show what is left.",
            )
        )
    total = max(report.macs.before, 1)
    lat_total = sum(r.latency_before_us or 0.0 for r in report.layers)
    rows = []
    for r in report.layers:
        row: list[Any] = [
            r.display_name,
            r.op,
            f"{r.channels_before} → {r.channels_after}",
            _fmt_int(r.macs_before),
            _fmt_int(r.macs_after),
            f"{r.macs_before / total:.1%}",
        ]
        if lat_total > 0:
            row.append(_latency_cell(r.latency_before_us, r.latency_after_us, lat_total))
        if r.source and r.source != r.name:
            row[0] = Raw(f"{escape(r.source)}<br><code>{escape(r.name)}</code>")
        rows.append(row)
    head = ["layer", "op", "channels", "MACs before", "MACs after", "share of MACs before"]
    if lat_total > 0:
        head.append("share of latency before → after")
    parts.append(table(head, rows, numeric=(3, 4, 5, 6)))
    return parts


def layer_shares(report: Report) -> dict[str, list[float]] | None:
    """Percent of the original's per-layer MACs and summed one-op latency, before and after,
    per layer (None when the layers were not timed)."""
    lat_total = sum(r.latency_before_us or 0.0 for r in report.layers)
    if lat_total <= 0:
        return None
    macs_total = sum(r.macs_before for r in report.layers) or 1
    return {
        "MACs before": [100 * r.macs_before / macs_total for r in report.layers],
        "MACs after": [100 * r.macs_after / macs_total for r in report.layers],
        "latency before": [100 * (r.latency_before_us or 0.0) / lat_total for r in report.layers],
        "latency after": [100 * (r.latency_after_us or 0.0) / lat_total for r in report.layers],
    }


def _latency_cell(before: float | None, after: float | None, total: float) -> str:
    if before is None or after is None:
        return "not timed"
    return f"{before / total:.1%} → {after / total:.1%} ({before:.1f} → {after:.1f} µs)"


def _excluded_and_recovery(report: Report) -> list[str]:
    parts = ["<h2>Excluded from pruning</h2>"]
    if report.excluded:
        rows: list[tuple[Any, str]] = [
            (
                Raw(f"{escape(e.source)}<br><code>{escape(e.name)}</code>")
                if e.source and e.source != e.name
                else e.name,
                e.reason,
            )
            for e in report.excluded
        ]
        parts.append(table(["layer", "reason"], rows))
    else:
        parts.append("<p>None: every Conv/Linear group could be pruned.</p>")
    curve = (report.method_details or {}).get("recovery_loss_per_epoch") or []
    rec = report.recovery
    parts.append("<h2>Recovery</h2>")
    choice = rec.get("lr_choice") or {}
    lr = rec.get("lr_used", rec.get("lr"))
    parts.append(
        f"<p>{escape(str(rec.get('mode_used')))} for {escape(str(rec.get('epochs_used')))} epochs "
        f"(lr {escape(str(lr))}{' chosen on validation' if choice else ''}, "
        f"batch {escape(str(rec.get('batch_size_used', rec.get('batch_size'))))}).</p>"
    )
    if choice.get("table"):
        parts.append(
            f"<p>Learning rates tried, each for {escape(str(choice.get('screen_epochs')))} epoch(s) on "
            f"the training split minus {escape(str(choice.get('validation_samples')))} held-out "
            f"samples ({escape(str(choice.get('metric')))}):</p>"
        )
        parts.append(
            table(
                ["learning rate", "validation", "seconds"],
                [
                    (r.get("lr"), r.get("val_accuracy", r.get("error", "")), r.get("seconds"))
                    for r in choice["table"]
                ],
                numeric=(1, 2),
            )
        )
    if curve:
        parts.append(
            figure(
                line_chart(
                    "Recovery: training loss per epoch",
                    {"loss": curve},
                    xlabel="epoch",
                    ylabel="loss",
                    plot_id="recovery-curve",
                ),
                "Mean training loss of each recovery epoch.",
            )
        )
    return parts


def _analysis(analysis: Analysis | None) -> list[str]:
    if analysis is None or not analysis.groups:
        return []
    shares = {
        "MACs share %": [100 * g.macs_share for g in analysis.groups],
        "params share %": [100 * g.params_share for g in analysis.groups],
    }
    return [
        "<h2>Analysis</h2>",
        f"<p>{len(analysis.groups)} prunable groups, {len(analysis.excluded)} excluded; smallest reachable: "
        f"{analysis.min_macs_fraction:.3f} of the MACs, {analysis.min_params_fraction:.3f} of the parameters.</p>",
        figure(
            bar_chart(
                "Share of the model's MACs per prunable group",
                [g.name for g in analysis.groups],
                shares,
                plot_id="analysis-shares",
            ),
            "Layers each group touches (its outputs and the inputs of its consumers); groups overlap.",
        ),
    ]


def _sweep(report: Report) -> list[str]:
    """Budget sweeps: accuracy against MACs kept, Pareto-optimal points filled, the table."""
    if not report.sweep:
        return []
    points = [p for p in report.sweep if p.accuracy is not None]
    parts = ["<h2>Budget sweep</h2>"]
    if points:
        parts.append(
            figure(
                scatter_chart(
                    "Accuracy vs MACs kept, one point per budget",
                    [(p.macs_ratio, 100 * (p.accuracy or 0.0), p.label, p.pareto) for p in points],
                    xlabel="MACs kept (fraction of the original)",
                    ylabel="top-1 accuracy (%)",
                    plot_id="sweep-pareto",
                ),
                "Each budget's pruned model, measured like a single job's. Filled points are "
                "Pareto-optimal: no other point has at least their accuracy with at most their MACs "
                "and at least their speedup at every batch size.",
            )
        )
    batches = sorted({b for p in report.sweep for b in p.speedup})
    rows = []
    for p in report.sweep:
        rows.append(
            [
                p.label + (" (selected)" if p.selected else ""),
                f"{p.macs_ratio:.3f}",
                f"{p.params_ratio:.3f}",
                "-" if p.accuracy is None else f"{p.accuracy:.4f}",
                "-" if p.accuracy_drop is None else f"{p.accuracy_drop:.2f}",
                *(f"{p.speedup[b]:.2f}x" if b in p.speedup else "-" for b in batches),
                "yes" if p.pareto else "",
                "pass"
                if p.gates_passed
                else Raw(
                    f'<span class="fail">{escape(", ".join(p.failed_gates) or "fail")}</span>'
                ),
            ]
        )
    head = [
        "point",
        "MACs kept",
        "params kept",
        "top-1",
        "drop (pts)",
        *(f"speedup b{b}" for b in batches),
        "Pareto",
        "gates",
    ]
    parts.append(table(head, rows, numeric=tuple(range(1, 5 + len(batches)))))
    return parts


def _run(report: Report) -> list[str]:
    rows: list[tuple[str, Any]] = [
        ("stage seconds", ", ".join(f"{k} {v:.1f}" for k, v in report.stage_seconds.items())),
        (
            "parity",
            f"max abs diff {report.parity.get('max_abs_diff', 0):.2e}, rel {report.parity.get('max_rel_diff', 0):.2e}",
        ),
        ("seed", report.seed),
        ("model sha256", report.model_sha256),
        ("spec hash", report.spec_hash),
        ("device", report.device),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items()))),
        ("report schema", report.schema_version),
    ]
    return ["<h2>Run</h2>", table(["", ""], rows)]


def render_html(report: Report, analysis: Analysis | None = None, title: str | None = None) -> str:
    """The whole page as one string."""
    parts = [*_head(report, title), *_gates(report), *_sweep(report), *_layers(report)]
    parts += _excluded_and_recovery(report)
    panels = _method_panels(report)
    if panels:
        parts.append(f"<h2>Method: {escape(str(report.method.get('name')))}</h2>")
        parts.extend(panels)
    parts += _analysis(analysis)
    if report.notes:
        parts.append(
            '<h2>Notes</h2><ul class="notes">'
            + "".join(f"<li>{escape(n)}</li>" for n in report.notes)
            + "</ul>"
        )
    parts += [*_run(report), "</main></body></html>"]
    return "\n".join(parts)
