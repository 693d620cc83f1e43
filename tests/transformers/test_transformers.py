"""Transformers from ONNX, end to end through the engine: every common export loads at any
batch, and pruning removes whole attention heads, MLP widths and the residual width.

Each case: random init, a small config, recovery off (the parity and MAC claims do not need
training; benchmarks/transformers.py measures accuracy). Asserted: the MAC target is met
within 1%, activation x activation MatMul MACs (attention) fall by at least 25% on the
exported ONNX, the pruned ONNX agrees with torch, and the report shows fewer heads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tfkit  # noqa: E402

from core.errors import BadModel  # noqa: E402
from engine import load  # noqa: E402
from engine.pipeline import run  # noqa: E402
from methods import registry
from prunery.spec import JobSpec  # noqa: E402

CASES = {
    "vit_legacy": (tfkit.torchvision_vit, "legacy", "image"),
    "vit_dynamo": (tfkit.torchvision_vit, "dynamo", "image"),
    "timm_vit": (tfkit.TimmViT, "legacy", "image"),
    "text_encoder": (tfkit.TextEncoder, "legacy", "tokens"),
    "bert": (tfkit.BertClassifier, "dynamo", "tokens"),
    "swin": (tfkit.torchvision_swin, "dynamo", "image"),
    "swin_legacy": (tfkit.torchvision_swin, "legacy", "image"),
}

# The dynamo-exported Swin computes a window index with Range(0, Shape(x)[k]): torch.export
# meets a data-dependent end (the report's note says so).
NO_PT2 = {"swin"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in cache:
            build, exporter, kind = CASES[case]
            torch.manual_seed(0)
            example = (
                torch.randn(2, *tfkit.IMAGE)
                if kind == "image"
                else torch.randint(0, tfkit.VOCAB, (2, tfkit.TOKENS))
            )
            model = tfkit.export(build(), example, root / f"{case}.onnx", exporter)
            data = (tfkit.image_npz if kind == "image" else tfkit.token_npz)(
                root / f"{kind}.npz", n=160
            )
            cache[case] = (model, data)
        return cache[case]

    return get


def _prune(model: Path, data: Path, out: Path, flops: float, method: str = "l1_norm"):
    spec = JobSpec(method={"name": method}, target={"flops": flops}, recovery={"mode": "none"})
    return run(spec, model, data, out, latency_runs=3, catalog=registry)


def _attention_ratio(before: Path, after: Path, data: Path) -> float:
    x = np.load(data)["x_test"][:1]
    a = tfkit.attention_macs(
        onnx.load(str(before)),
        {"input": x} if "input" in _inputs(before) else {_inputs(before)[0]: x},
    )
    b = tfkit.attention_macs(onnx.load(str(after)), {_inputs(after)[0]: x})
    assert a > 0
    return b / a


def _inputs(path: Path) -> list[str]:
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


@pytest.mark.parametrize("case", list(CASES))
def test_prunes_heads_to_half_the_macs(case, exported, tmp_path):
    model, data = exported(case)
    report = _prune(model, data, tmp_path / "out", 0.5)
    assert abs(report.target.achieved - 0.5) <= 0.01, report.target
    heads = [r for r in report.layers if r.op == "attention heads"]
    assert heads, "no attention block was found"
    assert sum(r.channels_after for r in heads) < sum(r.channels_before for r in heads)
    assert all(r.channels_after >= 1 for r in heads)
    assert _attention_ratio(model, tmp_path / "out" / "model.onnx", data) <= 0.75
    assert report.parity["max_rel_diff"] <= 1e-4
    # The pruned ONNX runs at a batch the upload was never traced at.
    x = np.load(data)["x_test"][:5]
    sess = load.ort_session(str(tmp_path / "out" / "model.onnx"))
    y = sess.run(None, {_inputs(tmp_path / "out" / "model.onnx")[0]: x})[0]
    assert y.shape[0] == 5
    # model.pt2 (torch.export, dynamic batch) reproduces the ONNX, or the report says why not.
    pt2 = tmp_path / "out" / "model.pt2"
    if case in NO_PT2:
        assert not pt2.exists()
        assert any(n.startswith("no model.pt2") for n in report.notes), report.notes
    else:
        assert pt2.exists(), [n for n in report.notes if "pt2" in n]
        program = torch.export.load(str(pt2)).module()
        got = program(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))


@pytest.mark.parametrize("case", ["vit_legacy", "timm_vit"])
def test_vits_reach_a_quarter_of_the_macs(case, exported, tmp_path):
    model, data = exported(case)
    report = _prune(model, data, tmp_path / "out", 0.25, method="random")
    assert abs(report.target.achieved - 0.25) <= 0.01, report.target
    widths = {
        r.name: (r.channels_before, r.channels_after) for r in report.layers if r.op == "Conv2d"
    }
    assert any(after < before for before, after in widths.values()), (
        "the patch embedding (residual width) kept its width"
    )


def test_fixed_batch_dynamo_cnn_becomes_batch_polymorphic(tmp_path, digits_npz):
    """torch.onnx.export(dynamo=True) without dynamic_shapes bakes batch 1 into the flatten's
    shape; the loaded module must still run (and prune) at any batch."""
    torch.manual_seed(0)
    path = tfkit.export(
        tfkit.FixedBatchCNN(),
        torch.randn(1, 1, 8, 8),
        tmp_path / "cnn.onnx",
        "dynamo",
        dynamic_batch=False,
    )
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    loaded = load.load(path, (1, 8, 8))
    assert any("batch-polymorphic" in n for n in loaded.notes), loaded.notes
    with torch.no_grad():
        assert loaded.module(torch.randn(7, 1, 8, 8)).shape == (7, 10)
    report = _prune(path, digits_npz, tmp_path / "out", 0.5)
    assert abs(report.target.achieved - 0.5) <= 0.01
    assert report.parity["max_rel_diff"] <= 1e-4


def test_fixed_batch_one_transformer_is_refused_with_the_fix(tmp_path):
    """At batch 1 the dynamo exporter folds MultiheadAttention's batch transposes into
    Reshapes: no batch can be recovered, so the load says how to re-export."""
    torch.manual_seed(0)
    path = tfkit.export(
        tfkit.torchvision_vit(),
        torch.randn(1, *tfkit.IMAGE),
        tmp_path / "vit1.onnx",
        "dynamo",
        dynamic_batch=False,
    )
    with pytest.raises(BadModel, match="dynamic batch"):
        load.load(path, tfkit.IMAGE)


def test_fused_mha_fast_path_export_loads_with_its_heads(tmp_path):
    """Under torch.no_grad() nn.MultiheadAttention runs its fused fast path
    (_native_multi_head_attention); the dynamo exporter decomposes it. It loads at any
    batch and its heads are found."""
    from engine import heads

    torch.manual_seed(0)
    model = tfkit.TextEncoder().eval()
    x = torch.randint(0, tfkit.VOCAB, (2, tfkit.TOKENS))
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            dynamic_shapes={"x": {0: torch.export.Dim.AUTO}},
            verbose=False,
        )
    program.save(str(tmp_path / "fused.onnx"), external_data=False)
    loaded = load.load(tmp_path / "fused.onnx", (tfkit.TOKENS,), input_high=tfkit.VOCAB)
    ids = torch.randint(0, tfkit.VOCAB, (3, tfkit.TOKENS))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(ids), model(ids), rtol=1e-4, atol=1e-5)
    blocks = heads.find_blocks(loaded.module, ids[:1])
    assert [b.heads for b in blocks] == [4, 4]
