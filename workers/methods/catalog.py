"""The method registry: names, parameter schemas, papers and applicability checks.

Torch-free on purpose: the API serves `GET /v1/methods` and validates job specs from this
module without importing the engine. Each entry names its implementation
("module:Class"), which the engine imports only when a job runs it.

Adding a method: write `workers/methods/<name>.py` with a class implementing
`workers.engine.method.Method`, then `register(MethodInfo(...))` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.checks import ModelSummary
from workers.errors import BadSpec, NotApplicable


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


Applicability = Callable[[ModelSummary, str], str | None]
"""(model summary, task) -> None when the method applies, else the reason it does not."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    paper: str
    params: type[MethodParams]
    implementation: str  # "module:Class"
    tasks: tuple[str, ...] = ("classification",)
    applies: Applicability | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "tasks": list(self.tasks),
            "params_schema": self.params.model_json_schema(),
        }


_REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_methods() -> list[MethodInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_method(name: str) -> MethodInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BadSpec(f"unknown method {name!r}; known methods: {known}") from None


def validate_params(name: str, params: dict[str, Any]) -> MethodParams:
    info = get_method(name)
    try:
        return info.params.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}" for e in exc.errors()
        )
        raise BadSpec(f"method {name!r} params are invalid: {problems}") from None


def check_applicable(name: str, summary: ModelSummary, task: str) -> None:
    info = get_method(name)
    if task not in info.tasks:
        raise NotApplicable(f"method {name!r} is not applicable to task {task!r} (it supports {list(info.tasks)})")
    if info.applies is not None:
        reason = info.applies(summary, task)
        if reason:
            raise NotApplicable(f"method {name!r} is not applicable to this model: {reason}")


# ------------------------------------------------------------------ helpers for checks

_CHANNEL_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def needs_prunable_layers(summary: ModelSummary, task: str) -> str | None:
    if not _CHANNEL_OPS & set(summary.op_histogram):
        return "the graph has no Conv, Gemm or MatMul layer whose channels could be pruned"
    return None


def needs_conv(summary: ModelSummary, task: str) -> str | None:
    if "Conv" not in summary.op_histogram:
        return "the graph has no Conv layer"
    return None


# ------------------------------------------------------------------ the methods


Allocation = Literal["uniform", "global"]


class L1NormParams(MethodParams):
    allocation: Allocation = Field(
        default="uniform",
        description="uniform: the same ratio in every prunable layer (Li et al.); "
        "global: one ranking of normalised filter norms across layers. "
        "Per-layer ratios are given with target.layers.",
    )
    normalizer: Literal["none", "mean", "max", "sum"] = Field(
        default="none",
        description="how each coupled layer's filter norms are normalised before the group reduction "
        "(mean: divided by that layer's mean), so that one layer with large weights does not decide "
        "the cut of a residual/concat group; 'none' is the raw norm (best on the zoo together with "
        "inputs=true at 0.5 MACs; 'mean' was best without inputs at 0.25, see benchmarks/accuracy.py)",
    )
    group_reduction: Literal["sum", "mean", "max", "first"] = Field(
        default="sum",
        description="how the coupled layers' (normalised) scores of a channel are combined; "
        "'first' scores the group's root layer only",
    )
    inputs: bool = Field(
        default=True,
        description="also score the input-channel weights of the layers that consume the group "
        "(as Torch-Pruning's GroupMagnitudeImportance does): what the next layer reads from a channel; "
        "false scores only the group's own output filters (Li et al.)",
    )


class RandomParams(MethodParams):
    allocation: Allocation = Field(default="uniform", description="as for l1_norm")


