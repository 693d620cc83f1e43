"""The terminal summaries a user reads: the report (`prunery prune`, `prunery submit --wait`,
`prunery wait`, `prunery report`) with its per-layer table, excluded layers and notes, and
`prunery jobs` as a table — from real report and job objects, through the real CLI parser."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest

from prunery.cli import build_parser, layers_count
from prunery.cli import remote as cli_remote
from prunery.cli.listing import jobs_table, methods_text
from prunery.client import Job
from prunery.report import (
    BeforeAfter,
    ExcludedLayer,
    LatencyResult,
    LayerRow,
    Report,
    TargetResult,
)
from prunery.report_text import DEFAULT_LAYERS, display_name, format_report

ENGINE_NAMES = [f"features/features/{i}/Conv" for i in range(30)]


def _report(n_layers: int = 30, timed: bool = True) -> Report:
    layers = []
    for i in range(n_layers):
        before = 64
        after = 64 if i % 3 == 0 else 64 - (i + 1)  # every third layer unchanged
        layers.append(
            LayerRow(
                name=f"features/features/{i}/Conv",
                op="Conv2d",
                channels_before=before,
                channels_after=after,
                macs_before=1_000_000 * (i + 1),
                macs_after=1_000_000 * (i + 1) * after // before,
                latency_before_us=10.0 + i if timed else None,
                latency_after_us=(10.0 + i) * after / before if timed else None,
            )
        )
    return Report(
        task="classification",
        method={"name": "l1_norm"},
        recovery={"mode_used": "finetune", "epochs_used": 3},
        target=TargetResult(kind="flops", requested=0.5, achieved=0.497, tolerance=0.01, met=True),
        macs=BeforeAfter(before=4.65e8, after=2.31e8),
        params=BeforeAfter(before=1e6, after=5e5),
        latency_ms=[
            LatencyResult(
                batch_size=1,
                before=2.0,
                after=1.1,
                speedup=1.82,
                runs=50,
                p90_before=2.1,
                p90_after=1.2,
            )
        ],
        file_bytes=BeforeAfter(before=4e6, after=2e6),
        parity={"max_abs_diff": 1e-6},
        layers=layers,
        excluded=[
            ExcludedLayer(
                name="classifier/classifier/1/Gemm",
                reason="the output layer: its width is the number of classes",
            ),
            ExcludedLayer(
                name="layer1/layer1/0/seq/seq/0/seq/0/0/Conv",
                reason="its output is added to another branch whose channels are not pruned",
            ),
        ],
        notes=[
            "uneven cut: 2 group(s) are excluded, so the prunable groups lose more",
            "onnxslim simplified the graph before conversion",
        ],
        stage_seconds={"load": 1.0},
        seed=0,
        model_sha256="0" * 64,
        spec_hash="0" * 64,
        versions={},
        device="cpu",
    )


@pytest.mark.parametrize(
    ("engine", "shown"),
    [
        ("features/features/0/Conv", "features/0/Conv"),
        ("layer1/layer1/0/conv1/Conv", "layer1/0/conv1/Conv"),
        # nested Sequential: /layer1/layer1.0/seq/seq.0/seq.0.0/Conv from the exporter
        ("layer1/layer1/0/seq/seq/0/seq/0/0/Conv", "layer1/0/seq/0/0/Conv"),
        ("features/features/0/features/0/0/Conv", "features/0/0/Conv"),
        ("blocks/0/conv1/Conv", "blocks/0/conv1/Conv"),  # ModuleList: nothing doubled
        ("seq/0/0/Conv", "seq/0/0/Conv"),  # repeated indices are a real path
        ("/features/features.0/Conv", "/features/features.0/Conv"),
        ("stem.conv", "stem.conv"),
        ("node_Conv_507", "node_Conv_507"),
        ("fc/Gemm", "fc/Gemm"),
    ],
)
def test_display_name_drops_the_exporters_doubled_scopes(engine, shown):
    assert display_name(engine) == shown


def test_summary_has_layer_table_capped_excluded_and_notes():
    report = _report()
    text = format_report(report)
    lines = text.splitlines()
    assert "layers: the 20 of 30 with the biggest MAC change, in network order:" in text
    # Every third layer is unchanged: the other 20 are the ones with a MAC change.
    table = [ln for ln in lines if "/Conv" in ln and ln.startswith("  features/")]
    assert [ln.split()[0] for ln in table] == [f"features/{i}/Conv" for i in range(30) if i % 3]
    row29 = next(ln for ln in table if ln.split()[0] == "features/29/Conv")
    # channels, MACs and latency before -> after
    assert "64 -> 34" in row29 and "30.000 M -> 15.938 M" in row29 and "39.0 -> 20.7" in row29
    assert "latency µs (batch 1)" in text
    assert "  ... 10 more layers (10 unchanged; the full table is in report.md)" in text
    assert "layers shown by their source module path" in text  # here: engine names, de-doubled
    assert "features/features" not in text
    # excluded layers with their reasons (names cleaned), and every note
    assert "excluded from pruning (2):" in text
    assert "  - classifier/1/Gemm: the output layer: its width is the number of classes" in text
    assert "  - layer1/0/seq/0/0/Conv: its output is added to another branch" in text
    assert "reasons in report.md" not in text
    assert "notes:" in text
    assert "  - uneven cut: 2 group(s) are excluded" in text
    assert "  - onnxslim simplified the graph before conversion" in text
    assert lines[-1] == "device: cpu"


def test_summary_all_layers_none_and_untimed():
    text = format_report(_report(), layers=None)
    assert "layers (30):" in text and "more layers" not in text
    for i in range(30):
        assert f"  features/{i}/Conv " in text
    assert (
        "layers" not in format_report(_report(), layers=0).split("target:")[1].split("excluded")[0]
    )
    small = format_report(_report(5, timed=False))
    assert "layers (5):" in small and "latency µs" not in small and "more layers" not in small


def test_layers_flag_and_remote_summary():
    parser = build_parser({})
    assert parser.parse_args(["report", "job_x"]).layers == DEFAULT_LAYERS
    assert parser.parse_args(["report", "job_x", "--layers", "all"]).layers is None
    assert parser.parse_args(["wait", "job_x", "--layers", "5"]).layers == 5
    args = parser.parse_args(["submit", "m.onnx", "--data", "d.npz", "--wait", "--layers", "3"])
    assert args.layers == 3
    with pytest.raises(argparse.ArgumentTypeError):
        layers_count("many")
    text = cli_remote.summary(_report(), "job_abc", parser.parse_args(["report", "job_abc"]))
    assert "10 more layers (10 unchanged; `prunery report job_abc --layers all` lists them" in text
    text = cli_remote.summary(
        _report(), "job_abc", parser.parse_args(["report", "job_abc", "--layers", "all"])
    )
    assert "more layers" not in text and "features/0/Conv" in text


def _job(**fields) -> Job:
    base = {
        "id": "job_0123456789abcdef",
        "status": "succeeded",
        "progress": 1.0,
        "stage": "report",
        "model_id": "mdl_aaaa",
        "spec": {"method": {"name": "l1_norm"}, "target": {"flops": 0.5}},
        "created_at": "2026-01-01T10:00:00Z",
        "updated_at": "2026-01-01T10:01:00Z",
        "started_at": "2026-01-01T10:00:05Z",
        "finished_at": "2026-01-01T10:01:25Z",
    }
    return Job.model_validate({**base, **fields})


def test_jobs_table_shows_method_target_model_and_times():
    jobs = [
        _job(),
        _job(
            id="job_running",
            status="running",
            progress=0.42,
            stage="prune",
            model_id="mdl_gone",
            spec={"method": {"name": "thinet"}, "target": {"params": 0.3}},
            finished_at=None,
        ),
        _job(
            id="job_failed",
            status="failed",
            progress=0.1,
            error={"error": "budget_unreachable", "detail": "raise the target"},
            spec={"method": {"name": "tas"}, "target": {"layers": {"a": 0.5, "b": 0.2}}},
        ),
        _job(id="job_queued", status="queued", progress=0.0, started_at=None, finished_at=None),
        _job(id="job_missed", gates_passed=False),
    ]
    now = datetime(2026, 1, 1, 10, 2, 5, tzinfo=UTC)
    text = jobs_table(jobs, 7, {"mdl_aaaa": "digits_cnn.onnx"}, now=now)
    lines = text.splitlines()
    assert lines[0].split() == [
        "id",
        "status",
        "progress",
        "method",
        "target",
        "model",
        "created",
        "ran",
        "for",
    ]
    created = datetime(2026, 1, 1, 10, 0, tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M")
    row = lines[2]
    for cell in (
        "job_0123456789abcdef",
        "succeeded",
        "100%",
        "l1_norm",
        "MACs 0.5",
        "digits_cnn.onnx",
        created,
        "1m 20s",
    ):
        assert cell in row, cell
    running = next(ln for ln in lines if ln.startswith("job_running"))
    for cell in ("running", "42% prune", "thinet", "params 0.3", "mdl_gone", "2m 00s so far"):
        assert cell in running, cell
    failed = next(ln for ln in lines if ln.startswith("job_failed"))
    assert "failed (budget_unreachable)" in failed and "2 layers" in failed
    queued = next(ln for ln in lines if ln.startswith("job_queued"))
    assert queued.rstrip().endswith("-")
    assert "succeeded, gate missed" in next(ln for ln in lines if ln.startswith("job_missed"))
    assert "job_failed failed: budget_unreachable: raise the target" in text
    assert lines[-1] == "(5 of 7 jobs; --limit N shows more, --json has every field)"
    assert jobs_table([], 0, {}) == "no jobs"


class _Models:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def get(self, ident: str):
        from prunery.errors import NotFound

        self.asked.append(ident)
        if ident == "mdl_gone":
            raise NotFound(404, "not_found", "no such model")
        return argparse.Namespace(filename=f"{ident}.onnx")


def test_model_names_one_lookup_per_model(monkeypatch):
    from prunery.cli.listing import model_names

    client = argparse.Namespace(models=_Models())
    jobs = [_job(), _job(id="j2"), _job(id="j3", model_id="mdl_gone"), _job(id="j4", model_id=None)]
    assert model_names(client, jobs) == {"mdl_aaaa": "mdl_aaaa.onnx"}  # type: ignore[arg-type]
    assert client.models.asked == ["mdl_aaaa", "mdl_gone"]


def test_methods_text_wraps_beside_the_name_column():
    text = methods_text(
        [
            ("l1_norm", "Remove the channels with the smallest L1 norm. " * 4, "Li et al. 2017"),
            ("channel_regression", "LASSO channel selection.", "He et al. 2017"),
        ],
        width=80,
    )
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    assert lines[0].startswith("l1_norm             Remove the channels")
    assert any(ln.startswith("channel_regression  LASSO") for ln in lines)
    assert "(He et al. 2017)" in text
