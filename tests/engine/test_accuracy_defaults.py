"""Known answers for issue 14: layer-normalised group importance, first-order Taylor,
`auto` (validation carved from training data, test split never read), progressive steps and
distillation by default."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import zoo
from engine import graph, importance, progressive, recovery, train
from engine.flops import torch_costs
from engine.method import PruneContext
from methods import registry
from methods.auto import AutoParams
from methods.auto import impl as auto_mod
from methods.l1_norm import L1NormParams
from methods.l1_norm.impl import L1Norm
from prunery.spec import JobSpec

torch.set_num_threads(1)


class TwoBranch(nn.Module):
    """stem -> (a(h) + b(h)) -> pool -> fc: conv `a` and conv `b` share one channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = torch.relu(self.a(h) + self.b(h))
        return self.fc(y.mean((2, 3)))


def _group_of(
    model: nn.Module, example: torch.Tensor, layer: str
) -> tuple[object, graph.ChannelGroup]:
    dg = graph.build_dependency_graph(model, example)
    group = graph.full_group(model, dg, layer)
    return dg, graph.ChannelGroup(layer, len(group[0].idxs), [])


def test_layer_normalisation_stops_a_layer_with_uniformly_large_weights_deciding_the_cut():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    with torch.no_grad():
        # `a`: uniformly large filters (L1 1000..1700, ~40x `b`'s); `b`: ordinary filters
        # except channels 2 and 5, which are dead (and happen to be `a`'s largest).
        a_l1 = torch.tensor([1000.0, 1100, 1700, 1200, 1300, 1600, 1400, 1500])
        a = torch.rand(8, 8, 3, 3) + 1.0
        a = a / a.flatten(1).sum(1)[:, None, None, None] * a_l1[:, None, None, None]
        model.a.weight.copy_(a)
        b = torch.rand(8, 8, 3, 3)
        b[[2, 5]] = 0.0
        model.b.weight.copy_(b)
    example = torch.randn(1, 1, 8, 8)
    dg, g = _group_of(model, example, "a")
    raw = importance.magnitude(model, dg, [g], normalizer="none", group_reduction="sum")["a"]
    normalised = importance.magnitude(model, dg, [g], normalizer="mean", group_reduction="sum")["a"]
    two_lowest = lambda s: set(torch.argsort(s)[:2].tolist())  # noqa: E731
    # The raw group sum follows `a` alone: it cuts 0 and 1 and keeps the dead channels.
    assert two_lowest(raw) == {0, 1}
    # Normalised per layer before the sum, the dead channels of `b` go first.
    assert two_lowest(normalised) == {2, 5}
    # The raw setting reproduces the engine's old group sum exactly.
    from methods.base.scoring import filter_l1

    assert torch.allclose(raw, graph.channel_scores(model, dg, "a", filter_l1), rtol=1e-5)


def test_taylor_scores_a_channel_the_network_ignores_lowest():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    ).eval()
    ignored = 3
    with torch.no_grad():
        model[0].weight[ignored] *= 10.0  # the largest filter by far ...
        model[2].weight[:, ignored] = (
            0.0  # ... whose output nothing reads: removing it changes nothing
        )
    data = zoo.digits_arrays()
    x = torch.from_numpy(data["x_train"][:256])
    y = torch.from_numpy(data["y_train"][:256]).long()
    example = x[:1]
    dg, g = _group_of(model, example, "0")
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    scores = importance.taylor(model, example, [g], batches, train.task_loss, torch.device("cpu"))[
        "0"
    ]
    assert int(torch.argmin(scores)) == ignored
    assert float(scores[ignored]) <= 1e-12 * float(scores.max())
    l1 = importance.magnitude(model, dg, [g], normalizer="none")["0"]
    assert int(torch.argmax(l1)) == ignored  # a weight norm would keep it first
    assert model[0].weight.grad is None  # the caller's model is not touched


class _TestSplitGuard(train.TensorData):
    """Training data whose test split raises on any read."""

    def __getattribute__(self, name: str):
        if name in ("x_test", "y_test"):
            raise AssertionError(f"the test split ({name}) was read")
        return super().__getattribute__(name)


