"""Shared fixtures: the digits dataset and the trained, exported model zoo (cached on disk
across runs, keyed by the zoo's source and torch version)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

OPSETS = {"op17": 17, "opdefault": None}


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    return zoo.write_digits_npz(tmp_path_factory.mktemp("data") / "digits.npz")


@pytest.fixture(scope="session")
def zoo_model():
    """zoo_model(name, opset='op17') -> Path of the exported ONNX (trained once, cached)."""
    cache = zoo.default_cache_dir()

    def get(name: str, opset: str = "op17") -> Path:
        path, _ = zoo.build_zoo_model(name, cache, opset=OPSETS[opset])
        return path

    return get


def pytest_collection_modifyitems(config, items) -> None:
    """tests/api runs against the real Postgres (tests/api/conftest.py): it is part of the
    service tier, so `-m "not service"` (the fast tier) leaves it out."""
    api = Path(__file__).parent / "api"
    for item in items:
        if Path(str(item.fspath)).is_relative_to(api):
            item.add_marker(pytest.mark.service)
