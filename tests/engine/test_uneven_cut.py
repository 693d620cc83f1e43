"""Uneven cuts are visible: exclusions that force the prunable groups to lose more than twice
the even cut produce a report note (and a CLI line); an even prune produces none."""

from __future__ import annotations

from engine.graph import Analysis, ChannelGroup
from engine.uneven import NOTE_PREFIX, uneven_cut_note
from prunery.report import LayerRow


def _rows(widths: dict[str, tuple[int, int]]) -> list[LayerRow]:
    return [
        LayerRow(
            name=n, op="Conv2d", channels_before=b, channels_after=a, macs_before=1, macs_after=1
        )
        for n, (b, a) in widths.items()
    ]


def test_note_when_exclusions_force_deep_cuts():
    analysis = Analysis(
        groups=[ChannelGroup("trunk1", 32), ChannelGroup("trunk2", 64)],
        excluded=[(f"block{i}", "excluded") for i in range(45)],
        lifted=[],
    )
    # 0.5 of the MACs kept: an even cut is ~29%; these groups lost ~64%.
    note = uneven_cut_note(analysis, _rows({"trunk1": (32, 12), "trunk2": (64, 23)}), 0.5, 0.9)
    assert note is not None and note.startswith(NOTE_PREFIX)
    assert "45 group(s) are excluded" in note and "even cut would be 29%" in note
    assert "up to 64% in trunk2 (64 -> 23)" in note and "max_layer_cut (0.9)" in note


def test_no_note_for_an_even_cut():
    analysis = Analysis(
        groups=[ChannelGroup("a", 32), ChannelGroup("b", 64)],
        excluded=[("fc", "outputs")],
        lifted=[],
    )
    assert uneven_cut_note(analysis, _rows({"a": (32, 23), "b": (64, 45)}), 0.5, 0.9) is None