def _small_ctx(spec: JobSpec, data: train.TensorData, trained: bool = True) -> PruneContext:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    if trained:
        train.train(
            model,
            train.TensorData(data.x_train, data.y_train, data.x_train[:1], data.y_train[:1]),
            epochs=2,
            lr=3e-3,
            device=torch.device("cpu"),
        )
    example = data.x_train[:1]
    analysis = graph.analyse(model, example, data.x_train[:16])
    return PruneContext(
        spec=spec,
        model=model,
        example=example,
        calibration=data.x_train[:128],
        data=data,
        analysis=analysis,
        base_costs=torch_costs(model, example),
        device=torch.device("cpu"),
        seed=0,
        progress=lambda f, m: None,
    )


def _digits(guarded: bool) -> train.TensorData:
    d = zoo.digits_arrays()
    xs = [torch.from_numpy(d[k]) for k in ("x_train", "x_test")]
    ys = [torch.from_numpy(d[k]).long() for k in ("y_train", "y_test")]
    cls = _TestSplitGuard if guarded else train.TensorData
    return cls(xs[0], ys[0], xs[1], ys[1])


def test_auto_ranks_candidates_on_a_validation_split_and_never_reads_the_test_split():
    spec = JobSpec(target={"flops": 0.5}, recovery={"epochs": 1})
    assert spec.method.name == "auto" and spec.recovery.distill.enabled  # the defaults
    data = _digits(guarded=True)
    ctx = _small_ctx(spec, data)
    params = AutoParams(screen_epochs=0.5)
    result = auto_mod.Auto(params).run(ctx)
    board = result.details["auto"]["leaderboard"]
    assert [r["method"] for r in board] == params.candidates
    ok = [r for r in board if "val_accuracy" in r]
    assert ok, board
    best = max(ok, key=lambda r: r["val_accuracy"])
    assert result.details["auto"]["winner"] == best["method"]
    assert abs(torch_costs(result.model, ctx.example).macs / ctx.base_costs.macs - 0.5) <= 0.01
    assert any("auto chose" in n for n in result.notes)
    # The model is the winner's on the whole training split, as a job naming it would prune:
    # the same widths and weights (the screening ran on 85% of it, calibration included).
    info, impl = auto_mod._instantiate(best["method"])
    named = progressive.run(impl, ctx, info.name).model
    assert [m.weight.shape for m in result.model.modules() if hasattr(m, "weight")] == [
        m.weight.shape for m in named.modules() if hasattr(m, "weight")
    ]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            result.model.state_dict().values(), named.state_dict().values(), strict=True
        )
    )


def test_auto_candidates_may_carry_parameters():
    """'method:key=value[,key=value]' screens a configured method: validated by the method's
    own params model when the spec is read, run with them, named so on the leaderboard."""
    assert auto_mod.parse_candidate("channel_regression:allocation=global, samples=200") == (
        "channel_regression",
        {"allocation": "global", "samples": "200"},
    )
    for bad, says in (
        ("channel_regression:allocation=sideways", "allocation: Input should be 'uniform'"),
        ("channel_regression:allocation", "write its parameters as method:key=value"),
        ("nope:x=1", "unknown candidate 'nope'"),
    ):
        with pytest.raises(ValidationError, match=says):
            AutoParams(candidates=[bad])
    spec = JobSpec(target={"flops": 0.5}, recovery={"epochs": 1})
    ctx = _small_ctx(spec, _digits(guarded=True))
    cands = ["l1_norm", "l1_norm:allocation=global"]
    result = auto_mod.Auto(AutoParams(candidates=cands, screen_epochs=0.25)).run(ctx)
    board = result.details["auto"]["leaderboard"]
    assert [r["method"] for r in board] == cands and all("val_accuracy" in r for r in board)
    assert board[0]["kept"] == pytest.approx(0.5, abs=0.01)
    assert board[1]["kept"] == pytest.approx(0.5, abs=0.01)


def test_validation_split_is_carved_from_training_data_only():
    data = _digits(guarded=True)
    screen = auto_mod.validation_split(data, 0.2, seed=0)
    n = len(data.x_train)
    assert len(screen.x_train) + len(screen.x_test) == n
    assert abs(len(screen.x_test) - 0.2 * n) <= 1
    rows = {tuple(r.tolist()) for r in data.x_train.flatten(1)}
    assert all(
        tuple(r.tolist()) in rows for r in screen.x_test.flatten(1)
    )  # validation rows come from train


