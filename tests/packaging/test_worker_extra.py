"""Production installs `prunery-server[worker]` and nothing else (Dockerfile, worker image).
Every import the engine, the methods and the worker make must come from that set: the
standard library, our own packages, or a distribution in the closure of the `worker` extra's
requirements. Two checks, both read from the installed metadata (so a package that only the
`dev` extra brings in fails them):

* static: every `import` statement anywhere under core/, worker/, engine/ and methods/ (function-level ones included,
  which a plain import would not execute);
* dynamic: every registered method's implementation, the engine and the Celery task module
  imported in a fresh interpreter whose import system refuses anything outside the set.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"core", "worker", "engine", "methods", "server_cli", "app", "prunery", "migrations"}
WORKER_PACKAGES = ("core", "worker", "engine", "methods")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(dist: str, extras: set[str]) -> set[str]:
    """Normalised names of `dist` and every distribution it requires (with `extras`)."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(dist, frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, ex = todo.pop()
        if (_norm(name), ex) in done:
            continue
        done.add((_norm(name), ex))
        seen.add(_norm(name))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return seen


def allowed_modules() -> set[str]:
    dists = _closure("prunery-server", {"worker"})
    mods = {
        m
        for m, owners in metadata.packages_distributions().items()
        if any(_norm(o) in dists for o in owners)
    }
    return mods | FIRST_PARTY


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_dev_tools_are_not_in_the_worker_closure():
    # The check must be able to fail: test-only tools are outside the worker set.
    allowed = allowed_modules()
    assert "pytest" not in allowed and "moto" not in allowed
    assert {"torch", "onnxruntime", "torch_pruning", "sklearn", "matplotlib"} <= allowed


def test_every_import_of_the_worker_packages_is_in_the_worker_extra():
    allowed = allowed_modules() | set(sys.stdlib_module_names)
    missing = {
        f"{path.relative_to(ROOT)}: {name}"
        for package in WORKER_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path)
        if name not in allowed and name != "__future__"
    }
    assert not missing, "imports outside the `worker` extra (add them to it): " + ", ".join(
        sorted(missing)
    )


_GUARD = r"""
import importlib, json, sys
refused = set(json.loads(sys.argv[1]))

from importlib.machinery import ModuleSpec

class Refuse:
    # A spec whose loading fails: an `import` raises, while find_spec probes (torch's
    # optional-module scans) see a module and do not import it.
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        return ModuleSpec(name, self) if top in refused else None

    def create_module(self, spec):
        raise ImportError(f"{spec.name.split('.')[0]} is not in the worker extra (imported as {spec.name})")

    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Refuse())
from methods import registry
names = []
for info in registry.list_methods():
    module, _, cls = info.implementation.partition(":")
    getattr(importlib.import_module(module), cls)
    names.append(info.name)
import engine, engine.pipeline, server_cli.prune, worker.tasks, worker.side_tasks, worker.celery_app
print(json.dumps(names))
"""


def test_every_method_imports_with_the_worker_extra_alone():
    from methods import registry

    # Refuse every module that an installed distribution outside the worker set provides.
    refused = (
        set(metadata.packages_distributions()) - allowed_modules() - set(sys.stdlib_module_names)
    )
    assert "pytest" in refused
    out = subprocess.run(
        [sys.executable, "-c", _GUARD, json.dumps(sorted(refused))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        m.name for m in registry.list_methods()
    ]
