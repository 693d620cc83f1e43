"""anp: Adversarial Neural Pruning (Madaan et al. 2020).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import Allocation, MethodInfo, MethodParams, needs_prunable_layers, register


class AnpParams(MethodParams):
    beta: float = Field(
        default=1.0,
        ge=0.0,
        le=100.0,
        description="Weight of the KL term (divided by the training-set size).",
    )
    lambda_vs: float = Field(
        default=1e-4,
        ge=0.0,
        le=10.0,
        description="Weight of the latent vulnerability-suppression loss.",
    )
    epsilon: float = Field(
        default=0.03,
        gt=0.0,
        le=1.0,
        description="PGD/FGSM L∞ radius as a fraction of the data's value range (0.03 on [0, 1] CIFAR inputs).",
    )
    pgd_step_size: float = Field(
        default=0.007,
        gt=0.0,
        le=1.0,
        description="PGD step, as a fraction of the data's value range.",
    )
    pgd_steps: int = Field(
        default=10,
        ge=1,
        le=100,
        description="PGD steps while learning the masks (and in adversarial fine-tuning).",
    )
    eval_pgd_steps: int = Field(
        default=10,
        ge=1,
        le=200,
        description="PGD steps of the robustness evaluation in the report.",
    )
    mask_epochs: int = Field(
        default=5,
        ge=1,
        le=200,
        description="Epochs of adversarial mask (and weight) training before pruning.",
    )
    mask_lr: float = Field(
        default=0.02,
        gt=0.0,
        le=1.0,
        description="Adam learning rate of the mask parameters (softplus a, b).",
    )
    temperature: float = Field(
        default=0.1, gt=0.0, le=10.0, description="Relaxed-Bernoulli temperature in training."
    )
    prior_alpha: float = Field(
        default=1e-4,
        gt=0.0,
        le=1.0,
        description="α of the Beta(α, 1) prior on the keep probabilities.",
    )
    threshold: float = Field(
        default=1e-3,
        gt=0.0,
        lt=1.0,
        description="E[π] below which the paper drops a channel (reported; the budget decides the cut).",
    )
    allocation: Allocation = Field(
        default="global",
        description="How E[π] ranks channels for removal; global lets layers lose different fractions.",
    )
    adversarial_finetune: bool = Field(
        default=False, description="Recover on (CE_clean + 2·CE_PGD)/3 instead of clean CE only."
    )


register(
    MethodInfo(
        name="anp",
        summary="Adversarial Neural Pruning: beta-Bernoulli channel masks learned on PGD examples with "
        "latent vulnerability suppression; channels with the lowest E[π] are removed to the budget. "
        "The report adds clean/FGSM/PGD accuracy before and after.",
        paper="Madaan, Shin, Hwang. Adversarial Neural Pruning with Latent Vulnerability Suppression. ICML 2020. arXiv:1908.04355",
        params=AnpParams,
        implementation="methods.anp.impl:ANP",
        applies=needs_prunable_layers,
    )
)
