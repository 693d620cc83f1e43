"""The test model zoo: small networks of every architecture family the engine must handle,
trained briefly on scikit-learn's bundled digits (8x8 grey images, 10 classes) and exported
to ONNX the way users export them.

Used by the tests (through fixtures that cache the files for the run) and by the
benchmarks. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10


# ------------------------------------------------------------------ data


def digits_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """load_digits as float32 NCHW in [0, 1] with a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    x = (x - 0.3) / 0.4  # roughly zero-mean, unit-variance
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def write_digits_npz(path: Path) -> Path:
    np.savez(path, **digits_arrays())
    return path


# ------------------------------------------------------------------ blocks


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = conv_bn(cin, cout, 3, stride)
        self.c2 = conv_bn(cout, cout, 3, 1, act=False)
        self.short = (
            conv_bn(cin, cout, 1, stride, act=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(self.c1(x)) + self.short(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = conv_bn(cin, mid, 1)
        self.c2 = conv_bn(mid, mid, 3, stride)
        self.c3 = conv_bn(mid, cout, 1, act=False)
        self.short = (
            conv_bn(cin, cout, 1, stride, act=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c3(self.c2(self.c1(x))) + self.short(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1),
            conv_bn(mid, mid, 3, stride, groups=mid),  # depthwise
            conv_bn(mid, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_res else out


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, 2 * growth, 1), conv_bn(2 * growth, growth, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=False))
        self.se = SqueezeExcite(cout)
        self.short = (
            conv_bn(cin, cout, 1, stride, act=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.se(self.body(x)) + self.short(x))


class Head(nn.Module):
    def __init__(self, c: int, hidden: int | None = None) -> None:
        super().__init__()
        self.fc = (
            nn.Linear(c, NUM_CLASSES)
            if hidden is None
            else nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------ the zoo


def vgg() -> nn.Module:
    return nn.Sequential(
        conv_bn(1, 32),
        conv_bn(32, 32),
        nn.MaxPool2d(2),
        conv_bn(32, 64),
        conv_bn(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


def resnet_basic() -> nn.Module:
    return nn.Sequential(
        conv_bn(1, 32),
        BasicBlock(32, 32),
        BasicBlock(32, 64, stride=2),
        BasicBlock(64, 64),
        Head(64),
    )


def resnet_bottleneck() -> nn.Module:
    return nn.Sequential(
        conv_bn(1, 32),
        Bottleneck(32, 16, 64),
        Bottleneck(64, 16, 64),
        Bottleneck(64, 32, 128, stride=2),
        Head(128),
    )


def mobilenet_v2() -> nn.Module:
    return nn.Sequential(
        conv_bn(1, 32),
        InvertedResidual(32, 24),
        InvertedResidual(24, 24),
        InvertedResidual(24, 48, stride=2),
        InvertedResidual(48, 48),
        conv_bn(48, 128, 1),
        Head(128),
    )


def densenet() -> nn.Module:
    return nn.Sequential(
        conv_bn(1, 32),
        DenseLayer(32, 16),
        DenseLayer(48, 16),
        DenseLayer(64, 16),
        conv_bn(80, 64, 1),
        nn.AvgPool2d(2),
        DenseLayer(64, 16),
        DenseLayer(80, 16),
        Head(96),
    )


def se_resnet() -> nn.Module:
    return nn.Sequential(
        conv_bn(1, 32), SEBlock(32, 32), SEBlock(32, 64, stride=2), Head(64, hidden=64)
    )


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-mixer on 2x2 patches of the 8x8 image: 16 tokens of dim 48."""

    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.blocks = nn.Sequential(MixerBlock(16, dim, 32, 96), MixerBlock(16, dim, 32, 96))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # [B, 16, D]
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.att = Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    """A tiny vision transformer: its MLP hidden widths are prunable; the residual width
    and the heads are tied to constant Reshapes in the exported graph."""

    def __init__(self, dim: int = 48, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(
            TransformerBlock(dim, heads, 4 * dim), TransformerBlock(dim, heads, 4 * dim)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "vgg": vgg,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "densenet": densenet,
    "se_resnet": se_resnet,
    "mixer": Mixer,
    "vit": ViT,
}


# ------------------------------------------------------------------ train and export


def train(model: nn.Module, data: dict[str, np.ndarray], epochs: int = 12, seed: int = 0) -> float:
    """Train briefly; returns test accuracy (torch, eval mode)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 63) // 64))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(data["x_test"])).argmax(1).numpy()
    return float((pred == data["y_test"]).mean())


def export(model: nn.Module, path: Path, opset: int | None = 17) -> Path:
    """opset=17: the TorchScript exporter with a dynamic batch (what most users have);
    opset=None: torch.onnx.export's current default (the dynamo exporter and its opset)."""
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    tmp = path.with_suffix(".tmp.onnx")
    if opset is None:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(model, (x,), str(tmp), dynamic_shapes=({0: batch},), verbose=False)
    else:
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    # The dynamo exporter may write weights to a side file; fold them in so one file is the model.
    import onnx

    m = onnx.load(str(tmp))
    onnx.save(m, str(path), save_as_external_data=False)
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    return path


def _zoo_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:12]


def build_zoo_model(
    name: str, cache_dir: Path, opset: int | None = 17, epochs: int = 12
) -> tuple[Path, float]:
    """Train (once per cache) and export zoo model `name`; returns (onnx path, torch accuracy)."""
    cache_dir = Path(cache_dir) / _zoo_key()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = f"op{opset}" if opset else "opdefault"
    onnx_path = cache_dir / f"{name}-{tag}.onnx"
    weights = cache_dir / f"{name}.pt"
    acc_file = cache_dir / f"{name}.acc"
    if onnx_path.exists() and acc_file.exists():
        return onnx_path, float(acc_file.read_text())
    torch.manual_seed(0)
    model = ZOO[name]()
    if weights.exists():
        # Our own file, written below by this function (never user data).
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        acc = float(acc_file.read_text())
    else:
        acc = train(model, digits_arrays(), epochs=epochs)
        torch.save(model.state_dict(), weights)
        acc_file.write_text(str(acc))
    export(model, onnx_path, opset=opset)
    return onnx_path, acc


def default_cache_dir() -> Path:
    return Path(
        os.environ.get(
            "PRUNERY_ZOO_CACHE", Path(__file__).resolve().parents[1] / ".pytest_cache" / "zoo"
        )
    )


# ------------------------------------------------------------------ language modelling

VOCAB = 128  # ASCII
SEQ_LEN = 32


def text_tokens(max_chars: int = 400_000) -> np.ndarray:
    """ASCII bytes of the Python standard library's own source files: real text that ships
    with every Python installation, so nothing is downloaded."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for name in (
        "textwrap.py",
        "argparse.py",
        "functools.py",
        "inspect.py",
        "dataclasses.py",
        "pathlib.py",
        "typing.py",
    ):
        path = root / name
        if path.exists():
            data = path.read_bytes()
            chunks.append(data)
            total += len(data)
        if total >= max_chars:
            break
    arr = np.frombuffer(b"".join(chunks)[:max_chars], dtype=np.uint8).astype(np.int64)
    return np.where(arr < VOCAB, arr, ord("?"))


def text_arrays(
    seq_len: int = SEQ_LEN, n_train: int = 3000, n_test: int = 400, seed: int = 0
) -> dict[str, np.ndarray]:
    """Sequences of seq_len + 1 tokens: the model reads [:-1] and predicts [1:]. Train and
    test windows come from disjoint halves of the text."""
    tokens = text_tokens()
    cut = int(len(tokens) * 0.85)
    rng = np.random.default_rng(seed)

    def windows(part: np.ndarray, n: int) -> np.ndarray:
        starts = rng.integers(0, len(part) - seq_len - 1, size=n)
        return np.stack([part[s : s + seq_len + 1] for s in starts])

    return {"train": windows(tokens[:cut], n_train), "test": windows(tokens[cut:], n_test)}


def write_text_npz(path: Path) -> Path:
    np.savez(path, **text_arrays())
    return path


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.n2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.register_buffer(
            "mask", torch.triu(torch.full((SEQ_LEN, SEQ_LEN), float("-inf")), diagonal=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5 + self.mask[:t, :t], dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class CharTransformer(nn.Module):
    """A small character-level transformer LM: int64 tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(1, SEQ_LEN, dim) * 0.02)
        self.blocks = nn.Sequential(*[CausalBlock(dim, heads, 4 * dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def train_lm(
    model: nn.Module, data: dict[str, np.ndarray], epochs: int = 4, seed: int = 0
) -> float:
    """Returns test bits per character."""
    torch.manual_seed(seed)
    train_seq = torch.from_numpy(data["train"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_seq), generator=g)
        for i in range(0, len(order), 64):
            seq = train_seq[order[i : i + 64]]
            logits = model(seq[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        seq = torch.from_numpy(data["test"])
        loss = F.cross_entropy(model(seq[:, :-1]).reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
    return float(loss) / float(np.log(2))


def build_lm_model(cache_dir: Path, epochs: int = 4) -> tuple[Path, float]:
    """Train (once per cache) and export the character transformer; returns (path, test bpc)."""
    cache_dir = Path(cache_dir) / _zoo_key()
    cache_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, bpc_file, weights = (
        cache_dir / "char_lm-op17.onnx",
        cache_dir / "char_lm.bpc",
        cache_dir / "char_lm.pt",
    )
    if onnx_path.exists() and bpc_file.exists():
        return onnx_path, float(bpc_file.read_text())
    torch.manual_seed(0)
    model = CharTransformer()
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        bpc = float(bpc_file.read_text())
    else:
        bpc = train_lm(model, text_arrays(), epochs=epochs)
        torch.save(model.state_dict(), weights)
        bpc_file.write_text(str(bpc))
    model.eval()
    tmp = onnx_path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(2, SEQ_LEN, dtype=torch.long),),
        str(tmp),
        dynamo=False,
        opset_version=17,
        input_names=["tokens"],
        output_names=["logits"],
        dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}},
    )
    tmp.replace(onnx_path)
    return onnx_path, bpc


# ------------------------------------------------------------------ which models the method tiers run

# Every method runs over the whole zoo with PRUNERY_FULL_ZOO=1 (`make test-full`). By default
# (`make test`, CI) the per-method zoo tiers run one model per structural family that is
# hardest to prune right — residual sums, depthwise convs, concat, Linear/transposed — so the
# whole suite stays well inside CI's time limit on 2 cores. The engine's own zoo test
# (tests/engine/test_zoo.py) always covers all models at both opsets.
CI_ZOO = ("resnet_basic", "mobilenet_v2", "densenet", "mixer")
CONV_ZOO = ("vgg", "resnet_basic", "resnet_bottleneck", "mobilenet_v2", "densenet", "se_resnet")


def test_zoo(conv_only: bool = False) -> list[str]:
    names = CONV_ZOO if conv_only else tuple(ZOO)
    if os.environ.get("PRUNERY_FULL_ZOO") == "1":
        return list(names)
    return [n for n in names if n in CI_ZOO]


test_zoo.__test__ = False  # not a pytest test
