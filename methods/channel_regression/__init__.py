"""channel_regression: LASSO channel selection + least-squares reconstruction (He et al. 2017).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from methods.registry import MethodInfo, MethodParams, needs_prunable_layers, register


class ChannelRegressionParams(MethodParams):
    samples: int = Field(
        default=400,
        ge=16,
        le=100_000,
        description="sampled positions of each consuming layer's output for the LASSO (authors: <= 400)",
    )
    alpha0: float = Field(
        default=1e-3,
        gt=0.0,
        le=10.0,
        description="initial LASSO penalty, doubled until at most the target channel count survives, "
        "then binary-searched to land on it",
    )
    allocation: Literal["uniform", "global"] = Field(
        default="uniform",
        description="how many channels each layer loses: 'uniform' (the same fraction everywhere, "
        "as the paper) or 'global' (one ranking of the LASSO scores, each normalised by its "
        "layer's mean)",
    )
    calibration_images: int = Field(
        default=256,
        ge=8,
        le=256,
        description="training images whose positions feed the least-squares reconstruction",
    )


register(
    MethodInfo(
        name="channel_regression",
        summary="Layer by layer, select channels by LASSO regression on their contributions to the "
        "next layer's sampled outputs, then reconstruct that layer's weights by least squares.",
        paper="He, Zhang, Sun. Channel Pruning for Accelerating Very Deep Neural Networks. ICCV 2017. "
        "arXiv:1707.06168",
        params=ChannelRegressionParams,
        implementation="methods.channel_regression.impl:ChannelRegression",
        applies=needs_prunable_layers,
    )
)
