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

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from workers import checks
from workers.engine import converters, graph, reshapes, residual
from workers.errors import BadDataset, BadModel

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
            version = opset if domain in ("", "ai.onnx") else next(
                (i.version for i in model.opset_import if i.domain == domain), 1
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
        notes.append(f"onnxslim could not simplify the graph ({type(exc).__name__}); used it as uploaded")
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


def _batch_polymorphic(module, session, input_name: str, dims: list[int], dtype: type, seed: int,
                       input_high: int | None, notes: list[str], fixed_batch: bool) -> torch.fx.GraphModule:
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
    init_names = {t.name for t in original.graph.initializer}
    inputs = [i for i in original.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise BadModel(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); Prunery prunes "
            "single-input models: export with one input tensor"
        )
    if len(original.graph.output) != 1:
        names = ", ".join(o.name for o in original.graph.output)
        raise BadModel(
            f"the model has {len(original.graph.output)} outputs ({names}); Prunery prunes models with "
            "one output (the logits) and keeps that interface: export only the logits (e.g. return "
            "logits alone from forward, or pass output_names with one name to torch.onnx.export)"
        )
    inp = inputs[0]
    dims = checks._shape(inp)
    elem = inp.type.tensor_type.elem_type
    if elem not in _NP_DTYPES:
        raise BadModel(f"input {inp.name!r} has type {TensorProto.DataType.Name(elem)}; use float32 (or int64 token ids)")
    dtype = _NP_DTYPES[elem]
    # The dataset's sample shape must fit the model's declared input (batch dim excluded).
    declared = dims[1:]
    if len(declared) != len(sample_shape) or any(
        isinstance(d, int) and d > 0 and d != s for d, s in zip(declared, sample_shape, strict=False)
    ):
        raise BadDataset(
            f"dataset samples have shape {list(sample_shape)} but the model input {inp.name!r} "
            f"expects [batch, {', '.join(str(d) for d in declared)}]; reshape the arrays or upload the matching model"
        )
    if isinstance(dims[0], int) and dims[0] not in (0, 1) and dims[0] > 0:
        pass  # a fixed batch > 1 still runs at that batch; verification uses it
    model, notes = normalise(original)

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
    module.eval()

    fixed_batch = isinstance(dims[0], int) and dims[0] > 0
    batch = dims[0] if fixed_batch else 2
    probe_dims = [batch, *sample_shape]
    lifted = graph.lift_linears(module)
    # Channel shuffles and constant channel slices/scales become channel-aware modules
    # (graph.rewrite_channel_structure), before the batch-polymorphic rewrite below.
    structure_example = torch.from_numpy(random_input(probe_dims, dtype, seed, input_high))
    notes.extend(graph.rewrite_channel_structure(module, structure_example))
    if lifted:
        notes.append(f"lifted {len(lifted)} MatMul(+Add) pairs with constant weights into Linear layers")

    session = ort_session(model)
    module = _batch_polymorphic(
        module, session, inp.name, [batch, *sample_shape], dtype, seed, input_high, notes, fixed_batch
    )
    embeddings = residual.lift_embeddings(module) + residual.embeddings_as_parameters(module)
    if embeddings:
        notes.append(f"{len(embeddings)} embedding constant(s) (token table, class token, positional embedding) made trainable layers")
    worst = (0.0, 0.0)
    for k in range(3):
        x = random_input(probe_dims, dtype, seed + k, input_high)
        try:
            diff, rel = parity(module, session, inp.name, x)
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
    )
