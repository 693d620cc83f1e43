"""Analyse: recover torch layers from the converted graph, build Torch-Pruning's dependency
graph, list the prunable channel groups, and prove each one safe before anything is cut.

Safety proof ("zero equivalence"): for a group, zero the channels that would be removed
(the out-channel weights and biases of every coupled layer), run the model, then remove
the same channels structurally and run it again. Removing a channel whose contribution
is already zero must not change the output. A group that fails — an exception (a channel
dim baked into a constant Reshape, an unwrapped constant), a changed output shape (the
classifier), or a different output (a LayerNorm over the pruned dim, a misaligned
head reshape) — is excluded with the reason, never broken.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from workers.engine import channel_consts, grouped, shuffle
from workers.engine.bounded import AnalyseBudget, BoundedDependencyGraph, UnboundedGroup
from workers.errors import BadModel

PRUNABLE_ROOTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
PROBE_SAMPLES = 4


# ------------------------------------------------------------------ lifting MatMul → Linear


def _const_of(gm: fx.GraphModule, node: fx.Node | object) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: object = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def _module_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op != "call_module":
        return ""
    mod = gm.get_submodule(str(node.target))
    kind = type(mod).__name__
    if kind == "OnnxBinaryMathOperation":
        fn = getattr(mod, "math_op_function", None)
        return {torch.add: "Add", torch.sub: "Sub", torch.mul: "Mul"}.get(fn, "Div")
    return kind


def lift_linears(gm: fx.GraphModule) -> list[str]:
    """Rewrite `MatMul(x, W_const) [+ b_const]` into `nn.Linear` modules (FX rewrite).

    torch exports every nn.Linear applied to 3-D activations as MatMul + Add with constant
    initialisers; onnx2torch turns those into generic ops over buffers that the pruner
    cannot see. Returns the names of the lifted layers.
    """
    lifted: list[str] = []
    for node in list(gm.graph.nodes):
        if _module_kind(gm, node) != "OnnxMatMul" or len(node.args) != 2:
            continue
        x, w_node = node.args
        weight = _const_of(gm, w_node)
        if weight is None or weight.dim() != 2 or _const_of(gm, x) is not None or not weight.is_floating_point():
            continue
        in_f, out_f = weight.shape
        bias = None
        add_node = None
        users = list(node.users)
        if len(users) == 1 and _module_kind(gm, users[0]) == "Add" and len(users[0].args) == 2:
            other = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
            b = _const_of(gm, other)
            if b is not None and b.numel() == out_f and b.shape[-1] == out_f and b.is_floating_point():
                bias, add_node = b.reshape(out_f), users[0]
        linear = nn.Linear(int(in_f), int(out_f), bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        name = str(node.target)
        new_name = name + "_linear" if not name.endswith("MatMul") else name[: -len("MatMul")] + "Linear"
        gm.add_submodule(new_name, linear)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(new_name, (x,))
        target = add_node if add_node is not None else node
        target.replace_all_uses_with(new)
        lifted.append(new_name)
    if lifted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        _drop_unused_constants(gm)
    return lifted


class _Flatten(nn.Module):
    """Replaces a Reshape whose constant shape [-1, C*H*W] only flattens per sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def rewrite_flatten_reshapes(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Rewrite constant `Reshape(x, [-1, n])` (n = all of x's non-batch elements) into a
    flatten: the dynamo exporter writes `x.flatten(1)` that way, with the channel count
    baked into the constant, which would make the last conv block unprunable."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        ShapeProp(gm).propagate(example)
    except Exception:
        return []
    rewritten: list[str] = []
    for node in list(gm.graph.nodes):
        if _module_kind(gm, node) not in ("OnnxReshape",) or len(node.args) != 2:
            continue
        shape = _const_of(gm, node.args[1])
        src = node.args[0]
        meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
        if shape is None or meta is None or shape.numel() != 2 or len(meta.shape) < 2:
            continue
        first, second = (int(v) for v in shape.tolist())
        rest = 1
        for d in meta.shape[1:]:
            rest *= int(d)
        if first in (-1, 0) and second == rest:
            name = str(node.target) + "_flatten"
            gm.add_submodule(name, _Flatten())
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (src,))
            node.replace_all_uses_with(new)
            rewritten.append(str(node.target))
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        gm.delete_all_unused_submodules()
        _drop_unused_constants(gm)
    return rewritten


def rewrite_channel_structure(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Load-time rewrites that make CNN structure prunable; returns notes for the report:
    channel shuffles and constant channel slices (shuffle.py), per-channel constants such
    as layer scale (channel_consts.py)."""
    notes: list[str] = []
    maps = shuffle.rewrite_channel_maps(gm, example)
    shuffles = sum(1 for n in maps if n.endswith("_channel_shuffle"))
    if maps:
        notes.append(
            f"rewrote {shuffles} channel shuffle(s) and {len(maps) - shuffles} constant channel slice(s) "
            "into channel maps that follow pruning"
        )
    scaled = channel_consts.rewrite_channel_constants(gm, example)
    if scaled:
        notes.append(f"made {len(scaled)} per-channel constant Mul/Add op(s) (layer scale) prunable with their channels")
    return notes


def _drop_unused_constants(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    holder = getattr(gm, "initializers", None)
    if holder is None:
        return
    for name in list(holder._buffers):
        if f"initializers.{name}" not in used:
            del holder._buffers[name]
    for name in list(holder._parameters):
        if f"initializers.{name}" not in used:
            del holder._parameters[name]


# ------------------------------------------------------------------ running with located errors


class _LocatingInterpreter(fx.Interpreter):
    """Runs a GraphModule node by node: errors name the failing op, and ops that change the
    batch dimension (a channel count baked into a constant Reshape) are recorded."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.batch_changes: list[str] = []

    def run_node(self, n: fx.Node):  # type: ignore[override]
        target = n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target)
        try:
            out = super().run_node(n)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"op {target!r} fails: {msg}") from None
        if n.op == "call_module" and isinstance(out, torch.Tensor) and n.args and isinstance(n.args[0], fx.Node):
            src = self.env.get(n.args[0])
            if isinstance(src, torch.Tensor) and src.dim() and out.dim() and src.shape[0] != out.shape[0]:
                if "Reshape" in type(self.module.get_submodule(str(n.target))).__name__:
                    self.batch_changes.append(f"{target!r} turned batch {src.shape[0]} into {out.shape[0]}")
        return out