def test_progressive_steps_reach_the_target_with_the_epochs_shared_out():
    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"flops": 0.4},
        recovery={"epochs": 3},
        schedule={"steps": 3},
    )
    ctx = _small_ctx(spec, _digits(guarded=False))
    result = progressive.run(L1Norm(L1NormParams()), ctx, "l1_norm")
    hist = result.details["progressive"]["history"]
    assert [round(h["target"], 4) for h in hist] == [round(0.4 ** (i / 3), 4) for i in (1, 2, 3)]
    kept = [h["kept"] for h in hist]
    assert kept[0] > kept[1] > kept[2] and abs(kept[2] - 0.4) <= 0.01
    assert abs(torch_costs(result.model, ctx.example).macs / ctx.base_costs.macs - 0.4) <= 0.01
    assert result.recovery_epochs == pytest.approx(
        1.0
    )  # 3 epochs: 1 after step 1, 1 after step 2, 1 final
    assert [h["recovery_epochs"] for h in hist] == [1.0, 1.0, 0.0]


def test_progressive_steps_cut_attention_heads_step_by_step(zoo_model, digits_npz):
    """Each step re-reads every group's width from the network pruned so far; a head group's
    width is its remaining heads (the ViT's `...proj/Linear#heads` is not a module: the second
    step used to fail with AttributeError)."""
    from engine.heads import heads_of
    from engine.prepare import prepare
    from engine.stages import prune

    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"flops": 0.5},
        recovery={"epochs": 2, "lr": 1e-3},
        schedule={"steps": 2},
    )
    prep = prepare(spec, zoo_model("vit"), digits_npz, catalog=registry, device="cpu")
    assert any(g.name.endswith("#heads") for g in prep.analysis.groups)
    pruned = prune(prep, lambda _f, _m: None)
    hist = pruned.result.details["progressive"]["history"]
    assert [h["step"] for h in hist] == [1, 2] and hist[0]["kept"] > hist[1]["kept"]
    assert abs(pruned.costs.macs / prep.base_costs.macs - 0.5) <= 0.01
    before, after = heads_of(prep.module), heads_of(pruned.model)
    assert set(before) == set(after) and all(after[k] <= before[k] for k in before)


def test_widths_chosen_again_are_pruned_progressively_too(zoo_model, digits_npz, monkeypatch):
    """When the whole-network check keeps the other width set, that re-run is progressive as
    the first run was: before, it called the method once, so a job with schedule.steps = 2
    shipped a one-step pruning whenever the coarse widths won (a timing-dependent CI failure)."""
    from engine import stages
    from engine.prepare import prepare

    def keep_the_rerun(lat, timer, rerun, first, *args, **kwargs):
        lat.mode = "coarse"
        return rerun(), {"checks": [], "kept": "coarse"}

    monkeypatch.setattr(stages.latency_mod, "ensure_faster", keep_the_rerun)
    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"flops": 0.5},
        recovery={"epochs": 2, "lr": 1e-3},
        schedule={"steps": 2},
    )
    prep = prepare(spec, zoo_model("vgg"), digits_npz, catalog=registry, device="cpu")
    pruned = stages.prune(prep, lambda _f, _m: None)
    hist = pruned.result.details["progressive"]["history"]
    assert [h["step"] for h in hist] == [1, 2] and hist[0]["kept"] > hist[1]["kept"]
    assert pruned.result.recovery_epochs == 1.0  # the last step's share, not all of them


def test_distillation_is_on_by_default_and_switchable_off():
    on = JobSpec(method={"name": "l1_norm"}, target={"flops": 0.5})
    off = JobSpec(
        method={"name": "l1_norm"}, target={"flops": 0.5}, recovery={"distill": {"enabled": False}}
    )
    assert recovery.distillation(on) == {
        "alpha": 0.5,
        "temperature": 2.0,
        "source": "recovery.distill",
    }
    assert recovery.distillation(off) is None
    # a method's own distillation (TAS) wins over the spec's
    assert recovery.distillation(off, {"alpha": 0.9, "temperature": 4.0})["source"] == "method"


