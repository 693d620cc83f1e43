"""The report as terminal text — the one formatter of `prunery prune` and `prunery submit
--wait` / `prunery wait` / `prunery report`.

Layer names are shown cleaned (`display_name`): the engine names a layer after its module
in the torch graph converted from the ONNX file, and onnx2torch builds that name from the
ONNX node name with `.` turned into `/`; the TorchScript exporter's node names repeat the
container in each scope (`/features/features.0/Conv`), so the engine's name reads
`features/features/0/Conv`. The terminal shows `features/0/Conv`; report.json and report.md
keep the engine's names (those are what `--target-layers` takes).
"""

from __future__ import annotations

import textwrap

from prunery.report import SWEEP_LEGEND, LayerRow, Report, _fmt_int, summary_rows, sweep_rows

DEFAULT_LAYERS = 20
WIDTH = 100


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """The first row is the header; columns in `right` are right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _collapse_once(parts: list[str]) -> list[str] | None:
    """Drop the first run of components repeated right after itself (`a b a b c` -> `a b c`),
    when the run starts with a name (never an index: `seq/0/0` is a real path)."""
    for k in range(1, len(parts) // 2 + 1):
        for i in range(len(parts) - 2 * k + 1):
            if not parts[i].isdigit() and parts[i : i + k] == parts[i + k : i + 2 * k]:
                return parts[:i] + parts[i + k :]
    return None


def display_name(name: str) -> str:
    """A layer name without the exporter's doubled scopes: `features/features/0/Conv` ->
    `features/0/Conv`, `layer1/layer1/0/seq/seq/0/seq/0/0/Conv` -> `layer1/0/seq/0/0/Conv`
    (the TorchScript exporter writes each container scope as `name` then `name.i`; onnx2torch
    turns the dots into slashes). Names without `/` are returned as they are."""
    if "/" not in name:
        return name
    lead = "/" if name.startswith("/") else ""
    parts = [p for p in name.split("/") if p]
    while (shorter := _collapse_once(parts)) is not None:
        parts = shorter
    return lead + "/".join(parts)


def _change(row: LayerRow) -> tuple[int, int]:
    return (row.macs_before - row.macs_after, row.channels_before - row.channels_after)


def _shown_name(row: LayerRow) -> str:
    """The exporter's source module path when known, else the engine name, de-doubled."""
    return row.source or display_name(row.name)


def _layer_cells(row: LayerRow, timed: bool) -> tuple[str, ...]:
    channels = f"{row.channels_before} -> {row.channels_after}"
    macs = f"{_fmt_int(row.macs_before)} -> {_fmt_int(row.macs_after)}"
    cells: tuple[str, ...] = (_shown_name(row), row.op, channels, macs)
    if timed:
        if row.latency_before_us is not None and row.latency_after_us is not None:
            cells += (f"{row.latency_before_us:.1f} -> {row.latency_after_us:.1f}",)
        else:
            cells += ("-",)
    return cells


def format_layers(report: Report, limit: int | None = DEFAULT_LAYERS, more: str = "") -> list[str]:
    """The per-layer table: every layer when `limit` is None, else the `limit` layers whose
    MACs (then channels) changed most, in network order, and a line saying how many more."""
    rows = report.layers
    if not rows or limit == 0:
        return []
    shown = rows
    if limit is not None and len(rows) > limit:
        keep = sorted(range(len(rows)), key=lambda i: _change(rows[i]), reverse=True)[:limit]
        shown = [rows[i] for i in sorted(keep)]
    timed = any(r.latency_before_us is not None for r in shown)
    header: tuple[str, ...] = ("layer", "op", "channels", "MACs")
    if timed:
        header += ("latency µs (batch 1)",)
    title = f"layers ({len(rows)})"
    if len(shown) < len(rows):
        title = (
            f"layers: the {len(shown)} of {len(rows)} with the biggest MAC change, in network order"
        )
    lines = ["", title + ":"]
    lines += [
        "  " + line
        for line in _table([header, *(_layer_cells(r, timed) for r in shown)], {2, 3, 4})
    ]
    if len(shown) < len(rows):
        kept = {id(r) for r in shown}
        hidden = [r for r in rows if id(r) not in kept]
        same = sum(1 for r in hidden if _change(r) == (0, 0))
        what = [f"{same} unchanged"] if same else []
        what += [more] if more else []
        lines.append(
            f"  ... {len(hidden)} more layer{'s' if len(hidden) != 1 else ''}"
            + (f" ({'; '.join(what)})" if what else "")
        )
    if any(_shown_name(r) != r.name for r in shown):
        lines += textwrap.wrap(
            "(layers shown by their source module path where the ONNX file names it, else by a "
            "shortened engine name; report.json has both, and --target-layers takes either)",
            WIDTH,
            initial_indent="  ",
            subsequent_indent="   ",
            break_on_hyphens=False,
        )
    return lines


def format_sweep(report: Report) -> list[str]:
    """A budget sweep's table (one row per point; see `sweep_rows`), or nothing."""
    rows = sweep_rows(report)
    if not rows:
        return []
    right = set(range(1, len(rows[0]) - 1))
    lines = ["", f"budget sweep ({len(rows) - 1} points):"]
    lines += ["  " + line for line in _table(rows, right)]
    lines += textwrap.wrap(
        SWEEP_LEGEND, WIDTH, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
    )
    return lines


def _bullets(items: list[str], first: str = "  - ", rest: str = "    ") -> list[str]:
    return [
        textwrap.fill(
            item, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
        )
        for item in items
    ]


def format_report(
    report: Report,
    layers: int | None = DEFAULT_LAYERS,
    more: str = "the full table is in report.md",
) -> str:
    """Before/after table, the target, the per-layer table (capped at `layers`; None: all),
    excluded layers with their reasons, the notes, gates and device. `more` says where the
    layers left out are (shown after the cap line)."""
    lines = [f"method {report.method.get('name')}", ""]
    lines += _table([("", "before", "after", "change"), *summary_rows(report)], {1, 2, 3})
    t = report.target
    kind = "MACs" if t.kind == "flops" else t.kind
    lines.append(
        f"\ntarget: keep {t.requested} of {kind}; achieved {t.achieved:.4f} "
        f"({'met' if t.met else 'NOT met'})"
    )
    lines += format_sweep(report)
    lines += format_layers(report, layers, more)
    if report.excluded:
        excluded = report.excluded if layers is None else report.excluded[:layers]
        lines += ["", f"excluded from pruning ({len(report.excluded)}):"]
        lines += _bullets([f"{e.source or display_name(e.name)}: {e.reason}" for e in excluded])
        if len(excluded) < len(report.excluded):
            lines.append(
                f"  ... {len(report.excluded) - len(excluded)} more"
                + (f" ({more})" if more else "")
            )
    if report.notes:
        lines += ["", "notes:", *_bullets(report.notes)]
    lines.append("")
    lines += _bullets(
        [
            f"gate {g.name}: {g.value:.3f} vs limit {g.limit} -> {'pass' if g.passed else 'FAIL'}"
            + (f" ({g.message})" if g.message and not g.passed else "")
            for g in report.gates
        ],
        first="",
        rest="  ",
    )
    lines.append(f"device: {report.device}")
    return "\n".join(lines)