def run_located(model: nn.Module, x: torch.Tensor, batch_changes: list[str] | None = None) -> torch.Tensor:
    """Forward pass whose errors name the failing op of the converted graph."""
    if isinstance(model, fx.GraphModule):
        interp = _LocatingInterpreter(model)
        try:
            out = interp.run(x)
        finally:
            if batch_changes is not None:
                batch_changes.extend(interp.batch_changes)
    else:
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


# ------------------------------------------------------------------ groups


def build_dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, with a bounded group walk (see bounded.py) and the
    pruner that slices per-channel constants (channel_consts.py)."""
    with torch.enable_grad():
        return BoundedDependencyGraph().build_dependency(
            model, example_inputs=example, verbose=False, customized_pruners={**channel_consts.CUSTOM_PRUNERS, **shuffle.CUSTOM_PRUNERS}
        )


@dataclass
class GroupMember:
    name: str
    op: str
    role: str  # "out" (its output channels go) or "in" (its input channels go)


@dataclass
class ChannelGroup:
    """A set of coupled channels that must be removed together, named by its root layer."""

    name: str
    channels: int
    members: list[GroupMember] = field(default_factory=list)

    @property
    def out_layers(self) -> list[str]:
        return [m.name for m in self.members if m.role == "out"]


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _root_pruning_fn(dg: tp.DependencyGraph, module: nn.Module) -> Callable:
    return dg.get_pruner_of_module(module).prune_out_channels


def grouped_ties(model: nn.Module, dg: tp.DependencyGraph, root: str) -> list[grouped.GroupedTie]:
    """The grouped convs that the group of `root` passes through (cached on the graph)."""
    cache = dg.__dict__.setdefault("_prunery_ties", {})
    if root not in cache:
        module = model.get_submodule(root)
        everything = list(range(dg.get_out_channels(module)))
        full = dg.get_pruning_group(module, _root_pruning_fn(dg, module), everything)
        cache[root] = grouped.ties_of(dg, full, _names(model))
    return cache[root]


def full_group(model: nn.Module, dg: tp.DependencyGraph, root: str, idxs: Sequence[int] | None = None, minimum: int = 0):
    """The pruning group of `root` for `idxs` (all channels when None). Indices are projected
    so that grouped convolutions lose the same offsets in every block (grouped.py)."""
    module = model.get_submodule(root)
    if idxs is None:
        idxs = list(range(dg.get_out_channels(module)))
    else:
        ties = grouped_ties(model, dg, root) if any(grouped.is_grouped(m) for m in model.modules()) else []
        if ties:
            idxs = grouped.project(ties, idxs, minimum=minimum)
    return dg.get_pruning_group(module, _root_pruning_fn(dg, module), list(idxs))


def _zero_out_channels(dg: tp.DependencyGraph, group) -> None:
    """Zero what removing the group's channels removes: out-channel weights and biases."""
    with torch.no_grad():
        for item in group:
            dep, idxs = item.dep, item.idxs
            if not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            target = dep.target.module
            idx = torch.as_tensor(list(idxs), dtype=torch.long)
            if isinstance(target, nn.Parameter):
                dim = dg.unwrapped_parameters.get(target, None) if isinstance(dg.unwrapped_parameters, dict) else None
                if dim is None:
                    for p, d in getattr(dg, "unwrapped_parameters", []) or []:
                        if p is target:
                            dim = d
                if dim is not None:
                    target.index_fill_(dim, idx, 0.0)
                continue
            if isinstance(target, (nn.Embedding,)):
                target.weight[:, idx] = 0.0
                continue
            if isinstance(target, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                target.weight[:, idx] = 0.0
                if target.bias is not None:
                    target.bias[idx] = 0.0
                continue
            weight = getattr(target, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() >= 1 and int(idx.max()) >= weight.shape[0]:
                raise IndexError(f"channel {int(idx.max())} does not exist in {type(target).__name__} of width {weight.shape[0]}")
            if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
                weight[idx] = 0.0
            bias = getattr(target, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias[idx] = 0.0


def _mask_layer_norms(dg: tp.DependencyGraph, group) -> list:
    """While probing: make each LayerNorm of the group normalise over the kept channels only.

    Zeroing a channel is not the same as removing it under a LayerNorm over that dimension
    (the zeros still count in its mean and variance), so without this every residual-stream
    group of a ConvNeXt/ViT would fail the zero-equivalence test although removing it is
    exact structural pruning. With the mask, a misaligned index mapping still fails.
    """
    handles = []
    for item in group:
        ln = item.dep.target.module
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1 or not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        width = int(ln.normalized_shape[0])
        keep = torch.ones(width, dtype=torch.bool)
        keep[torch.as_tensor(list(item.idxs), dtype=torch.long)] = False

        def hook(module: nn.LayerNorm, args, out, keep=keep):
            x = args[0]
            k = keep.to(x.device)
            xs = x[..., k]
            mean = xs.mean(-1, keepdim=True)
            var = xs.var(-1, unbiased=False, keepdim=True)
            y = (x - mean) / torch.sqrt(var + module.eps)
            if module.weight is not None:
                y = y * module.weight
            if module.bias is not None:
                y = y + module.bias
            return y * k

        handles.append(ln.register_forward_hook(hook))
    return handles


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-6)
    return diff <= 1e-4 * scale + 1e-5, diff / scale


def probe_groups(
    model: nn.Module, example: torch.Tensor, batch: torch.Tensor, plan: dict[str, Sequence[int]],
    budget: AnalyseBudget | None = None,
    reference_shape: torch.Size | None = None,
) -> str | None:
    """Zero-equivalence test of removing `plan` = {root: idxs} all at once; None when safe,
    else why not (in terms of the op and the constraint that failed)."""
    m = copy.deepcopy(model)
    try:
        dg = build_dependency_graph(m, example)
        dg.budget = budget
        groups = [full_group(m, dg, root, idxs, minimum=1) for root, idxs in plan.items()]
    except UnboundedGroup as exc:
        return str(exc)
    except Exception as exc:
        return f"the dependency graph cannot form this group ({type(exc).__name__}: {_first_line(exc)})"
    expected: list[str] = []  # Reshapes that legitimately move the batch (MHA's [T, B*H, D])
    with torch.no_grad():
        unpruned = run_located(m, batch, expected)
    if reference_shape is None:
        reference_shape = unpruned.shape
    hooks = []
    try:
        for group in groups:
            _zero_out_channels(dg, group)
            hooks.extend(_mask_layer_norms(dg, group))
        with torch.no_grad():
            zeroed = run_located(m, batch)
    except Exception as exc:
        for h in hooks:
            h.remove()
        return (
            "the dependency graph couples channels that do not line up "
            f"(e.g. through a transpose): {_first_line(exc)}"
        )
    for h in hooks:
        h.remove()
    try:
        for root, idxs in plan.items():
            full_group(m, dg, root, idxs, minimum=1).prune()
    except Exception as exc:
        return f"Torch-Pruning cannot remove these channels ({type(exc).__name__}: {_first_line(exc)})"
    changes: list[str] = []
    try:
        with torch.no_grad():
            pruned = run_located(m, batch, changes)
        changes = [c for c in changes if c not in expected]
    except Exception as exc:
        changes = [c for c in changes if c not in expected]
        if changes:
            return (
                f"its channel count is baked into the constant shape of Reshape {changes[0]} "
                f"once channels are removed, and then {_first_line(exc)}; re-export so that the "
                "reshape uses the runtime shape (or -1) to make it prunable"
            )
        return f"the pruned graph no longer runs: {_first_line(exc)}"
    if changes:
        return (
            f"its channel count is baked into the constant shape of Reshape {changes[0]} once channels "
            "are removed; re-export so that the reshape uses the runtime shape (or -1) to make it prunable"
        )
    if pruned.shape != reference_shape:
        return (
            f"removing its channels changes the model output shape {tuple(reference_shape)} -> "
            f"{tuple(pruned.shape)} (its channels are the model's outputs)"
        )
    ok, rel = _close(zeroed, pruned)
    if not ok:
        return (
            "removing its channels changes the function beyond the removed channels "
            f"(relative difference {rel:.2e} versus zeroing them): the channel dimension is "
            "shared with a normalisation or reshape that is not channel-separable"
        )
    return None


def probe_group(model: nn.Module, example: torch.Tensor, batch: torch.Tensor, root: str, idxs: Sequence[int]) -> str | None:
    """Zero-equivalence test of removing `idxs` of group `root`; None when safe, else why not."""
    return probe_groups(model, example, batch, {root: idxs})


def describe_group(model: nn.Module, dg: tp.DependencyGraph, group, names: dict[nn.Module, str]) -> list[GroupMember]:
    members: list[GroupMember] = []
    seen: set[tuple[str, str]] = set()
    for item in group:
        target = item.dep.target.module
        if not isinstance(target, nn.Module) or target not in names:
            continue
        role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        key = (names[target], role)
        if key in seen:
            continue
        seen.add(key)
        members.append(GroupMember(names[target], type(target).__name__, role))
    return members


@dataclass
class Analysis:
    groups: list[ChannelGroup]
    excluded: list[tuple[str, str]]
    lifted: list[str]
    probes: int = 0


def _output_layers(model: nn.Module) -> set[str]:
    """Conv/Linear layers whose output channels reach a model output without passing
    another Conv/Linear (the classifier): decided from the FX graph, without a probe."""
    if not isinstance(model, fx.GraphModule):
        return set()
    found: set[str] = set()
    stack = [n for n in model.graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), PRUNABLE_ROOTS):
            found.add(str(node.target))
            continue
        stack.extend(a for a in node.all_input_nodes)
    names = _names(model)
    return {names[model.get_submodule(t)] for t in found if model.get_submodule(t) in names}


def _analyse_seconds() -> float:
    import os

    try:
        return float(os.environ.get("PRUNERY_ANALYSE_SECONDS", "900"))
    except ValueError:
        return 900.0


def _candidate_groups(
    model: nn.Module, dg: tp.DependencyGraph, names: dict[nn.Module, str], budget: AnalyseBudget
) -> tuple[list[tuple[str, int, list[GroupMember], list[grouped.GroupedTie]]], list[tuple[str, str]]]:
    """One group per unvisited Conv/Linear root (Torch-Pruning's get_all_groups, but each
    walk is bounded and a group that does not settle is excluded rather than fatal)."""
    roots = [m for m in dg.module2node if isinstance(m, PRUNABLE_ROOTS) and m in names]
    visited: set[int] = set()
    candidates = []
    excluded: list[tuple[str, str]] = []
    for k, m in enumerate(roots):
        if id(m) in visited:
            continue
        name = names[m]
        budget.at(f"coupling channels: layer {k + 1} of {len(roots)} ({name})", 0.3 * k / max(len(roots), 1))
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except UnboundedGroup as exc:
            visited.add(id(m))
            excluded.append((name, f"{exc}; this layer is left at full width"))
            continue
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
                visited.add(id(item.dep.target.module))
        ties = grouped.ties_of(dg, group, names)
        dg.__dict__.setdefault("_prunery_ties", {})[name] = ties
        candidates.append((name, len(group[0].idxs), describe_group(model, dg, group, names), ties))
    return candidates, excluded


def analyse(
    model: nn.Module,
    example: torch.Tensor,
    batch: torch.Tensor,
    round_to: int | None = 1,
    seed: int = 0,
    ignored: Iterable[str] = (),
    progress: Callable[..., None] | None = None,
    seconds: float | None = None,
) -> Analysis:
    """List prunable groups (each proven safe by a probe) and excluded ones with reasons.

    Bounded: every group walk is capped (bounded.py), the whole stage has a wall-clock budget
    (`seconds`, default $PRUNERY_ANALYSE_SECONDS or 900) whose error names the layer it was
    on, and `progress(fraction, message)` is called often (it may raise to cancel).
    Probes are batched: all candidates are removed together in one probe, and only a batch
    that fails is split in halves, so a model with f unsafe groups out of n needs about
    1 + 2 f log2(n) probes instead of n.
    """
    budget = AnalyseBudget(seconds if seconds is not None else _analyse_seconds(), progress)
    budget.at("tracing the model", 0.0)
    try:
        dg = build_dependency_graph(model, example)
    except Exception as exc:
        raise BadModel(f"Torch-Pruning could not trace the converted model: {type(exc).__name__}: {exc}") from None
    dg.budget = budget
    names = _names(model)
    ignored = set(ignored)
    candidates, excluded = _candidate_groups(model, dg, names, budget)
    gen = torch.Generator().manual_seed(seed)
    step = max(1, round_to or 1)  # None: widths measured per layer later (latency.py)
    outputs = _output_layers(model)
    to_probe: dict[str, list[int]] = {}
    info: dict[str, tuple[int, list[GroupMember]]] = {}
    for name, channels, members, ties in candidates:
        info[name] = (channels, members)
        if name in ignored:
            excluded.append((name, "excluded by the method"))
            continue
        if any(mem.role == "out" and mem.name in outputs for mem in members):
            # Graph rule, no probe needed: these channels are the model's outputs.
            excluded.append((name, f"its channels are the model's outputs ({channels} of them); removing any would change what the model returns"))
            continue
        clash = grouped.conflict(ties)
        if clash is not None:
            excluded.append((name, clash))
            continue
        if ties and ties[0].per_block <= 1:
            excluded.append((name, f"every block of grouped convolution {ties[0].conv} has a single channel"))
            continue
        if channels <= step:
            excluded.append((name, f"only {channels} channel(s): nothing can be removed at round_to={round_to}"))
            continue
        # Probe with a random set (not a prefix) so a head-aligned reshape cannot pass by luck.
        k = step if step > 1 else min(2, channels - 1)
        to_probe[name] = sorted(torch.randperm(channels, generator=gen)[:k].tolist())

    # A few samples prove zero equivalence as well as many (any misalignment shows on one).
    batch = batch[:PROBE_SAMPLES]
    with torch.no_grad():
        reference_shape = run_located(model, batch).shape
    reasons: dict[str, str | None] = {}
    done = [0]
    probes = [0]

    def settle(names_: list[str]) -> None:
        budget.at(
            f"proving groups safe: {done[0]} of {len(to_probe)} settled (probing {', '.join(names_[:3])}"
            + (f" and {len(names_) - 3} more)" if len(names_) > 3 else ")"),
            0.3 + 0.7 * done[0] / max(len(to_probe), 1),
        )
        probes[0] += 1
        reason = probe_groups(model, example, batch, {n: to_probe[n] for n in names_}, budget, reference_shape)
        if reason is None:
            for n in names_:
                reasons[n] = None
            done[0] += len(names_)
        elif len(names_) == 1:
            only = names_[0]
            if "shared with a normalisation" in reason and any(mm.op == "LayerNorm" for mm in info[only][1]):
                # The residual stream: LayerNorm statistics over the kept channels (residual.py).
                from workers.engine.residual import probe_layernorm_coupled

                reason = probe_layernorm_coupled(model, example, batch, only, to_probe[only]) and reason
            reasons[only] = reason
            done[0] += 1
        else:
            half = len(names_) // 2
            settle(names_[:half])
            settle(names_[half:])

    order = list(to_probe)
    # Batches of bounded size keep one failing group from costing a probe of everything.
    for start in range(0, len(order), 32):
        settle(order[start : start + 32])
    groups: list[ChannelGroup] = []
    for name in order:
        if reasons.get(name) is None:
            channels, members = info[name]
            groups.append(ChannelGroup(name, channels, members))
        else:
            excluded.append((name, str(reasons[name])))
    budget.at(f"{len(groups)} prunable groups, {len(excluded)} excluded", 1.0)
    return Analysis(groups=groups, excluded=excluded, lifted=[], probes=probes[0])


def prune_copy(model: nn.Module, example: torch.Tensor, plan: dict[str, Sequence[int]]) -> nn.Module:
    """A structurally pruned deep copy: plan = {group root: root-channel indices to remove}."""
    from workers.engine import heads

    m = copy.deepcopy(model)
    todo = {k: sorted(set(int(i) for i in v)) for k, v in plan.items() if len(v)}
    todo = heads.apply_plan(m, todo, heads.blocks_of(model))  # attention heads: heads.py
    if not todo:
        return m
    dg = build_dependency_graph(m, example)
    for root, idxs in todo.items():
        full_group(m, dg, root, idxs).prune()
    return m


def channel_scores(
    model: nn.Module,
    dg: tp.DependencyGraph,
    root: str,
    per_module: Callable[[nn.Module], torch.Tensor | None],
) -> torch.Tensor:
    """Sum a per-output-channel statistic over every out-pruned layer of a group, in the
    root's channel order (coupled channels of residual/concat groups are scored together)."""
    from workers.engine import heads

    if heads.is_head_group(root):
        return heads.head_scores(model, root, per_module)
    group = full_group(model, dg, root)
    n = len(group[0].idxs)
    total = torch.zeros(n, dtype=torch.float64)
    for item in group:
        if not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        target = item.dep.target.module
        if not isinstance(target, nn.Module):
            continue
        values = per_module(target)
        if values is None:
            continue
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        roots = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        total.index_add_(0, roots, values.detach().double().cpu()[idxs])
    return total