def test_auto_job_reports_its_leaderboard_and_the_distillation_used(
    zoo_model, digits_npz, tmp_path, monkeypatch
):
    from engine import run

    screened: list[str] = []
    screen = auto_mod.Auto._screen

    def spy(self, ctx, sctx, name, extra, row):
        screened.append(name)
        return screen(self, ctx, sctx, name, extra, row)

    monkeypatch.setattr(auto_mod.Auto, "_screen", spy)
    # Two cheap candidates keep this fast; the default candidates run in tests/test_registry.py.
    method = {"name": "auto", "params": {"candidates": ["l1_norm", "taylor"], "screen_epochs": 0.5}}
    spec = JobSpec(method=method, target={"flops": 0.5}, recovery={"epochs": 1})
    report = run(
        spec, zoo_model("vgg"), digits_npz, tmp_path / "out", latency_runs=20, catalog=registry
    )
    assert report.method["name"] == "auto"
    auto = report.method_details["auto"]
    assert auto["winner"] in [r["method"] for r in auto["leaderboard"]] and auto["why"]
    assert auto["validation_samples"] > 0 and auto["seconds"] >= auto["winner_seconds"]
    assert report.recovery["distill_used"] == {
        "alpha": 0.5,
        "temperature": 2.0,
        "source": "recovery.distill",
    }
    assert any("distilled" in n for n in report.notes) and any(
        "auto chose" in n for n in report.notes
    )
    assert report.target.met
    # The never-slower comparison timed the other width set too, and re-ran only the winner:
    # each candidate was screened once.
    assert len(report.method_details["latency_widths"]["checks"]) >= 2
    assert screened == ["l1_norm", "taylor"]


def test_cli_defaults_to_auto_and_takes_no_distill_and_steps(tmp_path):
    from server_cli import prune as local

    base = ["m.onnx", "--data", "d.npz", "--target-flops", "0.5", "--out", str(tmp_path)]
    spec = local.build_spec(local.build_parser().parse_args(base))
    assert spec.method.name == "auto" and spec.recovery.distill.enabled and spec.schedule.steps == 1
    spec = local.build_spec(
        local.build_parser().parse_args(
            [*base, "--method", "taylor", "--no-distill", "--steps", "3"]
        )
    )
    assert (
        spec.method.name == "taylor"
        and not spec.recovery.distill.enabled
        and spec.schedule.steps == 3
    )


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (
            {"method": {"name": "tas"}, "target": {"flops": 0.5}, "schedule": {"steps": 2}},
            "scores channels",
        ),
        (
            {
                "method": {"name": "l1_norm"},
                "target": {"layers": {"0": 0.5}},
                "schedule": {"steps": 2},
            },
            "target.layers",
        ),
        (
            {
                "method": {"name": "l1_norm"},
                "target": {"flops": 0.5},
                "schedule": {"steps": 2},
                "recovery": {"mode": "scratch"},
            },
            "scratch",
        ),
    ],
)
def test_progressive_refuses_what_it_cannot_step(spec, fragment):
    from core.errors import BadSpec

    ctx = _small_ctx(JobSpec.model_validate(spec), _digits(guarded=False), trained=False)
    with pytest.raises(BadSpec, match=fragment):
        progressive.run(object(), ctx, spec["method"]["name"])


def test_recovery_learning_rate_is_chosen_on_validation_and_never_reads_the_test_split():
    """recovery.lr null (the default): each of lr_choices fine-tunes its own copy on the
    training split minus a validation part; a learning rate too small to move the weights
    (1e-9) cannot beat one that recovers the pruned network, a diverging one is a row of the
    table, not a failed job, and the test split is never read."""
    assert JobSpec(target={"flops": 0.5}).recovery.choosing_lr()  # the default
    assert not JobSpec(target={"flops": 0.5}, recovery={"lr": 1e-3}).recovery.choosing_lr()
    assert not JobSpec(
        target={"flops": 0.5}, recovery={"lr_choices": [2e-3]}
    ).recovery.choosing_lr()
    spec = JobSpec(target={"flops": 0.25}, recovery={"epochs": 1})
    ctx = _small_ctx(spec, _digits(guarded=True))
    pruned = copy.deepcopy(ctx.model)  # a damaged network: its classifier re-initialised
    torch.manual_seed(1)
    pruned[6].reset_parameters()
    before = copy.deepcopy(pruned.state_dict())
    lr, d = recovery.choose_lr(ctx, pruned, [1e-9, 3e-3, 10.0], 1.0)
    rows = {r["lr"]: r for r in d["table"]}
    assert lr == 3e-3 and d["chosen"] == 3e-3
    assert rows[3e-3]["val_accuracy"] > rows[1e-9]["val_accuracy"] + 0.05
    assert "val_accuracy" in rows[10.0] or "diverged" in rows[10.0]["error"]
    assert d["validation_samples"] == round(0.15 * len(_digits(guarded=False).x_train))
    # each choice trained its own copy: the model handed in is untouched
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    # ties go to the earlier choice (identical learning rates score the same)
    assert recovery.choose_lr(ctx, pruned, [3e-3, 3e-3], 0.25)[0] == 3e-3
    assert recovery.choose_lr(ctx, pruned, [2e-3, 3e-3], 0.0)[0] == 2e-3  # no training: a tie


