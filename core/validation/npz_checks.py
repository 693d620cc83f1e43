"""Checks of an `.npz` dataset from its zip directory and `.npy` headers (never decoded):
declared shape × dtype against the bytes each member holds and the decoded-size limit, the
compression ratio, and label/token ranges streamed in 1 MiB chunks."""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BadDataset
from core.validation.limits import NPY_MAX_HEADER, RATIO_FLOOR, DatasetSummary, Limits
from core.validation.limits import mb as _mb


@dataclass
class _Npy:
    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    nbytes: int


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> _Npy:
    with zf.open(info) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh, NPY_MAX_HEADER)
            elif version in ((2, 0), (3, 0)):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh, NPY_MAX_HEADER)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile) as exc:
            raise BadDataset(
                f"{key}: not a readable .npy array ({exc}); save with numpy.savez"
            ) from None
        header_len = fh.tell()
    if dtype.hasobject:
        raise BadDataset(
            f"{key} is an object (pickled) array, which is never loaded; save plain numeric arrays"
        )
    if dtype.kind not in "biuf":
        raise BadDataset(f"{key} has dtype {dtype}; store integer or float arrays")
    if any(d < 0 for d in shape):
        raise BadDataset(f"{key} declares a negative dimension {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size - header_len:
        raise BadDataset(
            f"{key} declares shape {list(shape)} of {dtype} ({_mb(nbytes)}) but the member holds "
            f"only {_mb(max(0, info.file_size - header_len))}; the file is corrupt or hostile"
        )
    return _Npy(key, info, tuple(int(d) for d in shape), dtype, nbytes)


def _stream_minmax(zf: zipfile.ZipFile, npy: _Npy, chunk: int = 1 << 20) -> tuple[int, int]:
    """Min and max of an integer array, read in chunks (memory stays at one chunk)."""
    lo, hi = None, None
    step = max(npy.dtype.itemsize, chunk - chunk % npy.dtype.itemsize)
    with zf.open(npy.info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(fh, NPY_MAX_HEADER)
        else:
            np.lib.format.read_array_header_2_0(fh, NPY_MAX_HEADER)
        left = npy.nbytes
        while left > 0:
            data = fh.read(min(step, left))
            if not data:
                raise BadDataset(f"{npy.key} is truncated")
            left -= len(data)
            arr = np.frombuffer(data, dtype=npy.dtype)
            if arr.size:
                a, b = int(arr.min()), int(arr.max())
                lo = a if lo is None else min(lo, a)
                hi = b if hi is None else max(hi, b)
    return (lo or 0, hi or 0)


def inspect_npz(
    path: str | os.PathLike[str],
    task: str = "classification",
    split: float = 0.2,
    limits: Limits | None = None,
) -> DatasetSummary:
    limits = limits or Limits()
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadDataset(f"cannot read the .npz ({exc}); is the file complete?") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > 64:
            raise BadDataset(f"the .npz has {len(infos)} members; a dataset needs at most 4 arrays")
        members = {i.filename[:-4]: i for i in infos if i.filename.endswith(".npy")}
        keys = set(members)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            layout, wanted = "split", ["x_train", "y_train", "x_test", "y_test"]
        elif {"x", "y"} <= keys:
            layout, wanted = "xy", ["x", "y"]
        elif task == "language_modeling" and {"train", "test"} <= keys:
            layout, wanted = "windows", ["train", "test"]
        else:
            raise BadDataset(
                f"the .npz holds {sorted(keys)}; it needs x_train, y_train, x_test, y_test "
                "(or x and y, split by data.split)"
            )
        arrays: dict[str, _Npy] = {}
        total = 0
        for key in wanted:
            info = members[key]
            if (
                info.file_size > RATIO_FLOOR
                and info.file_size / max(info.compress_size, 1) > limits.max_ratio
            ):
                raise BadDataset(
                    f"{key} expands from {_mb(info.compress_size)} to {_mb(info.file_size)} "
                    f"(ratio {info.file_size / max(info.compress_size, 1):.0f} > {limits.max_ratio:.0f}); "
                    "refusing a possible decompression bomb"
                )
            npy = _npy_header(zf, info, key)
            total += npy.nbytes
            if total > limits.max_decoded_bytes:
                raise BadDataset(
                    f"the arrays declare {_mb(total)} or more decoded, over the "
                    f"{_mb(limits.max_decoded_bytes)} limit; upload a smaller dataset"
                )
            arrays[key] = npy
        if total > RATIO_FLOOR and total / max(path.stat().st_size, 1) > limits.max_ratio:
            raise BadDataset(
                f"the arrays expand to {_mb(total)} from a {_mb(path.stat().st_size)} file; "
                "refusing a possible decompression bomb"
            )
        return _npz_summary(zf, layout, arrays, task, split, total)


def _rows(n: _Npy) -> int:
    if not n.shape:
        raise BadDataset(f"{n.key} is a scalar; store arrays with one row per sample")
    return n.shape[0]


def _npz_summary(
    zf: zipfile.ZipFile, layout: str, a: dict[str, _Npy], task: str, split: float, total: int
) -> DatasetSummary:
    if layout == "windows":
        n_train, n_test, sample, x_dtype, labels = _windows_summary(zf, a["train"], a["test"])
    else:
        n_train, n_test, sample, x_dtype, labels = _xy_summary(zf, layout, a, task, split)
    return DatasetSummary(
        train=n_train,
        test=n_test,
        sample_shape=sample,
        x_dtype=x_dtype,
        num_classes=int(labels),
        decoded_bytes=total,
    )


_Shape = tuple[int, int, list[int], str, int]  # train, test, sample shape, x dtype, labels


def _windows_summary(zf: zipfile.ZipFile, tr: _Npy, te: _Npy) -> _Shape:
    """Language-model token windows [N, T+1]."""
    for n in (tr, te):
        if len(n.shape) != 2 or n.dtype.kind not in "iu" or n.shape[1] < 2:
            raise BadDataset("train and test must be 2-D integer arrays of token windows [N, T+1]")
    if tr.shape[1] != te.shape[1]:
        raise BadDataset(f"train windows have {tr.shape[1]} tokens but test windows {te.shape[1]}")
    lo = hi = 0
    for n in (tr, te):
        x, y = _stream_minmax(zf, n)
        lo, hi = min(lo, x), max(hi, y)
    if lo < 0:
        raise BadDataset("the token windows have negative token ids")
    return _rows(tr), _rows(te), [tr.shape[1] - 1], str(tr.dtype), hi + 1


def _xy_arrays(
    layout: str, a: dict[str, _Npy], split: float
) -> tuple[int, int, list[_Npy], list[_Npy]]:
    """(train rows, test rows, inputs, labels) of the split or the x/y layout."""
    if layout == "split":
        x_tr, y_tr, x_te, y_te = a["x_train"], a["y_train"], a["x_test"], a["y_test"]
        n_train, n_test = _rows(x_tr), _rows(x_te)
        if _rows(y_tr) != n_train or _rows(y_te) != n_test:
            raise BadDataset(
                f"x and y lengths differ (train {n_train} vs {_rows(y_tr)}, "
                f"test {n_test} vs {_rows(y_te)})"
            )
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise BadDataset(
                f"x_train samples have shape {x_tr.shape[1:]} but x_test samples {x_te.shape[1:]}"
            )
        return n_train, n_test, [x_tr, x_te], [y_tr, y_te]
    x, y = a["x"], a["y"]
    n = _rows(x)
    if _rows(y) != n:
        raise BadDataset(f"x has {n} samples but y has {_rows(y)}")
    n_test = max(1, int(round(n * split)))
    if n_test >= n:
        raise BadDataset(f"{n} samples are too few to split off a test set")
    return n - n_test, n_test, [x], [y]


def _xy_summary(
    zf: zipfile.ZipFile, layout: str, a: dict[str, _Npy], task: str, split: float
) -> _Shape:
    lm = task == "language_modeling"
    n_train, n_test, xs, ys = _xy_arrays(layout, a, split)
    for arr in xs + ys:
        if _rows(arr) == 0 or math.prod(arr.shape) == 0:
            raise BadDataset(f"{arr.key} is empty")
    if lm:
        for arr in xs + ys:
            if len(arr.shape) != 2 or arr.dtype.kind not in "iu":
                raise BadDataset(f"{arr.key} must be a 2-D integer array of token ids [N, T]")
        for xa, ya in zip(xs, ys, strict=True):
            if xa.shape != ya.shape:
                raise BadDataset("token inputs and next-token targets must have the same shape")
    else:
        for ya in ys:
            if len(ya.shape) != 1 or ya.dtype.kind not in "iu":
                raise BadDataset(
                    f"{ya.key} must be a 1-D integer array of class indices "
                    f"(got {ya.dtype}{list(ya.shape)})"
                )
    lo = hi = 0
    for arr in ys + (xs if lm else []):
        x_lo, x_hi = _stream_minmax(zf, arr)
        lo, hi = min(lo, x_lo), max(hi, x_hi)
    if lo < 0:
        raise BadDataset(
            "the labels have negative class indices" if not lm else "negative token ids"
        )
    return n_train, n_test, list(xs[0].shape[1:]), str(xs[0].dtype), hi + 1
