"""Cheap dataset invariants, read from headers only: what the API checks at upload.

Nothing here decodes a dataset. An `.npz` is checked from its zip directory and the `.npy`
headers of its members (declared shape × dtype against the bytes the member really holds and
against a decoded-size limit, compression ratio per member); label arrays are streamed in
1 MiB chunks to find the class count. An image archive is checked from its member list
(count, declared sizes, ratio — for tar.gz counted before a member's data is decompressed)
and the image headers (Pillow's lazy `Image.open` reads the size without decoding pixels).

The worker runs the same checks before it decodes anything (`workers.datasets.load_dataset`),
so a decompression or decode bomb is refused in both places without ever being expanded.
Torch-free and numpy/Pillow only.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from workers.errors import BadDataset

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


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- .npz


@dataclass
class _Npy:
    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype  # type: ignore[type-arg]
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
            raise BadDataset(f"{key}: not a readable .npy array ({exc}); save with numpy.savez") from None
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
            if info.file_size > RATIO_FLOOR and info.file_size / max(info.compress_size, 1) > limits.max_ratio:
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


def _npz_summary(
    zf: zipfile.ZipFile, layout: str, a: dict[str, _Npy], task: str, split: float, total: int
) -> DatasetSummary:
    def rows(n: _Npy) -> int:
        if not n.shape:
            raise BadDataset(f"{n.key} is a scalar; store arrays with one row per sample")
        return n.shape[0]

    lm = task == "language_modeling"
    if layout == "windows":
        tr, te = a["train"], a["test"]
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
        n_train, n_test = rows(tr), rows(te)
        sample, x_dtype, labels = [tr.shape[1] - 1], str(tr.dtype), hi + 1
    else:
        if layout == "split":
            x_tr, y_tr, x_te, y_te = a["x_train"], a["y_train"], a["x_test"], a["y_test"]
            n_train, n_test = rows(x_tr), rows(x_te)
            if rows(y_tr) != n_train or rows(y_te) != n_test:
                raise BadDataset(
                    f"x and y lengths differ (train {n_train} vs {rows(y_tr)}, "
                    f"test {n_test} vs {rows(y_te)})"
                )
            if x_tr.shape[1:] != x_te.shape[1:]:
                raise BadDataset(
                    f"x_train samples have shape {x_tr.shape[1:]} but x_test samples {x_te.shape[1:]}"
                )
            ys, xs = [y_tr, y_te], [x_tr, x_te]
        else:
            x, y = a["x"], a["y"]
            n = rows(x)
            if rows(y) != n:
                raise BadDataset(f"x has {n} samples but y has {rows(y)}")
            n_test = max(1, int(round(n * split)))
            if n_test >= n:
                raise BadDataset(f"{n} samples are too few to split off a test set")
            n_train = n - n_test
            ys, xs = [y], [x]
        for arr in xs + ys:
            if rows(arr) == 0 or math.prod(arr.shape) == 0:
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
        sample, x_dtype, labels = list(xs[0].shape[1:]), str(xs[0].dtype), hi + 1
    return DatasetSummary(
        train=n_train,
        test=n_test,
        sample_shape=sample,
        x_dtype=x_dtype,
        num_classes=int(labels),
        decoded_bytes=total,
    )


# ---------------------------------------------------------------- image archives


def safe_member_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if (
        p.is_absolute()
        or name.startswith(("/", "\\"))
        or ".." in p.parts
        or (p.parts and ":" in p.parts[0])
    ):
        raise BadDataset(
            f"archive member {name!r} has an unsafe path (absolute or with '..'); refusing the archive"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadDataset(f"archive member {name!r} has control characters in its name")
    return p


def iter_members(
    path: Path, limits: Limits, read_limit: int | None = None
) -> Iterator[tuple[PurePosixPath, int, IO[bytes]]]:
    """Yield (safe path, declared size, open stream) of regular files, refusing bombs, links and
    path escapes before any member's data is expanded. Streams read at most the declared size."""
    compressed = max(path.stat().st_size, 1)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise BadDataset(
                    f"the archive has {len(infos)} members, over the {limits.max_members} limit"
                )
            declared = sum(i.file_size for i in infos)
            if declared > limits.max_decoded_bytes or (
                declared > RATIO_FLOOR and declared / compressed > limits.max_ratio
            ):
                raise BadDataset(
                    f"the archive expands to {_mb(declared)} from {_mb(compressed)} "
                    f"(ratio {declared / compressed:.0f}); refusing a possible zip bomb"
                )
            for info in infos:
                name = safe_member_name(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise BadDataset(
                        f"archive member {info.filename!r} is a symbolic link; refusing the archive"
                    )
                if info.is_dir():
                    continue
                with zf.open(info) as fh:  # zipfile never returns more than file_size bytes
                    yield name, info.file_size, fh
        return
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError):
        raise BadDataset("the archive is neither a zip nor a tar file") from None
    with tf:
        count = total = 0
        try:
            for member in tf:  # the header is read; the data is not decompressed yet
                count += 1
                if count > limits.max_members:
                    raise BadDataset(f"the archive has more than {limits.max_members} members")
                name = safe_member_name(member.name)
                if member.issym() or member.islnk() or member.isdev():
                    raise BadDataset(
                        f"archive member {member.name!r} is a link or device; refusing the archive"
                    )
                if not member.isfile():
                    continue
                total += member.size
                if total > limits.max_decoded_bytes or (
                    total > RATIO_FLOOR and total / compressed > limits.max_ratio
                ):
                    raise BadDataset(
                        f"the archive expands to {_mb(total)} or more from {_mb(compressed)}; "
                        "refusing a possible decompression bomb"
                    )
                fh = tf.extractfile(member)
                if fh is not None:
                    yield name, member.size, fh
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BadDataset(f"the archive is truncated or corrupt ({exc})") from None