def test_a_job_reports_the_chosen_learning_rate_and_an_explicit_one_skips_the_choice(
    zoo_model, digits_npz, tmp_path
):
    from engine import run

    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"flops": 0.5},
        recovery={"epochs": 1, "lr_choices": [1e-9, 3e-3], "lr_screen_epochs": 0.5},
        gates={"min_speedup": None},
    )
    report = run(
        spec, zoo_model("vgg"), digits_npz, tmp_path / "a", latency_runs=5, catalog=registry
    )
    choice = report.recovery["lr_choice"]
    assert report.recovery["lr"] is None and report.recovery["lr_used"] == 3e-3
    assert [r["lr"] for r in choice["table"]] == [1e-9, 3e-3] and choice["chosen"] == 3e-3
    assert choice["screen_epochs"] == 0.5 and choice["validation_samples"] > 0
    assert any(
        "recovery learning rate 0.003, chosen by top-1 accuracy" in n
        and "then fine-tuned on the whole training split" in n
        for n in report.notes
    )
    assert "lr 0.003 (chosen on validation)" in (tmp_path / "a" / "report.md").read_text()
    html = (tmp_path / "a" / "report.html").read_text()
    assert "lr 0.003 chosen on validation" in html and "Learning rates tried" in html
    # The default: each choice is scored after the whole fine-tune's epochs.
    whole = spec.model_copy(
        update={"recovery": spec.recovery.model_copy(update={"lr_screen_epochs": None})}
    )
    report = run(
        whole, zoo_model("vgg"), digits_npz, tmp_path / "w", latency_runs=5, catalog=registry
    )
    assert report.recovery["lr_used"] == 3e-3 and report.recovery["lr_choice"]["screen_epochs"] == 1
    assert any("after 1 epoch(s) each" in n for n in report.notes)
    fixed = spec.model_copy(update={"recovery": spec.recovery.model_copy(update={"lr": 2e-3})})
    report = run(
        fixed, zoo_model("vgg"), digits_npz, tmp_path / "b", latency_runs=5, catalog=registry
    )
    assert report.recovery["lr_used"] == 2e-3 and report.recovery["lr_choice"] is None
    assert not any("recovery learning rate" in n for n in report.notes)


def test_default_batch_gives_a_small_training_split_enough_steps(monkeypatch):
    """recovery.batch_size null: 64, halved (not below 16) while an epoch would be fewer than
    40 steps; decided once from the job's whole training split, so a screening part of it
    (auto, the learning-rate choice) trains with the final fine-tune's batch."""
    import dataclasses

    rec = JobSpec(target={"flops": 0.5}).recovery
    assert rec.batch_size is None and rec.method_batch == 64
    sizes = (50_000, 2560, 2559, 1437, 1280, 1279, 400, 3, None)
    assert [rec.batch_for(n) for n in sizes] == [64, 64, 32, 32, 32, 16, 16, 16, 64]
    given = JobSpec(target={"flops": 0.5}, recovery={"batch_size": 8}).recovery
    assert given.batch_for(1437) == 8 and given.method_batch == 8

    spec = JobSpec(method={"name": "l1_norm"}, target={"flops": 0.5})
    ctx = _small_ctx(spec, _digits(guarded=False), trained=False)
    assert len(ctx.data.x_train) == 1437 and ctx.batch_size == 32
    half = recovery.validation_split(ctx.data, 0.5, 0)  # 718 samples: alone, 16
    assert dataclasses.replace(ctx, data=half).batch_size == 16
    job = dataclasses.replace(ctx, train_batch=ctx.batch_size)
    screen = dataclasses.replace(job, data=half)
    seen: list[int] = []
    monkeypatch.setattr(train, "train", lambda *a, **kw: seen.append(kw["batch_size"]) or [])
    screen.train(ctx.model, 1)
    assert seen == [32]  # the job's batch, not the screening part's
