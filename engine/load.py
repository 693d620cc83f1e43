"""Load: a checked, normalised ONNX graph and a trainable torch module proven equal to it.

No pickle is ever loaded: the only inputs are the ONNX protobuf and the dataset arrays.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from core.errors import BadDataset, BadModel
from core.validation import onnx_checks as checks
from core.validation.interface import check_model_io
from engine import axis_swap, converters, fx_rewrites, reshapes, residual
from engine.fx_util import rewrite_with_shapes

PARITY_RTOL = 1e-4

_NP_DTYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
}


@dataclass
class LoadedModel:
    onnx_model: onnx.ModelProto  # normalised (simplified) original
    module: torch.fx.GraphModule
    input_name: str
    input_dims: list[int | str | None]
    input_dtype: type
    output_names: list[str]
    sha256: str
    file_bytes: int
    opset: int
    parity_rel: float
    notes: list[str] = field(default_factory=list)
    lifted: list[str] = field(default_factory=list)
    # converted module name -> exporter's source module path (`features.0`): `source_names()`
    source_names: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_weights_finite(model: onnx.ModelProto) -> None:
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            arr = numpy_helper.to_array(t)
            # NaN is never legitimate; -inf is (attention masks), so it is allowed.
            if arr.size and np.isnan(arr).any():
                bad = int(np.isnan(arr).sum())
                raise BadModel(
                    f"initializer {t.name!r} has {bad} NaN values; the model's weights are "
                    "broken: re-export it from a healthy checkpoint"
                )


def _unsupported_ops(model: onnx.ModelProto, opset: int) -> list[str]:
    from onnx2torch.node_converters.registry import get_converter

    missing = set()
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            version = (
                opset
                if domain in ("", "ai.onnx")
                else next((i.version for i in model.opset_import if i.domain == domain), 1)
            )
            get_converter(node.op_type, version, domain or onnx.defs.ONNX_DOMAIN)
        except NotImplementedError:
            missing.add(f"{domain + '.' if domain else ''}{node.op_type}-{opset}")
    return sorted(missing)


def normalise(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """onnxslim: fold constants, drop Identity routing of shared initialisers, fuse."""
    import onnxslim

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("onnxslim").setLevel(logging.ERROR)
            slim = onnxslim.slim(model)
        if slim is not None:
            onnx.checker.check_model(slim)
            return slim, notes
    except Exception as exc:  # keep the original graph; conversion may still work
        notes.append(
            f"onnxslim could not simplify the graph ({type(exc).__name__}); used it as uploaded"
        )
    return model, notes


def random_input(dims: list[int], dtype: type, seed: int, high: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, high or 2, size=dims).astype(dtype)
    return rng.standard_normal(dims).astype(dtype)


def ort_session(model: onnx.ModelProto | bytes | str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])


def parity(module: torch.nn.Module, session, input_name: str, x: np.ndarray) -> tuple[float, float]:
    """(max abs diff, relative error) between torch and onnxruntime on input x."""
    ref = session.run(None, {input_name: x})[0]
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    out = out[0] if isinstance(out, (tuple, list)) else out
    got = out.detach().cpu().numpy()
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    return diff, diff / max(scale, 1e-12)


def _batch_polymorphic(
    module,
    session,
    input_name: str,
    dims: list[int],
    dtype: type,
    seed: int,
    input_high: int | None,
    notes: list[str],
    fixed_batch: bool,
) -> torch.fx.GraphModule:
    """Reshapes that carry the batch (or a flattened channel count) in constant or computed
    shapes become static, batch-following ones, proven on a batch twice the traced one."""
    example = torch.from_numpy(random_input(dims, dtype, seed + 100, input_high))
    second = torch.from_numpy(random_input(dims, dtype, seed + 101, input_high))

    def reference(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {input_name: x.numpy()})[0]

    rewritten, refused = reshapes.make_batch_polymorphic(module, example, reference, second)
    if refused and fixed_batch:
        raise BadModel(
            f"the model was exported with a fixed batch of {dims[0]} and cannot be made to run at other batch "
            f"sizes ({refused}); re-export it with a dynamic batch (torch.onnx.export(..., dynamic_shapes=...) "
            "or dynamic_axes={input: {0: 'batch'}})"
        )
    if refused:
        notes.append(refused)
    elif rewritten is not module:
        kinds = collections.Counter(type(m).__name__ for m in rewritten.modules())
        notes.append(
            f"made the graph batch-polymorphic: {kinds['StaticReshape']} Reshape(s) follow the batch, "
            f"{kinds['SampleFlatten']} became per-sample Flatten, {kinds['BatchConcat']} Concat(s) broadcast "
            f"batch-free inputs (shapes other than the batch are fixed at the dataset's sample shape)"
        )
    return rewritten


def _check_interface(
    original: onnx.ModelProto, sample_shape: tuple[int, ...]
) -> tuple[onnx.ValueInfoProto, list[int | str | None], type]:
    """One input, one output (the logits), a supported dtype, a declared input that fits the
    dataset's samples. Returns the input, its dims and its numpy dtype."""
    init_names = {t.name for t in original.graph.initializer}
    inputs = [i for i in original.graph.input if i.name not in init_names]
    # The same check (and message) the API applies at submit to what the upload recorded.
    check_model_io([i.name for i in inputs], [o.name for o in original.graph.output])
    inp = inputs[0]
    dims = checks._shape(inp)
    elem = inp.type.tensor_type.elem_type
    if elem not in _NP_DTYPES:
        raise BadModel(
            f"input {inp.name!r} has type {TensorProto.DataType.Name(elem)}; use float32 (or int64 token ids)"
        )
    # The dataset's sample shape must fit the model's declared input (batch dim excluded).
    declared = dims[1:]
    if len(declared) != len(sample_shape) or any(
        isinstance(d, int) and d > 0 and d != s
        for d, s in zip(declared, sample_shape, strict=False)
    ):
        raise BadDataset(
            f"dataset samples have shape {list(sample_shape)} but the model input {inp.name!r} "
            f"expects [batch, {', '.join(str(d) for d in declared)}]; reshape the arrays or upload the matching model"
        )
    # A fixed batch > 1 still runs at that batch; verification uses it.
    return inp, dims, _NP_DTYPES[elem]


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _unqualified(path: str) -> str:
    """The legacy exporter's scope name of a module: its path from the last non-numeric atom
    (torch.onnx.utils._unqualified_variable_name)."""
    atoms = path.split(".")
    last = max((i for i, a in enumerate(atoms) if not a.isnumeric()), default=0)
    return ".".join(atoms[last:])


