"""CPU-side guard for the CUDA bugs of issue 9 (methods creating tensors on the CPU while
the model trains on CUDA). The GPU tier (tests/gpu, `make test-gpu`) runs every method on a
real device; this check runs everywhere and catches the commonest form without one:

a trainable `nn.Parameter` created outside an `nn.Module` (a dict or list of gates, say) is
never moved by `model.to(device)`, so it must be created with an explicit `device=`. Inside a
module's `__init__` it moves with its module and needs none."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_FACTORIES = {
    f"torch.{name}"
    for name in (
        "zeros",
        "ones",
        "full",
        "empty",
        "rand",
        "randn",
        "randint",
        "randperm",
        "arange",
        "linspace",
        "logspace",
        "eye",
        "tensor",
        "as_tensor",
        "normal",
    )
}


def _is_module_class(node: ast.ClassDef) -> bool:
    names = {ast.unparse(b) for b in node.bases}
    return bool(
        names & {"nn.Module", "torch.nn.Module", "Module", "nn.ModuleDict", "nn.Sequential"}
    )


def free_parameters_without_device(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []

    def visit(node: ast.AST, in_module: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_module or (isinstance(child, ast.ClassDef) and _is_module_class(child))
            if (
                isinstance(child, ast.Call)
                and ast.unparse(child.func) in {"nn.Parameter", "torch.nn.Parameter"}
                and not in_module
            ):
                arg = child.args[0] if child.args else None
                # A fresh tensor from a torch factory (torch.ones(...)) lands on the CPU unless
                # told otherwise; one derived from an existing tensor (w.clone()) keeps its device.
                fresh = isinstance(arg, ast.Call) and ast.unparse(arg.func) in _FACTORIES
                if fresh and not any(k.arg == "device" for k in arg.keywords):
                    found.append(
                        f"{path.relative_to(ROOT)}:{child.lineno}: {ast.unparse(child)[:90]}"
                    )
            visit(child, inside)

    visit(tree, False)
    return found


def test_the_check_finds_the_bug_it_is_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nfrom torch import nn\n"
        "def gates(groups):\n    return {g: nn.Parameter(torch.ones(4)) for g in groups}\n"
        "class Ok(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.w = nn.Parameter(torch.ones(4))\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [f.split(":")[1] for f in free_parameters_without_device(bad)] == ["4"]
    finally:
        ROOT = saved


def test_no_method_creates_a_free_parameter_without_a_device():
    found = [
        f
        for package in ("engine", "methods")
        for path in sorted((ROOT / package).rglob("*.py"))
        for f in free_parameters_without_device(path)
    ]
    assert not found, "create these on ctx.device (they never move with the model): " + "; ".join(
        found
    )
