"""Readable layer names: every Conv/Linear layer of a torch-exported ONNX (the legacy exporter's
`/1/c1/c1.0/Conv` and the dynamo exporter's `node_Conv_126`) is mapped back to the torch
module path it came from (`1.c1.0`), the report shows it, and `target.layers` takes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from core.errors import BadSpec
from engine import budget, graph, load
from prunery.html_report import layer_shares
from prunery.report import Report
from server_cli import prune as local

SAMPLE = (1, 8, 8)


def _torch_layers(name: str) -> dict[str, nn.Module]:
    """The zoo model's own Conv/Linear modules by path (what the exporters were given)."""
    return {
        n: m for n, m in zoo.ZOO[name]().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def _prunable(loaded: load.LoadedModel) -> list[str]:
    return [n for n, m in loaded.module.named_modules() if isinstance(m, graph.PRUNABLE_ROOTS)]


@pytest.mark.parametrize("opset", ["op17", "opdefault"])
@pytest.mark.parametrize("name", ["resnet_basic", "se_resnet", "mixer"])
def test_every_layer_maps_to_its_torch_module(zoo_model, name, opset):
    loaded = load.load(zoo_model(name, opset), SAMPLE)
    layers = _prunable(loaded)
    torch_layers = _torch_layers(name)
    sources = [loaded.source_names.get(n) for n in layers]
    assert None not in sources, dict(zip(layers, sources, strict=True))
    # Each source is a Conv/Linear of the torch model, one per converted layer, and together
    # they are every Conv/Linear the torch model has (no engine name leaks through).
    assert set(sources) <= set(torch_layers), set(sources) - set(torch_layers)
    assert len(set(sources)) == len(layers)
    assert set(sources) == set(torch_layers)
    # The widths agree: the mapped module is really that layer.
    modules = dict(loaded.module.named_modules())
    for engine_name, src in zip(layers, sources, strict=True):
        theirs, ours = torch_layers[src], modules[engine_name]
        width = getattr(theirs, "out_channels", None) or theirs.out_features
        assert (getattr(ours, "out_channels", None) or ours.out_features) == width, src


def test_both_exporters_give_the_same_source_names(zoo_model):
    legacy = load.load(zoo_model("resnet_bottleneck", "op17"), SAMPLE)
    dynamo = load.load(zoo_model("resnet_bottleneck", "opdefault"), SAMPLE)
    assert _prunable(legacy)[1].endswith("Conv") and "/" in _prunable(legacy)[1]
    assert _prunable(dynamo)[1].startswith("node_")
    assert sorted(legacy.source_names[n] for n in _prunable(legacy)) == sorted(
        dynamo.source_names[n] for n in _prunable(dynamo)
    )


def test_legacy_scope_paths():
    assert load._legacy_scope_path("/features/features.0/Conv") == "features.0"
    assert load._legacy_scope_path("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert load._legacy_scope_path("/1/c1/c1.0/Conv") == "1.c1.0"
    assert load._legacy_scope_path("/0/0.0/Conv") == "0.0"
    assert load._legacy_scope_path("/fc/Gemm") == "fc"
    assert load._legacy_scope_path("node_Conv_507") is None
    assert load._legacy_scope_path("/Gemm") is None


@pytest.mark.parametrize("opset", ["op17", "opdefault"])
def test_layers_target_by_source_name_prunes_the_same_layer(zoo_model, opset):
    loaded = load.load(zoo_model("resnet_basic", opset), SAMPLE)
    x = torch.from_numpy(zoo.digits_arrays()["x_train"][:16])
    analysis = graph.analyse(loaded.module, x[:1], x)
    by_source = {src: n for n, src in loaded.source_names.items()}
    engine_name = by_source["1.c1.0"]  # its own group (the block's inner conv)
    residual = by_source["2.c2.0"]  # a member of the residual group rooted elsewhere
    scores = {g.name: torch.arange(g.channels, dtype=torch.float64) for g in analysis.groups}
    for src, eng in (("1.c1.0", engine_name), ("2.c2.0", residual)):
        by_engine = budget.explicit_plan(analysis.groups, scores, {eng: 0.5}, 1)
        by_src = budget.explicit_plan(
            analysis.groups, scores, {src: 0.5}, 1, sources=loaded.source_names
        )
        assert by_src == by_engine and len(by_src) == 1 and len(next(iter(by_src.values())))
        a = budget.apply_plan(loaded.module, x[:1], by_engine)
        b = budget.apply_plan(loaded.module, x[:1], by_src)
        widths = [(n, m.out_channels) for n, m in a.named_modules() if isinstance(m, nn.Conv2d)]
        assert widths == [
            (n, m.out_channels) for n, m in b.named_modules() if isinstance(m, nn.Conv2d)
        ]
        assert dict(widths)[eng] < loaded.module.get_submodule(eng).out_channels
    with pytest.raises(BadSpec) as err:
        budget.explicit_plan(
            analysis.groups, scores, {"1.c9.0": 0.5}, 1, sources=loaded.source_names
        )
    message = str(err.value)
    assert "'1.c9.0'" in message and "1.c1.0" in message and engine_name in message


@pytest.fixture(scope="module")
def pruned_dynamo(zoo_model, digits_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sources") / "out"
    code = local.main(
        [
            str(zoo_model("resnet_basic", "opdefault")),
            "--data",
            str(digits_npz),
            "--method",
            "l1_norm",
            "--target-flops",
            "0.5",
            "--epochs",
            "0",
            "--latency-runs",
            "20",
            # About names and the page, not speed.
            "--min-speedup",
            "null",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return out


def test_report_rows_markdown_and_html_show_source_names(pruned_dynamo):
    report = Report.model_validate_json((pruned_dynamo / "report.json").read_text())
    torch_layers = _torch_layers("resnet_basic")
    assert all(r.name.startswith("node_") for r in report.layers)
    assert {r.source for r in report.layers} == set(torch_layers)
    md = (pruned_dynamo / "report.md").read_text()
    html = (pruned_dynamo / "report.html").read_text()
    for row in report.layers:
        assert f"| `{row.source}` | {row.op} |" in md
        assert f"<td>{row.source}<br><code>{row.name}</code></td>" in html
    assert "node_Conv" not in md.split("## Layers")[1].split("##")[0]


def test_html_shows_each_layers_latency_share(pruned_dynamo):
    report = Report.model_validate_json((pruned_dynamo / "report.json").read_text())
    assert all(r.latency_before_us and r.latency_after_us for r in report.layers)
    html = (pruned_dynamo / "report.html").read_text()
    assert 'data-plot="layer-latency-share"' in html
    shares = layer_shares(report)
    assert shares is not None
    assert sum(shares["latency before"]) == pytest.approx(100.0)
    assert sum(shares["MACs before"]) == pytest.approx(100.0)
    total = sum(r.latency_before_us or 0.0 for r in report.layers)
    # After-bars are shares of the original's total (not of their own), so they add up to the
    # measured after/before ratio: one-op timings of 10-30 µs layers are too noisy to say
    # which way that ratio goes, but the chart must show whichever it is.
    after_total = sum(r.latency_after_us or 0.0 for r in report.layers)
    assert sum(shares["latency after"]) == pytest.approx(100.0 * after_total / total)
    assert sum(shares["MACs after"]) == pytest.approx(
        100.0 * sum(r.macs_after for r in report.layers) / sum(r.macs_before for r in report.layers)
    )
    assert sum(shares["MACs after"]) < 100.0
    for row in report.layers:
        assert row.latency_before_us is not None and row.latency_after_us is not None
        cell = f"{row.latency_before_us / total:.1%} → {row.latency_after_us / total:.1%}"
        assert cell in html, cell
        # One bar per layer and series, each with its value in the tooltip.
        assert f"{row.source} latency before: " in html


def test_latency_share_plot_is_visible_in_a_browser(pruned_dynamo, tmp_path):
    from browserkit import open_page

    seen = open_page((pruned_dynamo / "report.html").as_uri(), tmp_path / "report.png")
    assert seen["errors"] == [] and seen["outside"] == []
    visible, w, h = seen["plots"]["layer-latency-share"]
    assert visible and w > 300 and h > 100, seen["plots"]["layer-latency-share"]


def test_prunery_prune_takes_a_layers_target_by_source_name(zoo_model, digits_npz, tmp_path):
    """End to end: `--target-layers` naming the torch module path (as the CLI summary shows
    it) prunes that layer, on a dynamo export whose engine names are `node_Conv_*`."""
    out = tmp_path / "out"
    code = local.main(
        [
            str(zoo_model("resnet_basic", "opdefault")),
            "--data",
            str(digits_npz),
            "--method",
            "l1_norm",
            "--target-layers",
            '{"1.c1.0": 0.5}',
            "--epochs",
            "0",
            "--latency-runs",
            "20",
            "--min-speedup",
            "null",  # about names, not speed
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    report = Report.model_validate_json((out / "report.json").read_text())
    row = next(r for r in report.layers if r.source == "1.c1.0")
    assert row.name != "1.c1.0" and row.channels_after == row.channels_before // 2


def test_excluded_layers_carry_source_names(pruned_dynamo):
    """The classifier's output Linear cannot be pruned (its width is the class count): the
    report names it by its torch module path too, and report.md, report.html and the CLI
    summary show that path."""
    from prunery.report_text import format_report

    report = Report.model_validate_json((pruned_dynamo / "report.json").read_text())
    torch_layers = _torch_layers("resnet_basic")
    head = [n for n, m in torch_layers.items() if isinstance(m, nn.Linear)][-1]
    excluded = {e.source: e for e in report.excluded}
    assert head in excluded, [(e.name, e.source) for e in report.excluded]
    assert excluded[head].name.startswith("node_") and excluded[head].display_name == head
    assert all(e.source in torch_layers for e in report.excluded if e.source)
    md = (pruned_dynamo / "report.md").read_text().split("## Excluded from pruning")[1]
    assert f"| `{head}` | " in md and excluded[head].name not in md
    html = (pruned_dynamo / "report.html").read_text()
    assert f"<td>{head}<br><code>{excluded[head].name}</code></td>" in html
    text = format_report(report).split("excluded from pruning")[1]
    assert f"  - {head}: its channels are the model's outputs" in text
