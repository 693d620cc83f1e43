"""Hostile inputs, built cheaply (no gigabyte is ever allocated to build a gigabyte bomb).
Shared by tests/api/test_hardening.py, tests/service/test_abuse.py and benchmarks/abuse.py."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A version 1.0 .npy header declaring `shape` (the data may be missing)."""
    d = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    pad = 64 - (10 + len(d) + 1) % 64
    body = d + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


def npz_declaring(elements: int = 10**12) -> bytes:
    """An .npz whose x_train header declares `elements` float32s that it does not hold."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x_train.npy", npy_header((elements,)) + b"\0" * 64)
        for name, arr in (
            ("y_train", np.zeros(4, np.int64)),
            ("x_test", np.zeros((4,), np.float32)),
            ("y_test", np.zeros(4, np.int64)),
        ):
            b = io.BytesIO()
            np.save(b, arr)
            zf.writestr(f"{name}.npy", b.getvalue())
    return buf.getvalue()


def npz_bomb(mib: int = 64) -> bytes:
    """A savez_compressed-style .npz whose x_train expands from ~mib KB to `mib` MiB of zeros
    (written in 1 MiB chunks, never held whole)."""
    n = mib * 1024 * 1024 // 4
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x_train.npy", "w", force_zip64=True) as fh:
            fh.write(npy_header((n // 64, 64)))
            chunk = b"\0" * (1 << 20)
            for _ in range(mib):
                fh.write(chunk)
        for name, arr in (
            ("y_train", np.zeros(n // 64, np.int64)),
            ("x_test", np.zeros((1, 64), np.float32)),
            ("y_test", np.zeros(1, np.int64)),
        ):
            b = io.BytesIO()
            np.save(b, arr)
            zf.writestr(f"{name}.npy", b.getvalue())
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height (8-bit RGB) with a tiny, truncated IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def zip_of_huge_pngs(side: int = 9000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/a/0.png", png_header_only(side, side))
        zf.writestr("test/a/0.png", png_header_only(side, side))
    return buf.getvalue()


def targz_declaring(member_bytes: int = 1 << 30) -> bytes:
    """A tar.gz whose first member's header declares `member_bytes` (data mostly absent)."""
    info = tarfile.TarInfo("train/a/0.png")
    info.size = member_bytes
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * (1 << 20)
    return _gzip(raw)


def _gzip(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, compresslevel=9)


def tiny_png_zip(size: int = 8, n: int = 2) -> bytes:
    """A valid image-folder archive (for image_size tests)."""
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "test"):
            for i in range(n):
                img = io.BytesIO()
                Image.new("RGB", (size, size), (i * 40, 0, 0)).save(img, format="PNG")
                zf.writestr(f"{split}/c{i % 2}/{i}.png", img.getvalue())
    return buf.getvalue()


def chain_model(path: str | os.PathLike[str], n: int) -> None:
    """Conv → n elementwise ops → Gemm: loading it takes tens of seconds and no stage in
    load reports progress, so only the hard stop can end a cancel in time."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h0"], pads=[1, 1, 1, 1])]
    for i in range(n):
        nodes.append(helper.make_node("Relu" if i % 2 == 0 else "Neg", [f"h{i}"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("Flatten", [f"h{n}"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((10, 512)) * 0.01).astype(np.float32), "gw"),
        numpy_helper.from_array(np.zeros(10, np.float32), "gb"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
