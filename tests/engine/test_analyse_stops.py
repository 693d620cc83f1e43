"""Analyse can never hang: a stuck analyse stops on SIGTERM/SIGINT within seconds and leaves
no temporary folder; its wall-clock budget and the cancel hook reach inside the probe loop;
a group walk that does not settle is excluded with its layer named, not fatal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import cnnkit  # noqa: E402

from engine import bounded, graph  # noqa: E402
from engine.bounded import AnalyseTimeout  # noqa: E402
from engine.graph import search  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# A driver whose zero-equivalence probe never returns and never checks anything: it spins in
# torch kernels, the worst case for a signal (the handler runs between two kernels).
DRIVER = """
import sys, torch
torch.set_num_threads(1)
from engine.graph import search

def stuck(*args, **kwargs):
    x = torch.randn(128, 128)
    while True:
        x = torch.tanh(x @ x)

search.probe_groups = stuck  # where graph.analyse() looks it up
from server_cli.prune import main
sys.exit(main(sys.argv[1:]))
"""


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, cnnkit.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("stop")
    torch.manual_seed(0)
    return cnnkit.export(Small(), d / "small.onnx", 16, False), cnnkit.image_npz(
        d / "d.npz", 16, 16, 8
    )


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"]
)
def test_stuck_analyse_stops_on_signal_and_leaves_nothing(small, tmp_path, sig, code):
    model, data = small
    out = tmp_path / "result"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk'}",
        "PRUNERY_ANALYSE_SECONDS": "3600",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER,
            str(model),
            "--data",
            str(data),
            "--recovery",
            "none",
            "--target-flops",
            "0.5",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        seen = ""
        deadline = time.monotonic() + 240
        while "analyse" not in seen:  # one progress line per stage (stderr is not a tty)
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"exited early: {seen}"
            seen += line
            assert time.monotonic() < deadline, "never reached analyse"
        time.sleep(2)  # now inside the stuck probe
        assert list(tmp_path.glob(".result.tmp-*")), "the run works in a temporary folder"
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == code, err
    assert stopped_in < 30
    assert "interrupted; nothing was written" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".result.tmp-*"))


def _spinning_probe(calls: list[int]):
    def probe(model, example, batch, plan, budget=None, reference_shape=None):
        while True:  # as the bounded group walk does: work, and check the budget as it goes
            calls[0] += 1
            budget.check()

    return probe


def test_analyse_budget_names_where_it_gave_up(monkeypatch):
    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(Small().eval())
    monkeypatch.setattr(search, "probe_groups", _spinning_probe([0]))
    x = torch.randn(4, 3, 16, 16)
    t0 = time.monotonic()
    with pytest.raises(AnalyseTimeout) as info:
        graph.analyse(model, x[:1], x, seconds=1.0)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert (
        "budget of 1 s" in msg and "proving groups safe" in msg and "probing body.2, body.0" in msg
    )


def test_cancel_reaches_inside_analyse(monkeypatch):
    """The worker's progress reporter raises to cancel; analyse calls it while it works."""

    class Cancelled(Exception):
        pass

    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(Small().eval())
    calls = [0]
    monkeypatch.setattr(search, "probe_groups", _spinning_probe(calls))
    messages: list[str] = []
    t0 = time.monotonic()

    def progress(fraction: float, message: str | None = None) -> None:
        messages.append(message or "")
        if time.monotonic() - t0 > 1.5:
            raise Cancelled

    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(Cancelled):
        graph.analyse(model, x[:1], x, progress=progress, seconds=600)
    assert time.monotonic() - t0 < 10 and calls[0] > 0
    assert any("coupling channels: layer 1 of" in m for m in messages)
    assert any("proving groups safe: 0 of 2 settled" in m for m in messages)


def test_a_walk_that_does_not_settle_is_excluded_not_fatal(monkeypatch):
    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(Small().eval())
    monkeypatch.setattr(bounded, "STEPS_PER_NODE", 0)
    monkeypatch.setattr(bounded, "ITEMS_PER_NODE", 0)
    monkeypatch.setattr(bounded, "MIN_STEPS", 1)
    x = torch.randn(4, 3, 16, 16)
    analysis = graph.analyse(model, x[:1], x)
    reasons = dict(analysis.excluded)
    assert "does not settle" in reasons["body.0"] and "body.0" in reasons["body.0"]
