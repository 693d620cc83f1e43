"""Uneven cuts made visible: when exclusions force the prunable groups to carry far more
than their share of the budget, say so (report note and CLI line)."""

from __future__ import annotations

import math
from collections.abc import Sequence

NOTE_PREFIX = "uneven cut:"


def uneven_cut_note(
    analysis, layers: Sequence, achieved: float, max_layer_cut: float
) -> str | None:
    """A note when exclusions make the pruned groups lose more than twice the average cut.

    The average cut is what every group would lose if all of them could be pruned alike:
    MACs and parameters scale with the product of a layer's in and out widths, so keeping
    a fraction `achieved` of them takes a cut of about 1 - sqrt(achieved) per group.
    """
    if not analysis.excluded or not analysis.groups or not (0.0 < achieved < 1.0):
        return None
    rows = {r.name: r for r in layers}
    cuts: list[tuple[float, str, int, int]] = []
    for g in analysis.groups:
        row = rows.get(g.name)
        if row is None or not row.channels_before:
            continue
        cuts.append(
            (
                1.0 - row.channels_after / row.channels_before,
                g.name,
                row.channels_before,
                row.channels_after,
            )
        )
    if not cuts:
        return None
    average = 1.0 - math.sqrt(achieved)
    mean_cut = sum(c[0] for c in cuts) / len(cuts)
    if average <= 0 or mean_cut <= 2.0 * average:
        return None
    worst = max(cuts)
    return (
        f"{NOTE_PREFIX} {len(analysis.excluded)} group(s) are excluded, so the {len(cuts)} prunable groups lose "
        f"{mean_cut:.0%} of their channels on average (an even cut would be {average:.0%}), up to "
        f"{worst[0]:.0%} in {worst[1]} ({worst[2]} -> {worst[3]}); export.max_layer_cut "
        f"({max_layer_cut:g}) caps any one group. See the excluded layers for what would make them prunable."
    )
