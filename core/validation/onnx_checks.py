"""Light ONNX checks that need no torch: used by the API at upload and by the engine at load.

They refuse what must never reach the converter: files over the size limit, truncated or
invalid protobufs, external-data references that escape the upload's directory, opsets
outside the supported range, and graphs without a float tensor input.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from core.errors import BadModel

MIN_OPSET = 11
# onnx 1.23 knows opsets up to 24/25; torch.onnx.export's default is 18 or newer. Accept what
# the onnx package itself can check, and convert down before conversion where needed.
MAX_OPSET = onnx.defs.onnx_opset_version()
DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3

# How to turn a model with external data into one file, quoted wherever one is refused
# (`onnx_bundle` accepts the .zip).
EMBED_RECIPE = (
    "upload a .zip holding the .onnx and its data file(s), or embed the weights in one file: "
    "m = onnx.load('model.onnx'); onnx.save_model(m, 'model_embedded.onnx', "
    "save_as_external_data=False) (or export with torch.onnx.export(..., external_data=False))"
)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str | None]
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype}


@dataclass
class ModelSummary:
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    parameter_count: int
    file_bytes: int
    producer: str = ""
    external_data: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "op_histogram": self.op_histogram,
            "parameter_count": self.parameter_count,
            "file_bytes": self.file_bytes,
            "producer": self.producer,
        }


def _shape(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _dtype(value_info: onnx.ValueInfoProto) -> str:
    elem = value_info.type.tensor_type.elem_type
    return TensorProto.DataType.Name(elem).lower() if elem else "unknown"


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise BadModel(
        "the model imports no default-domain ('ai.onnx') opset; re-export it with torch.onnx.export"
    )


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[str]:
    """Every external-data location must be a plain relative path inside base_dir."""
    base = base_dir.resolve()
    locations: list[str] = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts or "\\" in loc:
            raise BadModel(
                f"initializer {tensor.name!r} points to external data {loc!r} outside the upload; "
                f"{EMBED_RECIPE}"
            )
        target = (base / loc).resolve()
        if base not in target.parents:
            raise BadModel(f"external data {loc!r} of {tensor.name!r} escapes the upload directory")
        if not target.is_file():
            raise BadModel(
                f"initializer {tensor.name!r} needs external data file {loc!r}, which is not "
                f"beside the .onnx file (it was not uploaded with it); {EMBED_RECIPE}"
            )
        locations.append(loc)
    return locations


def load_checked(
    path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> onnx.ModelProto:
    """Load an ONNX file with every check applied; external data is loaded only from inside
    the file's own directory."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise BadModel(
            "the model file is empty; upload the .onnx file written by torch.onnx.export"
        )
    if size > max_bytes:
        raise BadModel(
            f"the model file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit"
        )
    with open(path, "rb") as fh:
        if fh.read(4) == b"PK\x03\x04":
            raise BadModel(
                "this is a .zip, not an .onnx file; give the .onnx itself with its external data "
                "file(s) beside it (`prunery prune` and the API's POST /v1/models take such a .zip)"
            )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BadModel(
            f"this is not a readable ONNX file ({type(exc).__name__}: {exc}); it may be truncated "
            "or not ONNX at all: re-export it and upload the complete file"
        ) from None
    if not model.graph.node:
        raise BadModel("the ONNX graph has no nodes: is this the right file?")
    external = check_external_data(model, path.parent)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    opset = model_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadModel(
            f"opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}; "
            f"re-export with torch.onnx.export(..., opset_version=17)"
        )
    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadModel(f"onnx.checker rejected the model: {first}") from None
    initializer_names = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in initializer_names]
    if not real_inputs:
        raise BadModel("the model has no graph inputs")
    if not any(i.type.tensor_type.elem_type in _FLOAT_TYPES for i in real_inputs):
        # Language models take int64 token ids: allowed; anything else is not a network we prune.
        if not any(
            i.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)
            for i in real_inputs
        ):
            raise BadModel("the model has no float or integer tensor input")
    if not model.graph.output:
        raise BadModel("the model has no outputs")
    return model


def summarize(
    model: onnx.ModelProto, file_bytes: int, external: list[str] | None = None
) -> ModelSummary:
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [
        TensorInfo(i.name, _shape(i), _dtype(i))
        for i in model.graph.input
        if i.name not in initializer_names
    ]
    outputs = [TensorInfo(o.name, _shape(o), _dtype(o)) for o in model.graph.output]
    hist = collections.Counter(node.op_type for node in model.graph.node)
    params = 0
    for t in model.graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            n = 1
            for d in t.dims:
                n *= int(d)
            params += n
    return ModelSummary(
        opset=model_opset(model),
        inputs=inputs,
        outputs=outputs,
        op_histogram=dict(sorted(hist.items())),
        parameter_count=params,
        file_bytes=file_bytes,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        external_data=external or [],
    )


def inspect_model(
    path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_MODEL_BYTES
) -> ModelSummary:
    """Validate an uploaded ONNX file and describe it (no torch needed)."""
    model = load_checked(path, max_bytes=max_bytes)
    return summarize(model, Path(path).stat().st_size)
