"""Token-mixing transposes (MLP-Mixer) are channel boundaries, so a Mixer's residual width
prunes; a ConvNeXt-style permute between NCHW and NHWC is left to Torch-Pruning's identity
index map (engine/axis_swap.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import torch
from torch import nn

from engine import graph, load
from engine.axis_swap import AxisSwap
from engine.pipeline import run
from methods import registry
from prunery.spec import JobSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))

import methodkit  # noqa: E402

PATCH = "patch/Conv"  # the Mixer's patch embedding: the residual stream's producer


def test_mixer_token_transposes_become_axis_swaps(zoo_model):
    loaded = load.load(zoo_model("mixer"), (1, 8, 8))
    swaps = [m for m in loaded.module.modules() if isinstance(m, AxisSwap)]
    # two per block (into and out of the token MLP); the patch embedding's transpose moves
    # the conv's channels *to* the last axis and is not one of them
    assert len(swaps) == 4 and all(s.perm == [0, 2, 1] for s in swaps)
    assert (swaps[0].in_width, swaps[0].out_width) == (48, 16)
    assert any("token-mixing transpose" in n for n in loaded.notes)

    x = torch.randn(4, 1, 8, 8)
    analysis = graph.analyse(loaded.module, x[:1], x)
    stream = next(g for g in analysis.groups if PATCH in {m.name for m in g.members})
    names = {m.name for m in stream.members}
    # The group crosses the whole stream (LayerNorms, channel MLPs, the head's input) and
    # stops at the swaps: the token MLPs' Linears act on the token axis.
    assert stream.channels == 48
    assert {"blocks/blocks/0/channel_mlp/channel_mlp/0/Linear", "head/Gemm"} <= names
    assert not any("token_mlp" in n for n in names)
    assert sum("axis_swap" in n for n in names) == 4  # the stream ends at each swap

    pruned = graph.prune_copy(loaded.module, x[:1], {stream.name: [0, 5, 7]})
    assert pruned.get_submodule(PATCH).out_channels == 45
    assert [m.perm for m in pruned.modules() if isinstance(m, AxisSwap)] == [[0, 2, 1]] * 4
    with torch.no_grad():
        assert pruned(x).shape == (4, 10)


def test_mixer_residual_width_is_pruned_end_to_end(zoo_model, digits_npz, tmp_path):
    """Before the swaps the residual group was excluded ("channel 44 does not exist in
    Linear of width 16") and only the MLP hidden widths could be cut."""
    spec = JobSpec(method={"name": "l1_norm"}, target={"flops": 0.5}, recovery={"mode": "none"})
    report = run(
        spec, zoo_model("mixer"), digits_npz, tmp_path / "out", latency_runs=20, catalog=registry
    )
    assert report.target.met
    rows = {r.name: r for r in report.layers}
    assert rows[PATCH].channels_after < rows[PATCH].channels_before == 48
    assert not any("do not line up" in e.reason for e in report.excluded), report.excluded
    # The exported model keeps its transposes, at the pruned width.
    model = onnx.load(tmp_path / "out" / "model.onnx")
    assert sum(n.op_type == "Transpose" for n in model.graph.node) >= 4
    assert report.parity["max_rel_diff"] <= load.PARITY_RTOL


class _NhwcBlock(nn.Module):
    """ConvNeXt's shape of block: conv -> NHWC -> LayerNorm -> Linear -> NCHW -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 32)
        self.conv = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(self.stem(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.conv(y)).mean(dim=(2, 3)))


def test_nchw_nhwc_permutes_keep_the_identity_map(tmp_path):
    torch.manual_seed(0)
    path = methodkit.export(_NhwcBlock(), Path(tmp_path) / "nhwc.onnx")
    loaded = load.load(path, (1, 8, 8))
    assert not [m for m in loaded.module.modules() if isinstance(m, AxisSwap)]
    x = torch.randn(4, 1, 8, 8)
    # The stem's channels run through the permute to NHWC into the LayerNorm and fc; fc's
    # outputs through the permute back into the conv: both groups prove safe as before.
    analysis = graph.analyse(loaded.module, x[:1], x)
    proven = {g.name: {m.name for m in g.members} for g in analysis.groups}
    stem = next(n for n in proven if "stem" in n)
    fc = next(n for n in proven if "fc" in n)
    assert any("fc" in m for m in proven[stem]), proven[stem]
    assert any("conv" in m for m in proven[fc]), proven[fc]
