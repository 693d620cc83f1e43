"""thinet: greedy channel selection by the next layer's reconstruction error (Luo et al. 2017).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from methods.registry import MethodInfo, MethodParams, needs_prunable_layers, register


class ThiNetParams(MethodParams):
    samples_per_image: int = Field(
        default=10,
        ge=1,
        le=1000,
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
        default=0,
        ge=0,
        le=100,
        description="epochs of fine-tuning after each layer is pruned (authors: about 1; 0 = off)",
    )
    reconstruction_target: Literal["current", "original"] = Field(
        default="current",
        description="what the rescale reconstructs: the layer's output in the network pruned so far "
        "(ThiNet) or in the unpruned network (He et al.; absorbs earlier layers' error)",
    )


register(
    MethodInfo(
        name="thinet",
        summary="Layer by layer, greedily remove the channels whose removal least disturbs the next "
        "layer's sampled outputs, then rescale that layer's kept inputs by least squares.",
        paper="Luo, Wu, Lin. ThiNet: A Filter Level Pruning Method for Deep Neural Network "
        "Compression. ICCV 2017. arXiv:1707.06342",
        params=ThiNetParams,
        implementation="methods.thinet.impl:ThiNet",
        applies=needs_prunable_layers,
    )
)