def split_class(name: PurePosixPath) -> tuple[str, str] | None:
    """('train'|'test', class) of an image member, or None when it is not one."""
    parts = [p for p in name.parts if p not in ("", ".")]
    if len(parts) == 4 and parts[1] in ("train", "test"):
        parts = parts[1:]
    if len(parts) != 3 or parts[0] not in ("train", "test"):
        return None
    if PurePosixPath(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return parts[0], parts[1]


def check_image_size(image_size: tuple[int, int] | list[int] | None) -> None:
    if image_size is None:
        return
    if len(image_size) != 2 or not all(1 <= int(v) <= MAX_IMAGE_SIDE for v in image_size):
        raise BadDataset(
            f"image_size {list(image_size)}: give (height, width), each between 1 and {MAX_IMAGE_SIDE}"
        )


def inspect_image_archive(
    path: str | os.PathLike[str],
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    limits: Limits | None = None,
) -> DatasetSummary:
    from PIL import Image, UnidentifiedImageError

    limits = limits or Limits()
    check_image_size(image_size)
    channels = 1 if grayscale else 3
    counts = {"train": 0, "test": 0}
    classes: set[str] = set()
    sizes: set[tuple[int, int]] = set()
    decoded = 0
    for name, size, fh in iter_members(Path(path), limits):
        where = split_class(name)
        if where is None:
            continue
        if size > MAX_IMAGE_MEMBER_BYTES:
            raise BadDataset(
                f"archive member {str(name)!r} is {_mb(size)}, over the "
                f"{_mb(MAX_IMAGE_MEMBER_BYTES)} limit per image"
            )
        head = fh.read(min(size, HEADER_PREFIX_BYTES))
        try:
            with Image.open(io.BytesIO(head)) as img:  # lazy: reads the header only
                w, h = img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise BadDataset(f"archive member {str(name)!r} is not a readable image ({exc})") from None
        except Image.DecompressionBombError:
            w = h = 1 << 20
        if w * h > limits.max_image_pixels:
            raise BadDataset(
                f"archive member {str(name)!r} is {w}×{h} = {w * h / 1e6:.0f} Mpx, over the "
                f"{limits.max_image_pixels / 1e6:.0f} Mpx limit per image; downscale it"
            )
        split, cls = where
        counts[split] += 1
        classes.add(cls)
        out_h, out_w = image_size if image_size is not None else (h, w)
        sizes.add((out_h, out_w))
        decoded += out_h * out_w * channels * 4  # float32 CHW
        if decoded > limits.max_decoded_bytes:
            raise BadDataset(
                f"the images decode to more than {_mb(limits.max_decoded_bytes)} as float32; "
                "declare a smaller image_size or upload fewer images"
            )
    if not counts["train"] or not counts["test"]:
        raise BadDataset(
            "the archive needs images under train/<class>/ and test/<class>/ "
            f"(found {counts['train']} train and {counts['test']} test images)"
        )
    if len(sizes) != 1:
        raise BadDataset(
            f"images have different sizes {sorted(sizes)[:4]}; declare data.image_size to resize them"
        )
    (out_h, out_w), = sizes
    ordered = sorted(classes)
    return DatasetSummary(
        train=counts["train"],
        test=counts["test"],
        sample_shape=[channels, out_h, out_w],
        x_dtype="float32",
        num_classes=len(ordered),
        classes=ordered,
        decoded_bytes=decoded,
    )


def inspect_dataset(
    path: str | os.PathLike[str],
    task: str = "classification",
    split: float = 0.2,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    limits: Limits | None = None,
) -> DatasetSummary:
    """Check an uploaded dataset from its headers; never decodes it."""
    path = Path(path)
    if not path.is_file():
        raise BadDataset(f"dataset file {str(path)!r} does not exist")
    if path.suffix == ".npz":
        return inspect_npz(path, task=task, split=split, limits=limits)
    if zipfile.is_zipfile(path) or tarfile.is_tarfile(path):
        if task != "classification":
            raise BadDataset(
                "image archives are for classification; language models take an .npz of token ids"
            )
        return inspect_image_archive(path, image_size=image_size, grayscale=grayscale, limits=limits)
    raise BadDataset(
        f"{path.name}: unknown dataset format; upload an .npz (x_train, y_train, x_test, y_test) "
        "or a zip/tar of train/<class>/*.png and test/<class>/*.png"
    )
