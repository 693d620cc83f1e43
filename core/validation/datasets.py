"""Datasets: `.npz` arrays and image-folder archives, read safely. Torch-free (numpy + Pillow),
so the API validates uploads with the same code the engine loads them with.

* `.npz` is read with `allow_pickle=False`: an object array is refused, never unpickled.
* Archives (zip, tar, tar.gz) are read member by member, never `extractall`-ed: names that
  are absolute, contain `..`, or are links are refused; total size, member count and the
  compression ratio are bounded (zip bombs).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from core.errors import BadDataset
from core.validation.dataset_checks import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    Limits,
    inspect_dataset,
    iter_members,
    split_class,
)

__all__ = ["IMAGE_SUFFIXES", "Dataset", "load_dataset", "load_image_archive", "load_npz"]


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str] | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def vocab_size(self) -> int:
        """Language modelling: one past the largest token id seen."""
        return (
            int(
                max(
                    self.x_train.max(initial=0),
                    self.x_test.max(initial=0),
                    self.y_train.max(initial=0),
                    self.y_test.max(initial=0),
                )
            )
            + 1
        )

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0))) + 1

    def describe(self) -> dict[str, Any]:
        return {
            "train": int(len(self.x_train)),
            "test": int(len(self.x_test)),
            "sample_shape": list(self.sample_shape),
            "x_dtype": str(self.x_train.dtype),
            "num_classes": self.num_classes,
            "classes": self.classes,
        }


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    if n_test >= len(x):
        raise BadDataset(f"{len(x)} samples are too few to split off a test set")
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _check_arrays(ds: Dataset, task: str) -> Dataset:
    for name in ("x_train", "x_test", "y_train", "y_test"):
        arr = getattr(ds, name)
        if arr.dtype == object:
            raise BadDataset(f"{name} is an object array; store plain numeric arrays")
        if arr.size == 0 or len(arr) == 0:
            raise BadDataset(f"{name} is empty")
    if len(ds.x_train) != len(ds.y_train) or len(ds.x_test) != len(ds.y_test):
        raise BadDataset(
            f"x and y lengths differ (train {len(ds.x_train)} vs {len(ds.y_train)}, "
            f"test {len(ds.x_test)} vs {len(ds.y_test)})"
        )
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise BadDataset(
            f"x_train samples have shape {ds.x_train.shape[1:]} but x_test samples {ds.x_test.shape[1:]}"
        )
    if task == "classification":
        for name in ("y_train", "y_test"):
            y = getattr(ds, name)
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise BadDataset(
                    f"{name} must be a 1-D integer array of class indices (got {y.dtype}{list(y.shape)})"
                )
            if y.min() < 0:
                raise BadDataset(f"{name} has negative class indices")
        if not np.issubdtype(ds.x_train.dtype, np.number):
            raise BadDataset(f"x_train has non-numeric dtype {ds.x_train.dtype}")
        if np.issubdtype(ds.x_train.dtype, np.floating):
            if not (np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()):
                raise BadDataset("x contains NaN or infinite values")
    else:  # language_modeling: int token sequences [N, T] and next-token targets [N, T]
        for name in ("x_train", "x_test", "y_train", "y_test"):
            x = getattr(ds, name)
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
                raise BadDataset(f"{name} must be a 2-D integer array of token ids [N, T]")
            if x.min() < 0:
                raise BadDataset(f"{name} has negative token ids")
        if ds.x_train.shape != ds.y_train.shape or ds.x_test.shape != ds.y_test.shape:
            raise BadDataset("token inputs and next-token targets must have the same shape")
    return ds


def load_npz(
    path: str | os.PathLike[str], task: str = "classification", split: float = 0.2, seed: int = 0
) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                ds = Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"])
            elif {"x", "y"} <= keys:
                ds = Dataset(*_split(z["x"], z["y"], split, seed))
            elif task == "language_modeling" and {"train", "test"} <= keys:
                # Token windows of T+1: the model reads [:, :-1] and predicts [:, 1:].
                tr, te = z["train"], z["test"]
                if tr.ndim != 2 or te.ndim != 2 or tr.shape[1] < 2:
                    raise BadDataset(
                        "train and test must be 2-D integer arrays of token windows [N, T+1]"
                    )
                ds = Dataset(tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:])
            else:
                raise BadDataset(
                    f"the .npz holds {sorted(keys)}; it needs x_train, y_train, x_test, y_test "
                    "(or x and y, split by data.split)"
                )
    except BadDataset:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise BadDataset(
                "the .npz contains pickled (object) arrays, which are never loaded; "
                "save plain numeric arrays with numpy.savez"
            ) from None
        raise BadDataset(f"cannot read the .npz: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BadDataset(
            f"cannot read the .npz ({type(exc).__name__}: {exc}); is the file complete?"
        ) from None
    return _check_arrays(ds, task)


# ---------------------------------------------------------------- archives


def _iter_archive(
    path: Path, limits: Limits | None = None
) -> Iterator[tuple[PurePosixPath, bytes]]:
    """Yield (safe relative path, bytes) of regular image files of the archive's splits, with
    the bomb, link and traversal guards of `core.validation.dataset_checks.iter_members`."""
    for name, size, fh in iter_members(path, limits or Limits()):
        if split_class(name) is None:
            continue
        data = fh.read(size + 1)
        if len(data) > size:
            raise BadDataset(f"archive member {str(name)!r} is larger than it declares")
        yield name, data


def load_image_archive(
    path: str | os.PathLike[str],
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Dataset:
    """`train/<class>/*.png` and `test/<class>/*.png` → float32 NCHW arrays."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # decode-bomb guard (headers were checked already)
    splits: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    for name, data in _iter_archive(Path(path)):
        parts = [p for p in name.parts if p not in ("", ".")]
        # Allow one wrapping folder: root/train/cls/img.png
        if len(parts) == 4 and parts[1] in splits:
            parts = parts[1:]
        if len(parts) != 3 or parts[0] not in splits:
            continue
        if PurePosixPath(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(io.BytesIO(data)) as opened:
                img = opened.convert("L" if grayscale else "RGB")
                if image_size is not None:
                    img = img.resize((image_size[1], image_size[0]))
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise BadDataset(
                f"archive member {'/'.join(parts)!r} is not a readable image ({exc})"
            ) from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        splits[parts[0]].append((parts[1], arr))
    if not splits["train"] or not splits["test"]:
        raise BadDataset(
            "the archive needs images under train/<class>/ and test/<class>/ "
            f"(found {len(splits['train'])} train and {len(splits['test'])} test images)"
        )
    classes = sorted({c for c, _ in splits["train"]} | {c for c, _ in splits["test"]})
    index = {c: i for i, c in enumerate(classes)}
    shapes = {a.shape for _, a in splits["train"] + splits["test"]}
    if len(shapes) != 1:
        raise BadDataset(
            f"images have different sizes {sorted(shapes)[:4]}; declare data.image_size to resize them"
        )

    def stack(items: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([a for _, a in items]).astype(np.float32)
        if mean is not None:
            x = x - np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        if std is not None:
            x = x / np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        return x, np.array([index[c] for c, _ in items], dtype=np.int64)

    x_train, y_train = stack(splits["train"])
    x_test, y_test = stack(splits["test"])
    return _check_arrays(
        Dataset(x_train, y_train, x_test, y_test, classes=classes), "classification"
    )


def load_dataset(
    path: str | os.PathLike[str],
    task: str = "classification",
    split: float = 0.2,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Dataset:
    path = Path(path)
    # Headers first: a decompression or decode bomb is refused before anything is expanded.
    inspect_dataset(path, task=task, split=split, image_size=image_size, grayscale=grayscale)
    if path.suffix == ".npz":
        return load_npz(path, task=task, split=split, seed=seed)
    if zipfile.is_zipfile(path) or tarfile.is_tarfile(path):
        if task != "classification":
            raise BadDataset(
                "image archives are for classification; language models take an .npz of token ids"
            )
        return load_image_archive(
            path, image_size=image_size, grayscale=grayscale, mean=mean, std=std
        )
    raise BadDataset(
        f"{path.name}: unknown dataset format; upload an .npz (x_train, y_train, x_test, y_test) "
        "or a zip/tar of train/<class>/*.png and test/<class>/*.png"
    )
