"""A model whose weights live in external-data files (`model.onnx` + `model.onnx.data`, what
`torch.onnx.export` writes by default for large models), uploaded as one `.zip`, made into one
self-contained `.onnx` (torch-free).

The archive is hostile until proven otherwise: it is read member by member with the guards of
`dataset_checks.iter_members` (no absolute or `..` names, no links, member count, the declared
total against the model size limit, the compression ratio), never `extractall`-ed; the one
`.onnx` inside is then checked by `onnx_checks.load_checked`, which loads external data only
from inside the unpacked folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import onnx

from core.errors import BadDataset, BadModel
from core.validation.dataset_checks import iter_members
from core.validation.limits import MAX_BUNDLE_MEMBERS, MAX_RATIO, Limits
from core.validation.onnx_checks import DEFAULT_MAX_MODEL_BYTES, load_checked

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first bytes (an empty zip: the end record)
_PROTOBUF_LIMIT = 2**31 - 1  # one serialized ModelProto cannot be larger


def is_zip(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in ZIP_MAGIC


def _unpack(zip_path: Path, into: Path, max_bytes: int) -> list[Path]:
    """Write the archive's regular files under `into` (safe names only); returns the .onnx ones."""
    limits = Limits(
        max_decoded_bytes=max_bytes, max_ratio=MAX_RATIO, max_members=MAX_BUNDLE_MEMBERS
    )
    if not zipfile.is_zipfile(zip_path):  # iter_members would try it as a tar next
        raise BadModel(
            "the .zip cannot be unpacked (no zip directory at its end); is the file complete?"
        )
    models: list[Path] = []
    seen: set[str] = set()
    try:
        for name, size, fh in iter_members(zip_path, limits):
            parts = [p for p in name.parts if p not in ("", ".")]
            if not parts:
                continue
            key = "/".join(parts).lower()
            if key in seen:
                raise BadModel(f"the .zip holds {str(name)!r} twice; refusing the archive")
            seen.add(key)
            target = into.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with open(target, "xb") as out:  # "x": never through anything already there
                while block := fh.read(1 << 20):
                    written += len(block)
                    if written > size:
                        raise BadModel(f"archive member {str(name)!r} is larger than it declares")
                    out.write(block)
            if target.suffix.lower() == ".onnx":
                models.append(target)
    except BadDataset as exc:  # the archive guards speak of datasets' archives: same words
        raise BadModel(exc.message) from None
    except (OSError, EOFError) as exc:
        raise BadModel(
            f"the .zip cannot be unpacked ({type(exc).__name__}: {exc}); is the file complete?"
        ) from None
    return models


def embed_bundle(
    zip_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> str:
    """Check a .zip holding exactly one .onnx and the external-data files it names, and write
    the model to `out_path` as one self-contained .onnx. Returns the .onnx member's file name.

    `max_bytes` bounds the unpacked archive and the resulting file alike."""
    zip_path, out_path = Path(zip_path), Path(out_path)
    work = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_path.parent))
    try:
        models = _unpack(zip_path, work, max_bytes)
        if len(models) != 1:
            found = ", ".join(str(m.relative_to(work)) for m in models) or "none"
            raise BadModel(
                f"the .zip must hold exactly one .onnx file (found {found}), with the external "
                "data file(s) it names beside it"
            )
        model = load_checked(models[0], max_bytes=max_bytes)  # external data: inside `work` only
        if model.ByteSize() > min(max_bytes, _PROTOBUF_LIMIT):
            raise BadModel(
                f"the model with its weights embedded is {model.ByteSize() / 1e6:.1f} MB, over the "
                f"{min(max_bytes, _PROTOBUF_LIMIT) / 1e6:.0f} MB a single .onnx file may hold here"
            )
        onnx.save_model(model, str(out_path), save_as_external_data=False)
        return models[0].name
    finally:
        shutil.rmtree(work, ignore_errors=True)
