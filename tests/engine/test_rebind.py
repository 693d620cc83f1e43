"""`Prepared.rebind` (benchmarks, budget sweeps): one preparation, another method. Whole-
attention-head groups follow the method: a method that does not prune heads is never handed
them (taylor, thinet and channel_regression failed on every ViT in benchmarks/accuracy.py
this way), and one that does gets them even when the first method did not ask."""

from __future__ import annotations

from engine import progressive
from engine.heads import is_head_group
from engine.prepare import prepare
from methods import registry
from prunery.spec import JobSpec


def _spec(method: str) -> JobSpec:
    return JobSpec(method={"name": method}, target={"flops": 0.5}, recovery={"mode": "none"})


def test_head_groups_follow_the_rebound_method(zoo_model, digits_npz):
    prep = prepare(_spec("l1_norm"), zoo_model("vit"), digits_npz, catalog=registry)
    assert any(is_head_group(g.name) for g in prep.analysis.groups)  # l1_norm prunes heads
    for name in ("taylor", "channel_regression"):
        other = prep.rebind(_spec(name), registry)
        assert not any(is_head_group(g.name) for g in other.analysis.groups)
        assert other.analysis.groups  # the channel groups stay
        result = progressive.run(other.method, other.context(), other.info.name)
        kept = other.context().costs(result.model.cpu().eval()).macs / prep.base_costs.macs
        assert abs(kept - 0.5) <= 0.01, (name, kept)
    # The original preparation is untouched, and rebinding back restores the head groups.
    assert any(is_head_group(g.name) for g in prep.analysis.groups)
    taylor = prep.rebind(_spec("taylor"), registry)
    back = taylor.rebind(_spec("l1_norm"), registry)
    assert {g.name for g in back.analysis.groups} == {g.name for g in prep.analysis.groups}
