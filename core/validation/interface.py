"""What a model's interface must be for a job, checked once for both paths (torch-free).

The engine calls these while it loads a job's inputs (`engine.load`, `engine.prepare`); the API
calls them at `POST /v1/jobs` with the facts recorded at upload (the model's inputs and outputs
from `onnx_checks.summarize`, the dataset's `num_classes` from the dataset checks). A job that
these facts already doom is refused at submit with the very message `prunery prune` prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core.errors import BadDataset, BadModel


def check_model_io(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """One input (initializers excluded) and one output (the logits), by name."""
    if len(inputs) != 1:
        raise BadModel(
            f"the model has {len(inputs)} inputs ({', '.join(inputs)}); Prunery prunes "
            "single-input models: export with one input tensor"
        )
    if len(outputs) != 1:
        raise BadModel(
            f"the model has {len(outputs)} outputs ({', '.join(outputs)}); Prunery prunes models "
            "with one output (the logits) and keeps that interface: export only the logits (e.g. "
            "return logits alone from forward, or pass output_names with one name to "
            "torch.onnx.export)"
        )


def check_logits_cover_labels(task: str, labels: int, width: int) -> None:
    """The logits' last dimension (classes, or the vocabulary) covers every label (token id).

    `labels` is one past the largest class index (token id) of the dataset."""
    if width >= labels:
        return
    if task == "language_modeling":
        raise BadDataset(
            f"the token ids go up to {labels - 1} but the model's vocabulary has {width} entries"
        )
    raise BadDataset(
        f"the labels go up to class {labels - 1} but the model outputs {width} classes; "
        "check that the dataset belongs to this model"
    )


def declared_logits_width(
    output: Mapping[str, Any], task: str, sample_shape: Sequence[int] = ()
) -> int | None:
    """The number of classes (vocabulary entries) an output declares in its ONNX shape, or None
    when the shape does not fix it (symbolic or unknown dims, a rank the task does not use, or
    a language model's token dim other than the samples': the engine refuses those on a real
    forward pass, with its own message)."""
    shape = output.get("shape") or []
    rank = 3 if task == "language_modeling" else 2
    if len(shape) != rank:
        return None
    if rank == 3 and isinstance(shape[1], int) and list(sample_shape[:1]) != [shape[1]]:
        return None
    width = shape[-1]
    return width if isinstance(width, int) and width > 0 else None


def check_model_summary(model_summary: Mapping[str, Any]) -> None:
    """`check_model_io` on the inputs and outputs recorded at upload (`ModelSummary.as_dict`)."""
    inputs = model_summary.get("inputs") or []
    outputs = model_summary.get("outputs") or []
    check_model_io([str(t["name"]) for t in inputs], [str(t["name"]) for t in outputs])


def check_dataset_fits_model(
    model_summary: Mapping[str, Any],
    dataset_summary: Mapping[str, Any],
    task: str,
    *,
    separate_evaluation: bool = False,
) -> None:
    """`check_logits_cover_labels` on what the uploads recorded: the dataset's `num_classes`
    (one past its largest label or token id) against the width the model's output declares.

    With a separate evaluation dataset the engine counts labels over the training split and the
    evaluation set's test split together, which the uploads do not record apart, so the label
    range is left to the engine then."""
    outputs = model_summary.get("outputs") or []
    labels = dataset_summary.get("num_classes")
    if separate_evaluation or len(outputs) != 1 or not isinstance(labels, int):
        return
    sample = dataset_summary.get("sample_shape") or []
    width = declared_logits_width(outputs[0], task, sample)
    if width is not None:
        check_logits_cover_labels(task, labels, width)