def _legacy_scope_path(node_name: str) -> str | None:
    """`/features/features.0/Conv` -> `features.0`; `/1/c1/c1.0/Conv` -> `1.c1.0`: each
    scope is the module's unqualified name, so a scope that starts with its parent's
    unqualified name continues the parent's path."""
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0] or not all(parts[1:-1]):
        return None
    path = parts[1]
    for seg in parts[2:-1]:
        parent = _unqualified(path) + "."
        path = path + seg[len(parent) - 1 :] if seg.startswith(parent) else f"{path}.{seg}"
    return path


def _scope_metadata(node: onnx.NodeProto) -> str | None:
    """The dynamo exporter's `pkg.torch.onnx.name_scopes` (module paths, then the op's own
    name): the innermost module path."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            paths = [str(p) for p in scopes[:-1] if str(p)] if isinstance(scopes, list) else []
            return paths[-1] if paths else None
    return None


def node_source_name(node: onnx.NodeProto, initializers: set[str]) -> str | None:
    """The source module path of a Conv/Gemm/MatMul node: its weight initializer's name
    (`features.0.weight` -> `features.0`), else the legacy exporter's scoped node name, else
    the dynamo exporter's name-scope metadata."""
    weight = node.input[1] if len(node.input) > 1 else ""
    if weight in initializers and weight.endswith(".weight") and "::" not in weight:
        return weight[: -len(".weight")]
    return _legacy_scope_path(node.name) or _scope_metadata(node)


def source_names(original: onnx.ModelProto, converted: onnx.ModelProto) -> dict[str, str]:
    """{converted module name: source module path} for the layers of `converted` (the graph
    onnx2torch converts, whose module names it derives from the node names). Sources are read
    from the uploaded graph by node name (onnxslim may drop metadata or fold initializers),
    else from the converted graph's node."""
    from onnx2torch.onnx_graph import OnnxGraph

    def by_node(model: onnx.ModelProto) -> dict[str, str | None]:
        inits = {t.name for t in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type in _LAYER_OPS and n.name]
        return {n.name: node_source_name(n, inits) for n in nodes}

    first, second = by_node(original), by_node(converted)
    names: dict[str, str] = {}
    for module_name, onnx_node in OnnxGraph(converted.graph).nodes.items():
        src = first.get(onnx_node.name) or second.get(onnx_node.name)
        if src is None:
            continue
        names[module_name] = src
        if onnx_node.operation_type == "MatMul":  # fx_rewrites.lift_linears' names
            names[module_name + "_linear"] = src
            names[module_name.removesuffix("MatMul") + "Linear"] = src
    return names


