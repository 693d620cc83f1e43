"""Fixtures for the learned-architecture methods: a PruneContext built by the engine's own
`prepare()` (convert, analyse, count), without running a whole job."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.method import PruneContext
from engine.prepare import Prepared, prepare
from methods import registry
from prunery.spec import JobSpec

_PREPARED: dict[tuple[str, int | None, int], Prepared] = {}


def build_context(onnx_path: Path, spec: JobSpec, data_path: Path) -> PruneContext:
    """The engine's `prepare()` once per (model, round_to, seed); the context per spec."""
    key = (str(onnx_path), spec.export.round_to, spec.seed)
    if key not in _PREPARED:
        _PREPARED[key] = prepare(spec, onnx_path, data_path, catalog=registry, device="cpu")
    return _PREPARED[key].context(spec=spec)


@pytest.fixture(scope="session")
def make_context(zoo_model, digits_npz):
    """make_context(zoo name, method name, **spec fields) -> PruneContext (cached per model)."""

    def make(name: str, method: str, target: dict | None = None, **spec) -> PruneContext:
        js = JobSpec(
            method={"name": method, "params": spec.pop("params", {})},
            target=target or {"flops": 0.5},
            **spec,
        )
        return build_context(zoo_model(name), js, digits_npz)

    return make
