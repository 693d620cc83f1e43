"""auto — pick the method by validation, not by hope.

The training split is cut in two: a validation part (`validation_fraction`, drawn at random
with the job's seed) and the rest. Every candidate method runs at the job's budget on the
rest (its calibration inputs and labelled batches come from there), gets a short recovery
(`screen_epochs`, with the job's distillation), and is scored on the validation part. The
candidate with the best validation accuracy wins and is run again on the whole training split,
as a job naming it would run it (the screening chose the method; the pruned network should
not be one whose calibration saw only 85% of the data); that network goes to the pipeline's
full recovery. The test split is never read here: the report's test accuracy is the first
time the chosen model meets it.

Cost: one prune per candidate plus `screen_epochs` of training each, on top of the single
method's prune and recovery; the report's `method_details.auto` gives the seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from typing import Any

import torch

from engine import progressive, recovery
from engine.method import MethodResult, PruneContext
from methods import registry
from methods.auto import AutoParams, parse_candidate

# Carved from the training split only; shared with the recovery's learning-rate choice.
validation_split = recovery.validation_split
validation_accuracy = recovery.validation_accuracy


def _sub_progress(
    progress: Callable[[float, str | None], None], i: int, n: int, name: str
) -> Callable[[float, str | None], None]:
    """Candidate i of n's progress, mapped into the run's [i/n, (i+1)/n] slice."""

    def report(f: float, m: str | None) -> None:
        progress((i + f) / n, f"auto: {name} {m or ''}".strip())

    return report


def _instantiate(candidate: str):
    name, given = parse_candidate(candidate)
    info = registry.get_method(name)
    params = registry.validate_params(name, given)
    module_name, cls_name = info.implementation.split(":")
    return info, getattr(importlib.import_module(module_name), cls_name)(params)


class Auto:
    handles_schedule = True  # each candidate runs with the job's schedule.steps

    def __init__(self, params: AutoParams) -> None:
        self.params = params

    def _screen(
        self,
        ctx: PruneContext,
        sctx: PruneContext,
        name: str,
        extra: recovery.ExtraLoss | None,
        row: dict[str, Any],
    ) -> None:
        """Prune with candidate `name` on the screening context, fine-tune it briefly and
        record its validation accuracy and kept fraction in `row`."""
        info, impl = _instantiate(name)
        if ctx.spec.task not in info.tasks:
            raise ValueError(f"does not support task {ctx.spec.task!r}")
        result = progressive.run(impl, sctx, info.name)
        if result.dynamic or result.recovery == "scratch":
            raise ValueError(
                "not a static fine-tunable result; auto only compares fine-tuned static prunings"
            )
        costs = ctx.costs(result.model.cpu().eval())
        row["kept"] = round(
            costs.macs / ctx.base_costs.macs
            if ctx.spec.target.kind != "params"
            else costs.params / ctx.base_costs.params,
            5,
        )
        recovery.train_epochs(sctx, result.model, self.params.screen_epochs, extra_loss=extra)
        row["val_accuracy"] = round(validation_accuracy(result.model, sctx.data, ctx.device), 5)

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        t_start = time.perf_counter()
        screen = validation_split(ctx.data, p.validation_fraction, ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        calibration = screen.x_train[
            torch.randperm(len(screen.x_train), generator=gen)[: len(ctx.calibration)]
        ]
        kd = recovery.distillation(ctx.spec)
        extra = recovery.distill_loss(ctx.model, kd, ctx.device)
        board: list[dict[str, Any]] = []
        errors: list[Exception] = []
        n = len(p.candidates)
        for i, name in enumerate(p.candidates):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"method": name}
            sctx = dataclasses.replace(
                ctx,
                data=screen,
                calibration=calibration,
                progress=_sub_progress(ctx.progress, i, n, name),
            )
            try:
                self._screen(ctx, sctx, name, extra, row)
            except (
                Exception
            ) as exc:  # a candidate that cannot run is a leaderboard row, not a failed job
                errors.append(exc)
                row["error"] = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                )
            row["seconds"] = round(time.perf_counter() - t0, 2)
            board.append(row)
        ranked = sorted(
            (r for r in board if "val_accuracy" in r),
            key=lambda r: (-r["val_accuracy"], r["seconds"]),
        )
        if not ranked:
            # Every candidate failed: the first one's error says why (an unreachable budget
            # is the same for all of them) and keeps its error code.
            raise errors[0]
        win = ranked[0]
        why = (
            f"highest validation accuracy ({win['val_accuracy']:.4f}) among {len(ranked)} candidate(s) on "
            f"{len(screen.x_test)} held-out training samples after {p.screen_epochs:g} screening epoch(s)"
        )
        if len(ranked) > 1:
            why += f"; runner-up {ranked[1]['method']} at {ranked[1]['val_accuracy']:.4f}"
        total = time.perf_counter() - t_start
        auto_details = {
            "winner": win["method"],
            "why": why,
            "leaderboard": board,
            "validation_samples": len(screen.x_test),
            "screen_epochs": p.screen_epochs,
            "metric": "next-token accuracy"
            if ctx.spec.task == "language_modeling"
            else "top-1 accuracy",
            "seconds": round(total, 2),
            "winner_seconds": win["seconds"],
            "distill": kd,
            "final": "the winner pruned again on the whole training split, as a job naming it",
        }
        note = (
            f"auto chose {win['method']}: {why}. Leaderboard (validation accuracy, seconds): "
            + ", ".join(
                f"{r['method']} {r['val_accuracy']:.4f} {r['seconds']:.1f}s"
                if "val_accuracy" in r
                else f"{r['method']} failed"
                for r in board
            )
            + f". Screening took {total:.1f} s in all, {win['seconds']:.1f} s for the winner alone; "
            "the winner was then pruned again on the whole training split"
        )
        ctx.progress(1.0, f"auto: {win['method']} on the whole training split")
        final = self._winner_on(ctx, win["method"], auto_details, note)
        result = final()
        result.rerun = final
        return result

    @staticmethod
    def _winner_on(
        ctx: PruneContext, candidate: str, auto_details: dict[str, Any], note: str
    ) -> Callable[[], MethodResult]:
        """The winner alone on the job's whole training split (its calibration inputs and
        labelled batches), as a job naming it runs it: the screening chose the method, and the
        pruned network should not be the one that saw only 85% of the data. The never-slower
        comparison calls it again with other widths. Keeps auto's leaderboard and note."""

        def run() -> MethodResult:
            info, impl = _instantiate(candidate)
            again = progressive.run(impl, ctx, info.name)
            again.details = {
                "auto": dict(auto_details),
                **{f"winner_{k}": v for k, v in again.details.items()},
            }
            again.notes.append(note)
            return again

        return run
