"""sanp: Self-Adaptive Network Pruning, per-sample channel gates (Chen et al. 2019).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import MethodInfo, MethodParams, needs_prunable_conv, register


class SanpParams(MethodParams):
    epochs: int = Field(
        default=5,
        ge=1,
        le=200,
        description="Epochs of joint training (backbone + Saliency-and-Pruning Modules).",
    )
    cost_weight: float = Field(
        default=5.0,
        ge=0.0,
        le=1e4,
        description="Weight of the squared gap between the batch's mean MACs fraction and the target.",
    )
    spm_lr: float = Field(
        default=0.003, gt=0.0, le=1.0, description="Adam learning rate of the modules."
    )
    hidden_ratio: float = Field(
        default=0.25,
        gt=0.0,
        le=4.0,
        description="Hidden width of each module's FC as a fraction of the layer's channels (at least 4).",
    )
    noise: bool = Field(
        default=False,
        description="Logistic noise on the saliency logits during joint training (Gumbel-sigmoid straight-through) instead of the deterministic straight-through estimator.",
    )
    calibrate: bool = Field(
        default=True,
        description="Set the decision threshold on the training inputs so the mean MACs meet the budget (after training and after recovery).",
    )


register(
    MethodInfo(
        name="sanp",
        summary="Self-Adaptive Network Pruning: a Saliency-and-Pruning Module per conv group predicts "
        "per-sample channel keep/skip decisions; the exported graph is dynamic and the report gives "
        "the measured mean MACs over the evaluation set.",
        paper="Chen, Zhu, Li, Zhao. Self-Adaptive Network Pruning. ICONIP 2019. arXiv:1910.08906",
        params=SanpParams,
        implementation="methods.sanp.impl:SANP",
        applies=needs_prunable_conv,
    )
)
