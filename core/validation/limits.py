"""The limits every dataset check applies, and the summary a check returns (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_DECODED_BYTES = 4 * 1024**3  # every array the worker will hold, decoded
MAX_RATIO = 200.0  # uncompressed / compressed, per member (above RATIO_FLOOR) and in total
RATIO_FLOOR = 16 * 1024**2  # members smaller than this may compress as well as they like
MAX_MEMBERS = 500_000
MAX_IMAGE_PIXELS = 4096 * 4096  # per image, from its header
MAX_IMAGE_MEMBER_BYTES = 64 * 1024**2
MAX_IMAGE_SIDE = 1024  # bound of image_size (the resize target)
HEADER_PREFIX_BYTES = 256 * 1024  # enough for PNG/JPEG/BMP/GIF/WebP/TIFF headers
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NPY_MAX_HEADER = 10_000
MAX_BUNDLE_MEMBERS = 4096  # a model .zip: the .onnx and its external-data files


@dataclass
class Limits:
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_ratio: float = MAX_RATIO
    max_members: int = MAX_MEMBERS
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass
class DatasetSummary:
    """What the API stores and shows for an upload (the shape of `Dataset.describe()`)."""

    train: int
    test: int
    sample_shape: list[int]
    x_dtype: str
    num_classes: int
    classes: list[str] | None = None
    decoded_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "test": self.test,
            "sample_shape": self.sample_shape,
            "x_dtype": self.x_dtype,
            "num_classes": self.num_classes,
            "classes": self.classes,
        }


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
