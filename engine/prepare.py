"""The pipeline's first stages: check the spec, load (dataset, model, conversion proof),
analyse (prunable groups) → `Prepared`, from which `Prepared.context()` gives the methods'
`PruneContext`. Tests, benchmarks and the CLI start here too, so they prune exactly what a
job prunes."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import BaseModel

from core.errors import BadDataset, BadSpec, NotApplicable
from core.validation import datasets
from core.validation import onnx_checks as checks
from core.validation.interface import check_logits_cover_labels
from engine import analysis as analysis_mod
from engine import export as export_mod
from engine import graph, heads, inputs, load, train
from engine.budget import BudgetUnreachable
from engine.flops import Costs, torch_costs
from engine.method import Method, MethodCatalog, MethodInfo, PruneContext
from engine.tracker import StageProgress, Tracker
from prunery.analysis import Analysis as PublicAnalysis
from prunery.spec import JobSpec


@dataclass
class Loaded:
    """The load stage's output: the converted model and the tensors it is pruned with."""

    model: load.LoadedModel
    data: train.TensorData
    sample_shape: tuple[int, ...]
    vocab: int | None  # token ids go up to vocab - 1 (language modelling)
    evaluation: dict[str, Any]  # the report's `evaluation` block
    example: torch.Tensor  # one training sample, batch 1


@dataclass
class Prepared:
    """Everything before pruning: the method, the loaded model and data, the analysis."""

    spec: JobSpec
    info: MethodInfo
    params: BaseModel
    method: Method
    loaded: Loaded
    calibration: torch.Tensor
    analysis: graph.Analysis
    public_analysis: PublicAnalysis
    base_costs: Costs
    device: torch.device
    notes: list[str]  # the report's notes, in order (later stages append)

    @property
    def module(self) -> torch.fx.GraphModule:
        return self.loaded.model.module

    @property
    def data(self) -> train.TensorData:
        return self.loaded.data

    @property
    def example(self) -> torch.Tensor:
        return self.loaded.example

    def rebind(self, spec: JobSpec, catalog: MethodCatalog) -> Prepared:
        """The same loaded, analysed model for another spec (method, target, recovery):
        benchmarks compare many configurations on one preparation. The analysis is reused
        (round_to and seed come from the first spec), except for whole-attention-head groups,
        which follow the new method: dropped for a method that does not prune heads (it
        would be handed groups it cannot score: taylor, thinet and channel_regression failed
        on every ViT this way), added for one that does."""
        info, params, method = instantiate(spec, catalog)
        analysis = self.analysis
        had_heads = any(heads.is_head_group(g.name) for g in analysis.groups)
        wants_heads = bool(getattr(method, "prunes_heads", False))
        if had_heads and not wants_heads:
            analysis = dataclasses.replace(
                analysis,
                groups=[g for g in analysis.groups if not heads.is_head_group(g.name)],
            )
        elif wants_heads and not had_heads and not getattr(self.method, "prunes_heads", False):
            head_groups, head_excluded = heads.analyse(
                self.module, self.example, self.calibration[:16], self.spec.seed
            )
            analysis = dataclasses.replace(
                analysis,
                groups=[*analysis.groups, *head_groups],
                excluded=[*analysis.excluded, *head_excluded],
            )
        return dataclasses.replace(
            self,
            spec=spec,
            info=info,
            params=params,
            method=method,
            analysis=analysis,
            notes=list(self.notes),
        )

    def context(
        self, progress: StageProgress | None = None, *, spec: JobSpec | None = None
    ) -> PruneContext:
        """The methods' view (`spec` replaces the job's, e.g. another method or target on
        the same prepared model)."""
        spec = spec or self.spec
        return PruneContext(
            spec=spec,
            model=self.module,
            example=self.example,
            calibration=self.calibration,
            data=self.data,
            analysis=self.analysis,
            base_costs=self.base_costs,
            device=self.device,
            seed=spec.seed,
            progress=progress or (lambda f, m: None),
            source_names=dict(self.loaded.model.source_names),
            train_batch=spec.recovery.batch_for(len(self.data.x_train)),
        )


def instantiate(spec: JobSpec, catalog: MethodCatalog) -> tuple[MethodInfo, BaseModel, Method]:
    """The spec's method from the catalog: its entry, validated params and implementation."""
    info = catalog.get_method(spec.method.name)
    params = catalog.validate_params(spec.method.name, spec.method.params)
    if spec.task not in info.tasks:
        raise NotApplicable(
            f"method {info.name!r} does not support task {spec.task!r} (supports {list(info.tasks)})"
        )
    module_name, cls_name = info.implementation.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return info, params, cls(params)


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph input/output batch dims are symbolic (for batch-32 timing)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    return m


def _check_outputs(out: torch.Tensor, loaded: Loaded, num_classes: int, lm: bool) -> None:
    """The model's logits fit the task and the dataset's labels or token ids."""
    if lm:
        vocab = loaded.vocab or 0
        if out.dim() != 3 or out.shape[1] != loaded.example.shape[1]:
            raise BadDataset(
                f"language modelling needs logits of shape [batch, tokens, vocab]; the model outputs {list(out.shape)}"
            )
        check_logits_cover_labels("language_modeling", vocab, int(out.shape[2]))
    elif out.dim() != 2:
        raise BadDataset(
            f"classification needs logits of shape [batch, classes]; the model outputs {list(out.shape)}"
        )
    else:  # the same check (and message) the API applies at submit to the uploads' records
        check_logits_cover_labels("classification", num_classes, int(out.shape[1]))


