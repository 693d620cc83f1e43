"""Cheap dataset invariants, read from headers only: what the API checks at upload.

Nothing here decodes a dataset. An `.npz` is checked from its zip directory and the `.npy`
headers of its members (declared shape × dtype against the bytes the member really holds and
against a decoded-size limit, compression ratio per member); label arrays are streamed in
1 MiB chunks to find the class count. An image archive is checked from its member list
(count, declared sizes, ratio — for tar.gz counted before a member's data is decompressed)
and the image headers (Pillow's lazy `Image.open` reads the size without decoding pixels).

The worker runs the same checks before it decodes anything (`core.validation.datasets.load_dataset`),
so a decompression or decode bomb is refused in both places without ever being expanded.
Torch-free and numpy/Pillow only.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from core.errors import BadDataset
from core.validation.limits import (
    HEADER_PREFIX_BYTES,
    IMAGE_SUFFIXES,
    MAX_IMAGE_MEMBER_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    RATIO_FLOOR,
    DatasetSummary,
    Limits,
)
from core.validation.limits import mb as _mb
from core.validation.npz_checks import inspect_npz

# What callers import from here (the checks' public names, defined in core.validation.limits).
__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "DatasetSummary",
    "Limits",
    "inspect_dataset",
    "inspect_image_archive",
    "inspect_npz",
    "iter_members",
    "safe_member_name",
    "split_class",
]


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
                extracted = tf.extractfile(member)
                if extracted is not None:
                    yield name, member.size, extracted
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
            raise BadDataset(
                f"archive member {str(name)!r} is not a readable image ({exc})"
            ) from None
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
    ((out_h, out_w),) = sizes
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
        return inspect_image_archive(
            path, image_size=image_size, grayscale=grayscale, limits=limits
        )
    raise BadDataset(
        f"{path.name}: unknown dataset format; upload an .npz (x_train, y_train, x_test, y_test) "
        "or a zip/tar of train/<class>/*.png and test/<class>/*.png"
    )
