"""Fixtures for the learned-architecture methods: a PruneContext built the way the engine
builds it (convert, analyse, count), without running a whole job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from prunery.spec import JobSpec
from workers.engine import graph, load, train
from workers.engine.flops import torch_costs
from workers.engine.method import PruneContext

_CTX_CACHE: dict[tuple[str, str], tuple] = {}


def build_context(onnx_path: Path, spec: JobSpec) -> PruneContext:
    key = (str(onnx_path), spec.export.round_to, spec.seed)
    if key not in _CTX_CACHE:
        arrays = zoo.digits_arrays()
        data = train.TensorData(
            *(torch.from_numpy(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
        )
        loaded = load.load(Path(onnx_path), (1, 8, 8))
        example = data.x_train[:1].clone()
        gen = torch.Generator().manual_seed(spec.seed)
        calibration = data.x_train[torch.randperm(len(data.x_train), generator=gen)[:256]]
        analysis = graph.analyse(
            loaded.module, example, calibration[:16], round_to=spec.export.round_to, seed=spec.seed
        )
        _CTX_CACHE[key] = (
            loaded.module,
            example,
            calibration,
            data,
            analysis,
            torch_costs(loaded.module, example),
        )
    module, example, calibration, data, analysis, base = _CTX_CACHE[key]
    return PruneContext(
        spec=spec,
        model=module,
        example=example,
        calibration=calibration,
        data=data,
        analysis=analysis,
        base_costs=base,
        device=torch.device("cpu"),
        seed=spec.seed,
        progress=lambda f, m: None,
    )


@pytest.fixture(scope="session")
def make_context(zoo_model):
    """make_context(zoo name, method name, **spec fields) -> PruneContext (cached per model)."""

    def make(name: str, method: str, target: dict | None = None, **spec) -> PruneContext:
        js = JobSpec(
            method={"name": method, "params": spec.pop("params", {})},
            target=target or {"flops": 0.5},
            **spec,
        )
        return build_context(zoo_model(name), js)

    return make
