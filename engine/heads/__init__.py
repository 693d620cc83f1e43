"""Attention heads: found in the converted graph, scored per head, removed whole.

An attention block is found from its core, not from a layer name: a MatMul of two
activations (q · kᵀ) whose result reaches a Softmax, whose output is the left operand of
a second MatMul (· v). From the three operands, the graph is walked back through layout
ops only (Reshape, Transpose, Gather/select, Squeeze/Unsqueeze, a scalar scale) to the
Linear layers that produce q, k and v (one packed `qkv` Linear, timm-style; one `in_proj`,
nn.MultiheadAttention; or three, HF-style), and forward from the second MatMul to the
output projection.

Which output channel of those Linears belongs to which head is not guessed from a layout
convention: an index tensor (channel c holds the value c) is pushed through the same
layout ops, and the head of each channel is read off the MatMul's leading (head) index.
The same index run tells, for every Reshape on the way, which dimension holds the heads,
so removing heads rewrites those shape constants (12 heads → 9, or 768 → 576 where heads
and head dims are packed) together with the rows of q, k, v and the columns of the output
projection. Every head group is then proven by the zero-equivalence probe: zeroing the v
channels of some heads and removing those heads must give the same output.

Head groups live beside the channel groups under the name `<output projection>#heads`;
graph.prune_copy and graph.channel_scores route such names here.

The package: `find` (attention blocks in the graph), `surgery` (removing, probing, scoring).
"""

from engine.heads.find import (
    SUFFIX,
    HeadBlock,
    HeadSelect,
    find_blocks,
    is_head_group,
)
from engine.heads.surgery import (
    ATTR,
    analyse,
    apply_plan,
    blocks_of,
    head_scores,
    heads_of,
    probe,
    remove_heads,
    report_rows,
)

__all__ = [
    "ATTR",
    "HeadBlock",
    "HeadSelect",
    "SUFFIX",
    "analyse",
    "apply_plan",
    "blocks_of",
    "find_blocks",
    "head_scores",
    "heads_of",
    "is_head_group",
    "probe",
    "remove_heads",
    "report_rows",
]
