"""`model.pt2`: the pruned network as a `torch.export` program, so it can be fine-tuned further
in PyTorch (`torch.export.load("model.pt2").module()` is a trainable nn.Module).

Written by the worker from the pruned module it already holds; the server never loads it.
Exported with a dynamic batch dimension when the graph allows it, else at the example's batch
size; a graph that torch.export cannot capture (e.g. data-dependent reshapes) gets no
model.pt2 and a note in the report saying why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """When torch.export meets a data-dependent size (a ViT's head reshape) it logs a warning
    ("Unable to find user code corresponding to {u3}") and prints the whole partial FX graph
    to stderr before raising; a worker's log is not the place for either. The exception
    itself still reaches the caller, which turns it into the report's note."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def save_program(model: nn.Module, example: torch.Tensor, path: Path) -> list[str]:
    """Export `model` to `path` (atomically); returns notes for the report."""
    model = model.eval()
    example = example[:1].repeat(2, *([1] * (example.dim() - 1)))  # batch 2: not specialised
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    notes: list[str] = []
    try:
        with torch.no_grad(), _quiet_export():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as dynamic_exc:
        try:
            with torch.no_grad(), _quiet_export():
                program = torch.export.export(model, (example,))
            notes.append(
                f"model.pt2 has a fixed batch size of {example.shape[0]}: torch.export could not make "
                f"the batch dimension dynamic ({type(dynamic_exc).__name__}: {_first_line(dynamic_exc)})"
            )
        except Exception as exc:
            return [
                f"no model.pt2: torch.export cannot capture the pruned graph "
                f"({type(exc).__name__}: {_first_line(exc)}); model.onnx is complete"
            ]
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return notes