def _convert(model: onnx.ModelProto) -> torch.fx.GraphModule:
    """onnx2torch with Prunery's converters; unsupported operators are named."""
    converters.install()
    from onnx2torch import convert

    missing = _unsupported_ops(model, checks.model_opset(model))
    if missing:
        raise BadModel(
            f"these ONNX operators cannot be converted to a trainable graph: {', '.join(missing)}; "
            "re-export with opset_version=17 or without them",
            code="unsupported_op",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(model)
    except NotImplementedError as exc:
        raise BadModel(f"conversion to torch failed: {exc}", code="unsupported_op") from None
    except Exception as exc:
        raise BadModel(f"conversion to torch failed ({type(exc).__name__}: {exc})") from None
    return module.eval()


def _prove_parity(
    module: torch.nn.Module,
    session: Any,
    input_name: str,
    probe_dims: list[int],
    dtype: type,
    seed: int,
    input_high: int | None,
) -> tuple[float, float]:
    """Worst (abs, rel) torch-vs-onnxruntime difference on three random inputs; a conversion
    past PARITY_RTOL is refused."""
    worst = (0.0, 0.0)
    for k in range(3):
        x = random_input(probe_dims, dtype, seed + k, input_high)
        try:
            diff, rel = parity(module, session, input_name, x)
        except Exception as exc:
            raise BadModel(
                f"the converted model does not run on an input of shape {probe_dims}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        worst = max(worst, (diff, rel), key=lambda t: t[1])
    if not worst[1] <= PARITY_RTOL:
        raise BadModel(
            f"the torch conversion does not reproduce onnxruntime (relative error {worst[1]:.2e} > "
            f"{PARITY_RTOL:.0e}, max abs diff {worst[0]:.3g}); an operator converts with different "
            "semantics — re-export with opset_version=17 and report the model to us"
        )
    return worst


def load(
    path: Path,
    sample_shape: tuple[int, ...],
    max_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    seed: int = 0,
    input_high: int | None = None,
) -> LoadedModel:
    """Check, normalise, convert to torch and prove the conversion on random inputs
    (integer inputs — token ids — are drawn from [0, input_high))."""
    path = Path(path)
    original = checks.load_checked(path, max_bytes=max_bytes)
    opset = checks.model_opset(original)
    _check_weights_finite(original)
    inp, dims, dtype = _check_interface(original, sample_shape)
    model, notes = normalise(original)
    module = _convert(model)

    fixed_batch = isinstance(dims[0], int) and dims[0] > 0
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 2
    probe_dims = [batch, *sample_shape]
    lifted = fx_rewrites.lift_linears(module)
    # Channel shuffles and constant channel slices/scales become channel-aware modules
    # (fx_rewrites.rewrite_channel_structure), before the batch-polymorphic rewrite below.
    structure_example = torch.from_numpy(random_input(probe_dims, dtype, seed, input_high))
    notes.extend(fx_rewrites.rewrite_channel_structure(module, structure_example))
    if lifted:
        notes.append(
            f"lifted {len(lifted)} MatMul(+Add) pairs with constant weights into Linear layers"
        )

    session = ort_session(model)
    sources = source_names(original, model)
    module = _batch_polymorphic(
        module, session, inp.name, probe_dims, dtype, seed, input_high, notes, fixed_batch
    )
    embeddings = residual.lift_embeddings(module) + residual.embeddings_as_parameters(module)
    if embeddings:
        notes.append(
            f"{len(embeddings)} embedding constant(s) (token table, class token, positional embedding) made trainable layers"
        )
    swaps = (
        rewrite_with_shapes(module, structure_example, axis_swap.rewrite_axis_swaps)
        if axis_swap.has_candidates(module)
        else []
    )
    if swaps:
        notes.append(
            f"{len(swaps)} token-mixing transpose(s) made channel boundaries, so the residual width prunes"
        )
    worst = _prove_parity(module, session, inp.name, probe_dims, dtype, seed, input_high)
    return LoadedModel(
        onnx_model=model,
        module=module,
        input_name=inp.name,
        input_dims=dims,
        input_dtype=dtype,
        output_names=[o.name for o in model.graph.output],
        sha256=sha256_file(path),
        file_bytes=path.stat().st_size,
        opset=opset,
        parity_rel=worst[1],
        notes=notes,
        lifted=lifted,
        source_names={n: sources[n] for n, _ in module.named_modules() if n in sources},
    )
