"""A missed target is not a success: `target.met == false` fails the 'target' gate (exit 4,
gates_passed false) unless the spec sets gates.allow_target_miss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunery.types import ExitCode

sys.path.insert(0, str(Path(__file__).parent))

import cnnkit  # noqa: E402

from server_cli import prune as local  # noqa: E402


class Coarse(nn.Module):
    """Widths 16 and 24: at round_to=8 the reachable MAC fractions are far apart."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(24, cnnkit.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def coarse(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gate")
    torch.manual_seed(0)
    return cnnkit.export(Coarse(), d / "coarse.onnx", 16, False), cnnkit.image_npz(
        d / "d.npz", 16, 32, 16
    )


def _prune(model: Path, data: Path, out: Path, *extra: str) -> int:
    return local.main(
        [
            str(model),
            "--data",
            str(data),
            "--recovery",
            "none",
            "--target-flops",
            "0.5",
            "--round-to",
            "8",
            "--latency-runs",
            "20",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_missed_target_fails_the_gate(coarse, tmp_path, capsys):
    model, data = coarse
    code = _prune(model, data, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["target"]["met"] and abs(report["target"]["achieved"] - 0.5) > 0.01
    gate = next(g for g in report["gates"] if g["name"] == "target")
    assert gate["passed"] is False and gate["limit"] == 0.01
    assert abs(gate["value"] - abs(report["target"]["achieved"] - 0.5)) < 1e-5
    assert code == ExitCode.GATE_MISSED
    assert "gate target" in capsys.readouterr().out


def test_allow_target_miss_opts_out(coarse, tmp_path):
    model, data = coarse
    spec = tmp_path / "spec.json"
    # Not a speed test: this tiny model's speed gate is off so only the target gate is in play.
    spec.write_text(json.dumps({"gates": {"allow_target_miss": True, "min_speedup": None}}))
    code = _prune(model, data, tmp_path / "out", "--spec", str(spec))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["target"]["met"]
    assert [g["name"] for g in report["gates"]] == [] and code == ExitCode.OK
