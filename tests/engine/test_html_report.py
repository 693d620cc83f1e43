"""report.html in a real headless browser (the system Chromium, driven by Playwright): the page
loads with no console errors and no request leaving the file, every plot is present and
visible, and a screenshot is saved in the test's tmp dir. Also `prunery analyze`, and the
analysis a `budget_unreachable` run leaves behind."""

from __future__ import annotations

import json
from html import unescape
from pathlib import Path

import pytest
from browserkit import open_page

from engine import analysis
from methods import registry
from prunery.analysis import Analysis
from prunery.html_report import render_html
from prunery.report import Report
from prunery.types import ExitCode
from server_cli import analyze as server_analyze
from server_cli import prune as local


@pytest.fixture(scope="module")
def pruned(zoo_model, digits_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "out"
    code = local.main(
        [
            str(zoo_model("vgg")),
            "--data",
            str(digits_npz),
            "--target-flops",
            "0.5",
            "--epochs",
            "2",
            "--latency-runs",
            "20",
            # About the page, not speed: the gate has its own tests (test_latency.py).
            "--min-speedup",
            "null",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return out


def test_report_html_in_a_real_browser(pruned, tmp_path):
    page = pruned / "report.html"
    html = page.read_text()
    assert (
        "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    )
    assert "<script" not in html and "<link" not in html
    seen = open_page(page.as_uri(), tmp_path / "report.png")
    assert seen["errors"] == [] and seen["outside"] == []
    assert seen["title"].startswith("Prunery report")
    for plot in ("layer-channels", "layer-macs", "recovery-curve", "analysis-shares"):
        visible, w, h = seen["plots"][plot]
        assert visible and w > 300 and h > 100, (plot, seen["plots"][plot])
    assert seen["marks"] > 20
    assert (tmp_path / "report.png").stat().st_size > 10_000
    report = Report.model_validate_json((pruned / "report.json").read_text())
    for row in report.layers:  # the per-layer table is on the page
        assert f"{row.channels_before} → {row.channels_after}" in html
    for e in report.excluded:
        assert e.reason.split("(")[0].strip() in unescape(html)  # the page escapes quotes


def test_method_panels_render_in_a_browser(pruned, tmp_path):
    """Search curves, a gate histogram, robustness and dynamic-MACs panels (the shapes TAS/PFS,
    ANP and SANP write) on the engine's real report, plus hostile text that must be escaped."""
    report = Report.model_validate_json((pruned / "report.json").read_text())
    report.method_details.update(
        search_curves={"loss": [2.0, 1.5, 1.1, 0.9], "soft_macs": [1.0, 0.8, 0.6, 0.5]},
        gate_histogram=[5, 1, 0, 0, 2, 3, 9, 12, 4, 1],
    )
    report.robustness = {
        "original": {"clean": 0.98, "pgd": 0.2},
        "pruned": {"clean": 0.97, "pgd": 0.4},
        "samples": 360,
        "measured_with": "torch",
    }
    report.dynamic = {
        "macs_mean": 5e5,
        "macs_std": 1e4,
        "macs_min": 4e5,
        "macs_max": 6e5,
        "macs_static": 7e5,
        "macs_before": 1.5e6,
        "samples": 360,
        "measured_on": "test split",
    }
    report.notes.append('<script>alert("x")</script><img src="https://example.com/x.png">')
    page = tmp_path / "panels.html"
    page.write_text(
        render_html(report, Analysis.model_validate_json((pruned / "analysis.json").read_text()))
    )
    seen = open_page(page.as_uri(), tmp_path / "panels.png")
    assert seen["errors"] == [] and seen["outside"] == []
    for plot in ("search-curves", "gate_histogram", "robustness", "dynamic-macs"):
        visible, w, h = seen["plots"][plot]
        assert visible and h > 50, (plot, seen["plots"][plot])
    assert "&lt;script&gt;" in page.read_text()


def test_analyze_cli_and_api(zoo_model, digits_npz, tmp_path, capsys):
    out = tmp_path / "a.json"
    argv = [str(zoo_model("vgg")), "--data", str(digits_npz), "--out", str(out)]
    assert server_analyze.main(argv) == 0
    text = capsys.readouterr().out
    assert "prunable groups: 5" in text and "excluded layers:" in text and "l1_norm" in text
    a = Analysis.model_validate_json(out.read_text())
    assert a.macs > 0 and len(a.groups) == 5
    assert [e.name for e in a.excluded] == ["9/Gemm"] and "output" in a.excluded[0].reason
    assert 0 < a.min_macs_fraction < 0.2 and 0 < a.min_params_fraction < 0.2
    for g in a.groups:
        assert 0 < g.macs_share <= 1 and g.min_channels < g.channels and g.layers
    assert {m.name for m in a.methods if m.applies} >= {"l1_norm", "thinet"}
    # Without data the declared input shape is used.
    b = analysis.analyze(zoo_model("vgg"), catalog=registry)
    assert b.input_shape == [1, 1, 8, 8] and [g.name for g in b.groups] == [
        g.name for g in a.groups
    ]


def test_budget_unreachable_keeps_the_analysis(zoo_model, digits_npz, tmp_path, capsys):
    out = tmp_path / "out"
    code = local.main(
        [
            str(zoo_model("vgg")),
            "--data",
            str(digits_npz),
            "--target-flops",
            "0.001",
            "--epochs",
            "0",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_INPUT and "budget_unreachable" in err and "analysis.json" in err, (
        err
    )
    a = json.loads((out / "analysis.json").read_text())
    assert a["excluded"] and a["excluded"][0]["reason"] and a["min_macs_fraction"] > 0.001
    assert not (out / "model.onnx").exists()


def test_model_pt2_loads_matches_onnx_and_trains(pruned, digits_npz):
    """The pruned network as a torch.export program: same outputs as model.onnx at any batch
    size, and a trainable module (what the README's fine-tuning snippet does)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    data = np.load(digits_npz)
    x, y = (
        torch.from_numpy(data["x_test"][:50]).float(),
        torch.from_numpy(data["y_test"][:50]).long(),
    )
    module = torch.export.load(str(pruned / "model.pt2")).module()
    session = ort.InferenceSession(str(pruned / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 50):
        want = session.run(None, {session.get_inputs()[0].name: x[:batch].numpy()})[0]
        got = module(x[:batch]).detach().numpy()
        assert np.abs(got - want).max() < 1e-4
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    before = torch.nn.functional.cross_entropy(module(x), y).item()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    assert torch.nn.functional.cross_entropy(module(x), y).item() < before


def test_model_pt2_is_skipped_with_a_note_when_export_fails(tmp_path):
    import torch

    from engine.torch_export import save_program

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a value: not capturable
                return x * 2
            return x

    notes = save_program(DataDependent(), torch.randn(1, 4), tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists() and notes and notes[0].startswith("no model.pt2")
    assert not list(tmp_path.iterdir())
