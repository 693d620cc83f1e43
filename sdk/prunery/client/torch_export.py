"""`client.models.upload_torch`: export a PyTorch module to ONNX on this machine.

The SDK's one optional torch user (imported lazily; the import contract names it): the
server never receives Python code or pickles, only the exported file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunery.errors import ConfigError


@contextmanager
def exported_onnx(
    module: Any,
    example_inputs: Any,
    filename: str = "model.onnx",
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Iterator[Path]:
    """The module exported to a temporary .onnx file (removed on leaving the block).

    `example_inputs` is one tensor (or a 1-tuple) shaped like a batch of samples; the
    export has a dynamic batch dimension and the weights inside the file (Prunery refuses
    separate `.onnx.data` files). Needs torch (and onnx) installed here.
    """
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(f"upload_torch needs PyTorch installed on this machine: {exc}") from None

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise ValueError(
            "example_inputs must be one tensor (Prunery prunes single-input models), "
            f"got {type(example_inputs).__name__}"
        )
    was_training = module.training
    module.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="prunery-upload-") as tmp:
            path = Path(tmp) / Path(filename).name
            axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    inputs,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes=axes,
                )
            extra = [p.name for p in Path(tmp).iterdir() if p.name != path.name]
            if extra:
                raise ValueError(
                    f"the export wrote external weight files ({', '.join(extra)}): the model is "
                    "over the 2 GB ONNX limit for one file"
                )
            yield path
    finally:
        module.train(was_training)
