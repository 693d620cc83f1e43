"""network_slimming: sparsity-trained channel gates, one global threshold (Liu et al. 2017).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import MethodInfo, MethodParams, needs_prunable_layers, register


class NetworkSlimmingParams(MethodParams):
    s: float = Field(
        default=1e-4,
        ge=0.0,
        le=1.0,
        description="L1 strength: s * sign(gate) is added to every gate's gradient "
        "(paper: 1e-4 for VGG, 1e-5 for ResNet/DenseNet)",
    )
    sparsity_epochs: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="epochs of sparsity training (all weights and the gates) before the global threshold",
    )


register(
    MethodInfo(
        name="network_slimming",
        summary="Sparsity-train per-channel scale gates (L1 subgradient), remove every channel under "
        "one global gate threshold chosen to meet the budget, fold the gates into the weights.",
        paper="Liu, Li, Shen, Huang, Yan, Zhang. Learning Efficient Convolutional Networks through "
        "Network Slimming. ICCV 2017. arXiv:1708.06519",
        params=NetworkSlimmingParams,
        implementation="methods.network_slimming.impl:NetworkSlimming",
        applies=needs_prunable_layers,
    )
)