register(
    MethodInfo(
        name="l1_norm",
        summary="Remove the output filters with the smallest L1 norm (coupled channels of a "
        "residual/concat group are scored together).",
        paper="Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017. arXiv:1608.08710",
        params=L1NormParams,
        implementation="workers.methods.l1_norm:L1Norm",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)

register(
    MethodInfo(
        name="random",
        summary="Remove uniformly random channels at the same budget: the control every "
        "real method must beat.",
        paper="Control baseline (see Liu et al., Rethinking the Value of Network Pruning, ICLR 2019)",
        params=RandomParams,
        implementation="workers.methods.l1_norm:RandomChannels",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)


# ------------------------------------------------------------------ data-driven importance and auto (issue 14)


class TaylorParams(MethodParams):
    batches: int = Field(default=16, ge=1, le=10_000, description="labelled training mini-batches the scores are averaged over")
    batch_size: int = Field(default=64, ge=1, le=65_536, description="samples per mini-batch")
    allocation: Allocation = Field(default="uniform", description="as for l1_norm")


register(
    MethodInfo(
        name="taylor",
        summary="Remove the channels with the smallest first-order Taylor estimate of the loss change "
        "(sum of gradient x weight over the removed parameters, squared, averaged over labelled batches).",
        paper="Molchanov, Mallya, Tyree, Frosio, Kautz. Importance Estimation for Neural Network Pruning. "
        "CVPR 2019. arXiv:1906.10771",
        params=TaylorParams,
        implementation="workers.methods.taylor:Taylor",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)

AUTO_CANDIDATES = ["l1_norm", "taylor", "channel_regression"]


class AutoParams(MethodParams):
    candidates: list[str] = Field(
        default_factory=lambda: list(AUTO_CANDIDATES), min_length=1,
        description="methods tried at the job's budget; each is pruned and briefly recovered on the "
        "training data minus a validation split, and the best validation accuracy wins",
    )
    validation_fraction: float = Field(
        default=0.15, gt=0.0, lt=0.5,
        description="share of the training split held out to rank the candidates (never the test split)",
    )
    screen_epochs: float = Field(
        default=1.0, gt=0.0, le=100.0,
        description="recovery epochs each candidate gets before it is ranked (may be a fraction)",
    )

    @field_validator("candidates")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name == "auto":
                raise ValueError("auto cannot be its own candidate")
            if name not in _REGISTRY:
                raise ValueError(f"unknown candidate {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
        return list(dict.fromkeys(v))


register(
    MethodInfo(
        name="auto",
        summary="Try candidate methods cheaply (short recovery) at the job's budget on a validation split "
        "carved from the training data, keep the best and recover it fully; the report keeps the leaderboard.",
        paper="Model selection on held-out training data; candidates' papers as listed for each method",
        params=AutoParams,
        implementation="workers.methods.auto:Auto",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)


# ------------------------------------------------------------------ Rethinking-the-Value methods (issue 4)
# (network_slimming, thinet, channel_regression are registered below this line)


class NetworkSlimmingParams(MethodParams):
    s: float = Field(
        default=1e-4, ge=0.0, le=1.0,
        description="L1 strength: s * sign(gate) is added to every gate's gradient "
        "(paper: 1e-4 for VGG, 1e-5 for ResNet/DenseNet)",
    )
    sparsity_epochs: int = Field(
        default=3, ge=0, le=1000,
        description="epochs of sparsity training (all weights and the gates) before the global threshold",
    )


class ThiNetParams(MethodParams):
    samples_per_image: int = Field(
        default=10, ge=1, le=1000,
        description="random (output channel, position) samples of each consuming layer per image (authors: 10)",
    )
    calibration_images: int = Field(
        default=256, ge=8, le=256, description="training images the samples are drawn from"
    )
    rescale: bool = Field(
        default=True,
        description="least-squares rescale of the consuming layer's kept input channels, w = (X^T X)^-1 X^T y",
    )
    finetune_between_layers: int = Field(
        default=0, ge=0, le=100,
        description="epochs of fine-tuning after each layer is pruned (authors: about 1; 0 = off)",
    )
    reconstruction_target: Literal["current", "original"] = Field(
        default="current",
        description="what the rescale reconstructs: the layer's output in the network pruned so far "
        "(ThiNet) or in the unpruned network (He et al.; absorbs earlier layers' error)",
    )


class ChannelRegressionParams(MethodParams):
    samples: int = Field(
        default=400, ge=16, le=100_000,
        description="sampled positions of each consuming layer's output for the LASSO (authors: <= 400)",
    )
    alpha0: float = Field(
        default=1e-3, gt=0.0, le=10.0,
        description="initial LASSO penalty, doubled until at most the target channel count survives, "
        "then binary-searched to land on it",
    )
    calibration_images: int = Field(
        default=256, ge=8, le=256,
        description="training images whose positions feed the least-squares reconstruction",
    )


register(
    MethodInfo(
        name="network_slimming",
        summary="Sparsity-train per-channel scale gates (L1 subgradient), remove every channel under "
        "one global gate threshold chosen to meet the budget, fold the gates into the weights.",
        paper="Liu, Li, Shen, Huang, Yan, Zhang. Learning Efficient Convolutional Networks through "
        "Network Slimming. ICCV 2017. arXiv:1708.06519",
        params=NetworkSlimmingParams,
        implementation="workers.methods.network_slimming:NetworkSlimming",
        applies=needs_prunable_layers,
    )
)

register(
    MethodInfo(
        name="thinet",
        summary="Layer by layer, greedily remove the channels whose removal least disturbs the next "
        "layer's sampled outputs, then rescale that layer's kept inputs by least squares.",
        paper="Luo, Wu, Lin. ThiNet: A Filter Level Pruning Method for Deep Neural Network "
        "Compression. ICCV 2017. arXiv:1707.06342",
        params=ThiNetParams,
        implementation="workers.methods.thinet:ThiNet",
        applies=needs_prunable_layers,
    )
)

register(
    MethodInfo(
        name="channel_regression",
        summary="Layer by layer, select channels by LASSO regression on their contributions to the "
        "next layer's sampled outputs, then reconstruct that layer's weights by least squares.",
        paper="He, Zhang, Sun. Channel Pruning for Accelerating Very Deep Neural Networks. ICCV 2017. "
        "arXiv:1707.06168",
        params=ChannelRegressionParams,
        implementation="workers.methods.channel_regression:ChannelRegression",
        applies=needs_prunable_layers,
    )
)


# ------------------------------------------------------------------ learned architectures (issue 5)
# (pruning_from_scratch, tas are registered below this line)


class PruningFromScratchParams(MethodParams):
    # `lambda` is a Python keyword: the field is lambda_, spelt "lambda" in specs and reports.
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    lambda_: float = Field(
        default=0.5, ge=0.0, alias="lambda",
        description="weight of the sparsity term lambda * (mean|g| - r)^2 added to the cross-entropy",
    )
    sparsity_level: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="r: the mean gate value the gates are pulled towards"
    )
    gate_epochs: int = Field(default=10, ge=1, le=200, description="epochs of gate learning (weights frozen)")
    gate_lr: float = Field(default=0.01, gt=0.0, le=1.0, description="Adam learning rate of the gates")
    expand: float = Field(
        default=1.0, ge=1.0, le=4.0,
        description="width multiplier applied (by repeating channels) before gate learning; "
        "final widths are capped at the original",
    )


class TASParams(MethodParams):
    width_candidates: list[float] = Field(
        default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], min_length=2,
        description="candidate widths of every prunable group, as fractions of its channels",
    )
    tau_start: float = Field(default=5.0, gt=0.0, description="Gumbel-softmax temperature at the start (annealed)")
    tau_end: float = Field(default=0.1, gt=0.0, description="Gumbel-softmax temperature at the end")
    search_epochs: int = Field(default=10, ge=1, le=500, description="epochs of the alternating search")
    flop_weight: float = Field(default=2.0, ge=0.0, description="weight of the FLOPs loss in the architecture loss")
    kd_alpha: float = Field(default=0.9, ge=0.0, le=1.0, description="distillation weight during recovery")
    kd_temperature: float = Field(default=4.0, gt=0.0, description="distillation temperature during recovery")
    arch_lr: float = Field(default=1e-3, gt=0.0, description="Adam learning rate of the width distributions")
    weight_lr: float = Field(default=0.01, gt=0.0, description="SGD (momentum 0.9) learning rate of the weights during search")
    flop_tolerance: float = Field(
        default=0.05, ge=0.0, lt=1.0,
        description="no FLOPs loss while the argmax architecture is under budget by at most this fraction of the target",
    )

    @field_validator("width_candidates")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < f <= 1.0 for f in v):
            raise ValueError("width candidates are fractions of a layer's channels in (0, 1]")
        return sorted(set(v))


register(
    MethodInfo(
        name="pruning_from_scratch",
        summary="Learn channel gates on randomly initialised, frozen weights; keep the global "
        "top gates to meet the budget and train the architecture from scratch.",
        paper="Wang, Zhang, Zhang, Chang, Wang, Huang. Pruning from Scratch. AAAI 2020. arXiv:1909.12579",
        params=PruningFromScratchParams,
        implementation="workers.methods.pruning_from_scratch:PruningFromScratch",
        applies=needs_prunable_layers,
    )
)

register(
    MethodInfo(
        name="tas",
        summary="Transformable Architecture Search: learn a distribution over widths per layer "
        "(Gumbel-softmax, shared weights, channel-wise interpolation, expected-FLOPs loss), take "
        "the argmax widths and recover with distillation from the original model.",
        paper="Dong, Yang. Network Pruning via Transformable Architecture Search. NeurIPS 2019. arXiv:1905.09717",
        params=TASParams,
        implementation="workers.methods.tas:TAS",
        applies=needs_prunable_layers,
    )
)


# ------------------------------------------------------------------ robust and dynamic (issue 6)
# (anp, sanp are registered below this line)


class AnpParams(MethodParams):
    beta: float = Field(default=1.0, ge=0.0, le=100.0, description="Weight of the KL term (divided by the training-set size).")
    lambda_vs: float = Field(default=1e-4, ge=0.0, le=10.0, description="Weight of the latent vulnerability-suppression loss.")
    epsilon: float = Field(default=0.03, gt=0.0, le=1.0, description="PGD/FGSM L∞ radius as a fraction of the data's value range (0.03 on [0, 1] CIFAR inputs).")
    pgd_step_size: float = Field(default=0.007, gt=0.0, le=1.0, description="PGD step, as a fraction of the data's value range.")
    pgd_steps: int = Field(default=10, ge=1, le=100, description="PGD steps while learning the masks (and in adversarial fine-tuning).")
    eval_pgd_steps: int = Field(default=10, ge=1, le=200, description="PGD steps of the robustness evaluation in the report.")
    mask_epochs: int = Field(default=5, ge=1, le=200, description="Epochs of adversarial mask (and weight) training before pruning.")
    mask_lr: float = Field(default=0.02, gt=0.0, le=1.0, description="Adam learning rate of the mask parameters (softplus a, b).")
    temperature: float = Field(default=0.1, gt=0.0, le=10.0, description="Relaxed-Bernoulli temperature in training.")
    prior_alpha: float = Field(default=1e-4, gt=0.0, le=1.0, description="α of the Beta(α, 1) prior on the keep probabilities.")
    threshold: float = Field(default=1e-3, gt=0.0, lt=1.0, description="E[π] below which the paper drops a channel (reported; the budget decides the cut).")
    allocation: Allocation = Field(default="global", description="How E[π] ranks channels for removal; global lets layers lose different fractions.")
    adversarial_finetune: bool = Field(default=False, description="Recover on (CE_clean + 2·CE_PGD)/3 instead of clean CE only.")


class SanpParams(MethodParams):
    epochs: int = Field(default=5, ge=1, le=200, description="Epochs of joint training (backbone + Saliency-and-Pruning Modules).")
    cost_weight: float = Field(default=5.0, ge=0.0, le=1e4, description="Weight of the squared gap between the batch's mean MACs fraction and the target.")
    spm_lr: float = Field(default=0.003, gt=0.0, le=1.0, description="Adam learning rate of the modules.")
    hidden_ratio: float = Field(default=0.25, gt=0.0, le=4.0, description="Hidden width of each module's FC as a fraction of the layer's channels (at least 4).")
    noise: bool = Field(default=False, description="Logistic noise on the saliency logits during joint training (Gumbel-sigmoid straight-through) instead of the deterministic straight-through estimator.")
    calibrate: bool = Field(default=True, description="Set the decision threshold on the training inputs so the mean MACs meet the budget (after training and after recovery).")


def needs_prunable_conv(summary: ModelSummary, task: str) -> str | None:
    return needs_conv(summary, task) or needs_prunable_layers(summary, task)


register(
    MethodInfo(
        name="anp",
        summary="Adversarial Neural Pruning: beta-Bernoulli channel masks learned on PGD examples with "
        "latent vulnerability suppression; channels with the lowest E[π] are removed to the budget. "
        "The report adds clean/FGSM/PGD accuracy before and after.",
        paper="Madaan, Shin, Hwang. Adversarial Neural Pruning with Latent Vulnerability Suppression. ICML 2020. arXiv:1908.04355",
        params=AnpParams,
        implementation="workers.methods.anp:ANP",
        applies=needs_prunable_layers,
    )
)

register(
    MethodInfo(
        name="sanp",
        summary="Self-Adaptive Network Pruning: a Saliency-and-Pruning Module per conv group predicts "
        "per-sample channel keep/skip decisions; the exported graph is dynamic and the report gives "
        "the measured mean MACs over the evaluation set.",
        paper="Chen, Zhu, Li, Zhao. Self-Adaptive Network Pruning. ICONIP 2019. arXiv:1910.08906",
        params=SanpParams,
        implementation="workers.methods.sanp:SANP",
        applies=needs_prunable_conv,
    )
)


# ------------------------------------------------------------------ language models (issue 6)
# (flop is registered below this line)


class FlopParams(MethodParams):
    epochs: int = Field(default=3, ge=1, le=1000, description="L0 training epochs (gates, weights and multipliers together)")
    lr: float = Field(default=1e-3, gt=0, description="learning rate of the weights (P, Q, the rest of the model)")
    gate_lr: float = Field(default=2e-2, gt=0, description="learning rate (Adam) of the gates' log-alpha")
    lambda_lr: float = Field(default=0.2, gt=0, description="step of the plain gradient ascent on the Lagrange multipliers")
    temperature: float = Field(default=1.0, gt=0, description="hard-concrete temperature")
    init_mean: float = Field(default=0.5, gt=0, lt=1, description="initial deterministic gate value")
    warmup_fraction: float = Field(default=0.5, ge=0, le=1, description="share of the steps over which the target sparsity ramps up from 0")
    include_head: bool = Field(default=False, description="also factorise the output layer (logits)")
    min_rank: int = Field(default=1, ge=1, description="components always kept per factorised layer")


def needs_linear(summary: ModelSummary, task: str) -> str | None:
    if not {"Gemm", "MatMul"} & set(summary.op_histogram):
        return "the graph has no Gemm or MatMul (Linear) layer to factorise"
    return None


register(
    MethodInfo(
        name="flop",
        summary="Factorise every Linear from its SVD as P diag(z) Q with hard-concrete L0 gates on the "
        "rank-one components, control the expected size with an augmented Lagrangian, keep the largest "
        "gates and compile each Linear into two smaller dense ones.",
        paper="Wang, Wohlwend, Lei. Structured Pruning of Large Language Models. EMNLP 2020. arXiv:1910.04732",
        params=FlopParams,
        implementation="workers.methods.flop:Flop",
        tasks=("classification", "language_modeling"),
        applies=needs_linear,
    )
)


class SvdParams(MethodParams):
    include_head: bool = Field(default=False, description="also factorise the output layer (logits)")
    min_rank: int = Field(default=1, ge=1, description="components always kept per factorised layer")


register(
    MethodInfo(
        name="svd",
        summary="Truncated SVD of every Linear at the same rank fraction per layer, compiled into two "
        "dense layers: the low-rank baseline for flop.",
        paper="Baseline of Wang, Wohlwend, Lei 2020 (FLOP); Denton et al. 2014, Exploiting Linear Structure Within CNNs",
        params=SvdParams,
        implementation="workers.methods.flop:TruncatedSVD",
        tasks=("classification", "language_modeling"),
        applies=needs_linear,
    )
)
