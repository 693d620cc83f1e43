"""Small transformers of the common layouts (random init, plain torch / torchvision classes),
their ONNX exports, and an independent count of attention MACs on ONNX graphs.

Shared by tests/transformers and benchmarks/transformers.py."""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

IMAGE = (3, 16, 16)
TOKENS = 16
VOCAB = 50


# ------------------------------------------------------------------ models


def torchvision_vit(num_classes: int = 10) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=16,
        patch_size=4,
        num_layers=2,
        num_heads=4,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=num_classes,
    )


def torchvision_swin(num_classes: int = 10) -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[2, 2],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=num_classes,
    )


class TimmAttention(nn.Module):
    """timm's layout: one qkv Linear → reshape(B, N, 3, H, D) → permute → q, k, v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """DeiT/timm-style ViT: conv patch embedding, class token, learned positions, pre-norm blocks."""

    def __init__(
        self, num_classes: int = 10, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 4
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(IMAGE[0], dim, patch, stride=patch)
        tokens = (IMAGE[1] // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, dim * 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class TextEncoder(nn.Module):
    """nn.TransformerEncoder token classifier: int64 [B, T] in, logits out."""

    def __init__(
        self, num_classes: int = 4, dim: int = 32, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(x) + self.pos).mean(1))


class BertSelfAttention(nn.Module):
    """HF BERT layout: separate query/key/value Linear layers, transpose_for_scores."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], self.heads * self.head_dim)


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = BertSelfAttention(dim, heads)
        self.attention_output = nn.Linear(dim, dim)
        self.attention_norm = nn.LayerNorm(dim, eps=1e-12)
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.output_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention_output(self.attention(x)))
        return self.output_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))


class BertClassifier(nn.Module):
    """BertForSequenceClassification's layout (word + position embeddings, post-norm layers,
    pooler on the first token), built from a config with random weights."""

    def __init__(
        self, num_classes: int = 4, dim: int = 32, heads: int = 4, layers: int = 2, hidden: int = 64
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, dim)
        self.position_embeddings = nn.Parameter(torch.randn(1, TOKENS, dim) * 0.02)
        self.embeddings_norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.Sequential(*[BertLayer(dim, heads, hidden) for _ in range(layers)])
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings_norm(self.word_embeddings(ids) + self.position_embeddings)
        x = self.layers(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class FixedBatchCNN(nn.Module):
    """A CNN with channels-last LayerNorms (ConvNeXt's LayerNorm2d) and a flatten head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 16, 3, padding=1), nn.LayerNorm(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw, self.n2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.LayerNorm(32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    @staticmethod
    def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self._ln(self.n1, self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.pw(self._ln(self.n2, self.dw(x))))
        return self.head(x.reshape(x.shape[0], -1))


# ------------------------------------------------------------------ export and data


def export(
    model: nn.Module, example: torch.Tensor, path: Path, exporter: str, dynamic_batch: bool = True
) -> Path:
    """exporter: 'legacy' (TorchScript, opset 17) or 'dynamo' (torch.export, its default opset)."""
    model = model.eval()
    # Not under torch.no_grad(): there nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which the TorchScript exporter cannot write.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buf = io.BytesIO()
            torch.onnx.export(
                model,
                (example,),
                buf,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}
                if dynamic_batch
                else None,
            )
            path.write_bytes(buf.getvalue())
        else:
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            name = next(iter(__import__("inspect").signature(model.forward).parameters))
            shapes = {name: {0: torch.export.Dim.AUTO}} if dynamic_batch else None
            program = torch.onnx.export(
                model, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False
            )
            program.save(str(path), external_data=False)
    return path


def image_npz(path: Path, n: int = 320, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *IMAGE)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    cut = n * 3 // 4
    np.savez(path, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:])
    return path


def token_task(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences whose class is which of 4 marker tokens occurs most (learnable in a few epochs)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(4, VOCAB, size=(n, TOKENS)).astype(np.int64)
    y = rng.integers(0, 4, n).astype(np.int64)
    for i in range(n):
        pos = rng.choice(TOKENS, size=4, replace=False)
        x[i, pos] = y[i]
    return x, y


def token_npz(path: Path, n: int = 320, seed: int = 0) -> Path:
    x, y = token_task(n, seed)
    cut = n * 3 // 4
    np.savez(path, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:])
    return path


# ------------------------------------------------------------------ independent counts


def attention_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """MACs of MatMuls whose two operands are both activations (q·kᵀ and attn·v), counted on
    the ONNX graph with shapes from onnxruntime."""
    from engine.flops import _all_shapes

    shapes = _all_shapes(model, feed)
    consts = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    total = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(i in consts for i in node.input):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if a is None or out is None:
            continue
        total += int(np.prod(out)) * int(a[-1])
    return total