def load_inputs(
    spec: JobSpec,
    model_path: Path | str,
    data_path: Path | str,
    catalog: MethodCatalog,
    tracker: Tracker,
    notes: list[str],
    *,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    eval_data_path: Path | str | None = None,
) -> Loaded:
    """The load stage: dataset (and evaluation set), model conversion with its parity proof,
    the method's applicability to this graph, the logits' shape."""
    lm = spec.task == "language_modeling"
    ds = datasets.load_dataset(
        data_path,
        task=spec.task,
        split=spec.data.split,
        seed=spec.seed,
        image_size=spec.data.image_size,
        grayscale=spec.data.grayscale,
        mean=spec.data.mean,
        std=spec.data.std,
    )
    ds, evaluation = inputs.with_evaluation_set(ds, eval_data_path, spec.task, spec.data, spec.seed)
    tracker.report(
        "load",
        0.3,
        f"dataset: {len(ds.x_train)} train / {len(ds.x_test)} evaluation samples ({evaluation['dataset']})",
    )
    vocab = ds.vocab_size if lm else None
    model = load.load(
        Path(model_path),
        ds.sample_shape,
        max_bytes=max_model_bytes,
        seed=spec.seed,
        input_high=vocab,
    )
    catalog.check_applicable(
        spec.method.name, checks.summarize(model.onnx_model, model.file_bytes), spec.task
    )
    notes.extend(model.notes)
    ds, cast_note = inputs.float_images(ds, model.input_dtype, spec.data)
    notes.extend([cast_note] if cast_note else [])
    data = train.TensorData.from_numpy(ds)
    if data.x_train.dtype != torch.float32 and data.x_train.is_floating_point():
        data.x_train, data.x_test = data.x_train.float(), data.x_test.float()
    loaded = Loaded(
        model, data, tuple(ds.sample_shape), vocab, evaluation, data.x_train[:1].clone()
    )
    with torch.no_grad():
        out = model.module(loaded.example)
    _check_outputs(out, loaded, ds.num_classes, lm)
    tracker.report(
        "load", 1.0, f"converted; torch vs onnxruntime relative error {model.parity_rel:.1e}"
    )
    return loaded


def analyse(
    spec: JobSpec,
    loaded: Loaded,
    method: Method,
    catalog: MethodCatalog,
    progress: StageProgress,
) -> tuple[torch.Tensor, graph.Analysis, PublicAnalysis]:
    """The analyse stage: calibration inputs, prunable groups (whole attention heads for the
    methods that prune heads) and the public analysis."""
    module, example = loaded.model.module, loaded.example
    gen = torch.Generator().manual_seed(spec.seed)
    calib_idx = torch.randperm(len(loaded.data.x_train), generator=gen)[:256]
    calibration = loaded.data.x_train[calib_idx]
    analysis = graph.analyse(
        module,
        example,
        calibration[:16],
        round_to=spec.export.round_to,
        seed=spec.seed,
        progress=progress,
    )
    analysis.lifted = loaded.model.lifted
    if getattr(method, "prunes_heads", False):  # whole attention heads (heads.py)
        head_groups, head_excluded = heads.analyse(module, example, calibration[:16], spec.seed)
        analysis.groups.extend(head_groups)
        analysis.excluded.extend(head_excluded)
    public = analysis_mod.summarize(
        module,
        example,
        analysis,
        checks.summarize(loaded.model.onnx_model, loaded.model.file_bytes),
        spec.task,
        spec.export.round_to,
        catalog=catalog,
    )
    return calibration, analysis, public


def prepare(
    spec: JobSpec,
    model_path: Path | str,
    data_path: Path | str,
    *,
    catalog: MethodCatalog,
    device: str | None = None,
    tracker: Tracker | None = None,
    out_dir: Path | None = None,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    eval_data_path: Path | str | None = None,
) -> Prepared:
    """Check the spec, load and analyse. With `out_dir`, `analysis.json` is written before
    pruning (so a job that fails with budget_unreachable still has it)."""
    tracker = tracker or Tracker()
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    dev = train.pick_device(device)
    tracker.report("load", 0.0, "checking the spec")
    if spec.task == "language_modeling" and spec.gates.max_accuracy_drop is not None:
        raise BadSpec(
            "gates.max_accuracy_drop applies to classification; language models report bits per token and perplexity"
        )
    info, params, method = instantiate(spec, catalog)
    notes: list[str] = []
    loaded = load_inputs(
        spec,
        model_path,
        data_path,
        catalog,
        tracker,
        notes,
        max_model_bytes=max_model_bytes,
        eval_data_path=eval_data_path,
    )
    tracker.begin("analyse")
    calibration, analysis, public = analyse(spec, loaded, method, catalog, tracker.sink("analyse"))
    if out_dir is not None:
        export_mod.save_atomic(
            public.model_dump_json(indent=2).encode(), Path(out_dir) / "analysis.json"
        )
    if not analysis.groups:
        reasons = "; ".join(f"{n}: {r}" for n, r in analysis.excluded[:5])
        raise BudgetUnreachable(f"no layer of this model can be pruned safely ({reasons})")
    base_costs = torch_costs(loaded.model.module, loaded.example)
    tracker.report(
        "analyse", 1.0, f"{len(analysis.groups)} prunable groups, {len(analysis.excluded)} excluded"
    )
    return Prepared(
        spec, info, params, method, loaded, calibration, analysis, public, base_costs, dev, notes
    )
