"""What the engine feeds the model: integer image arrays made float the way the spec
declares, and the evaluation split (the job's own test split, or a separate evaluation
dataset when the job names one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BadDataset
from core.validation import datasets
from core.validation.datasets import Dataset
from prunery.spec import DataSpec


def float_images(ds: Dataset, input_dtype: type, data: DataSpec) -> tuple[Dataset, str | None]:
    """A float model fed integer arrays (uint8 images, say): cast to float32, multiply by
    `data.scale` (default 1/255 for uint8, 1 for other integers), then subtract `data.mean`
    and divide by `data.std` per channel when declared. Integer models (token ids) and
    float arrays are left as they are. Returns the dataset and a note for the report."""
    if not np.issubdtype(np.dtype(input_dtype), np.floating) or not np.issubdtype(
        ds.x_train.dtype, np.integer
    ):
        return ds, None
    kind = ds.x_train.dtype
    scale = data.scale if data.scale is not None else (1.0 / 255.0 if kind == np.uint8 else 1.0)

    def convert(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32) * np.float32(scale)
        if x.ndim >= 2 and (data.mean is not None or data.std is not None):
            channels = x.shape[1]
            for name, values in (("mean", data.mean), ("std", data.std)):
                if values is not None and len(values) not in (1, channels):
                    raise BadDataset(
                        f"data.{name} has {len(values)} values but the samples have {channels} channels (axis 1)"
                    )
            shape = (1, -1) + (1,) * (x.ndim - 2)
            if data.mean is not None:
                out = out - np.asarray(data.mean, dtype=np.float32).reshape(shape)
            if data.std is not None:
                out = out / np.asarray(data.std, dtype=np.float32).reshape(shape)
        return out

    ds = replace(ds, x_train=convert(ds.x_train), x_test=convert(ds.x_test))
    how = (
        f"x{scale:g}"
        + (f", minus mean {data.mean}" if data.mean else "")
        + (f", over std {data.std}" if data.std else "")
    )
    return (
        ds,
        f"the {kind} inputs were cast to float32 ({how}) for the float model; set data.scale/mean/std to change that",
    )


def with_evaluation_set(
    ds: Dataset, eval_path: Path | str | None, task: str, data: DataSpec, seed: int
) -> tuple[Dataset, dict[str, Any]]:
    """Replace the test split by a separate evaluation dataset: its test split (x_test/y_test,
    or an archive's test/ folder), or every sample of an .npz that holds only x and y.
    Everything measured "on the test split" (accuracy, metrics, latency inputs, robustness)
    then uses it. Returns the dataset and the report's `evaluation` block."""
    if eval_path is None:
        return ds, {"dataset": "test split", "samples": int(len(ds.x_test))}
    eval_path = Path(eval_path)
    whole = False
    if eval_path.suffix == ".npz":
        try:
            with np.load(eval_path, allow_pickle=False) as z:
                keys = set(z.files)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise BadDataset(f"cannot read the evaluation dataset: {exc}") from None
        whole = {"x", "y"} <= keys and not {"x_test", "y_test"} <= keys
    ev = datasets.load_dataset(
        eval_path,
        task=task,
        split=data.split,
        seed=seed,
        image_size=data.image_size,
        grayscale=data.grayscale,
        mean=data.mean,
        std=data.std,
    )
    x, y = (
        (np.concatenate([ev.x_train, ev.x_test]), np.concatenate([ev.y_train, ev.y_test]))
        if whole
        else (ev.x_test, ev.y_test)
    )
    if x.shape[1:] != ds.x_test.shape[1:]:
        raise BadDataset(
            f"the evaluation dataset's samples have shape {list(x.shape[1:])} but the training dataset's "
            f"have {list(ds.x_test.shape[1:])}; they must match"
        )
    if x.dtype != ds.x_test.dtype:
        x = x.astype(ds.x_test.dtype)
    return replace(ds, x_test=x, y_test=y), {
        "dataset": "evaluation dataset",
        "file": eval_path.name,
        "split": "all samples" if whole else "its test split",
        "samples": int(len(x)),
    }
