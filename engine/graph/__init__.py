"""Analyse: recover torch layers from the converted graph, build Torch-Pruning's dependency
graph, list the prunable channel groups, and prove each one safe before anything is cut.

Safety proof ("zero equivalence"): for a group, zero the channels that would be removed
(the out-channel weights and biases of every coupled layer), run the model, then remove
the same channels structurally and run it again. Removing a channel whose contribution
is already zero must not change the output. A group that fails — an exception (a channel
dim baked into a constant Reshape, an unwrapped constant), a changed output shape (the
classifier), or a different output (a LayerNorm over the pruned dim, a misaligned
head reshape) — is excluded with the reason, never broken.

The package's public API (methods and the other engine modules use `engine.graph.X`):
`surgery` (groups, dependency graph, zeroing and removing channels, scores), `probe` (the
zero-equivalence probes, located forward passes), `search` (the group search: `analyse`). The FX
rewrites that run before it live in `engine.fx_rewrites`.
"""

from engine.graph.probe import outputs_close, probe_group, probe_groups, run_located
from engine.graph.search import PROBE_SAMPLES, Analysis, analyse
from engine.graph.surgery import (
    PRUNABLE_ROOTS,
    ChannelGroup,
    GroupMember,
    build_dependency_graph,
    channel_scores,
    describe_group,
    full_group,
    grouped_ties,
    module_names,
    prune_copy,
    zero_out_channels,
)

__all__ = [
    "PROBE_SAMPLES",
    "PRUNABLE_ROOTS",
    "Analysis",
    "ChannelGroup",
    "GroupMember",
    "analyse",
    "build_dependency_graph",
    "channel_scores",
    "describe_group",
    "full_group",
    "grouped_ties",
    "module_names",
    "outputs_close",
    "probe_group",
    "probe_groups",
    "prune_copy",
    "run_located",
    "zero_out_channels",
]
