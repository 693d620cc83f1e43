"""The end-to-end demo on the embedded default, driven through the SDK.

    python scripts/demo.py [--out DIR] [--epochs 3] [--keep-server]

1. starts `prunery serve` in the background (SQLite, local artifacts, filesystem broker;
   state in ./.prunery/demo unless PRUNERY_HOME is set),
2. trains a small CNN on scikit-learn's bundled digits (8x8 images; nothing is downloaded)
   and exports it to ONNX with a dynamic batch,
3. uploads the model and an .npz dataset, submits an `l1_norm` job keeping 50% of the FLOPs
   with 3 fine-tuning epochs, and waits with a progress bar,
4. prints the report summary, downloads the pruned ONNX, checks it in onnxruntime,
5. stops the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def train_digits(out: Path, epochs: int = 20) -> tuple[Path, Path, float]:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    arrays = {"x_train": x[360:], "y_train": y[360:], "x_test": x[:360], "y_test": y[:360]}
    data_path = out / "digits.npz"
    np.savez(data_path, **arrays)

    torch.set_num_threads(1)  # a tiny net: extra threads only contend on small machines
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    xt, yt = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float(
            (model(torch.from_numpy(arrays["x_test"])).argmax(1).numpy() == arrays["y_test"]).mean()
        )
    model_path = out / "digits_cnn.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 1, 8, 8),
        str(model_path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    return model_path, data_path, acc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(home / "serve.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunery.cli", "serve", "--home", str(home), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PRUNERY_HOME": str(home)},
    )
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prunery serve exited:\n{(home / 'serve.log').read_text()[-3000:]}")
        try:
            if (
                httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                and (home / "credentials.json").is_file()
            ):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("prunery serve did not become ready in 120 s; see " + str(home / "serve.log"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / ".prunery" / "demo-out")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of the job")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--keep-server", action="store_true", help="leave prunery serve running")
    args = parser.parse_args()

    home = Path(os.environ.get("PRUNERY_HOME") or REPO / ".prunery" / "demo").resolve()
    home.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    print(f"[1/5] starting `prunery serve` (state in {home}) ...", flush=True)
    server = start_server(home, port)
    try:
        from prunery import Client
        from prunery.report_text import format_report

        os.environ["PRUNERY_HOME"] = str(home)
        client = Client()  # URL and API key from the credentials `prunery serve` wrote
        print(f"      serving at {client.base_url}", flush=True)

        print(
            "[2/5] training a small CNN on scikit-learn's digits and exporting it to ONNX ...",
            flush=True,
        )
        model_path, data_path, acc = train_digits(args.out)
        print(f"      test accuracy {acc * 100:.2f}%  →  {model_path}", flush=True)

        print("[3/5] uploading the model and the dataset, submitting l1_norm ...", flush=True)
        model = client.models.upload(model_path)
        data = client.datasets.upload(data_path)
        print(
            f"      model {model.id}: {model.parameter_count:,} parameters, ops {model.op_histogram}"
        )
        print(
            f"      dataset {data.id}: {data.train} train / {data.test} test samples of {data.sample_shape}"
        )
        job = client.jobs.create(
            {
                "model_id": model.id,
                "dataset_id": data.id,
                "method": {"name": "l1_norm"},
                "target": {"flops": args.flops},
                "recovery": {"mode": "finetune", "epochs": args.epochs},
                "gates": {"max_accuracy_drop": 2.0},
            }
        )
        print(f"      job {job.id} submitted; waiting:", flush=True)
        job.wait(progress=True)

        print("[4/5] report:", flush=True)
        report = job.report()
        print(format_report(report))
        speed = ", ".join(
            f"{lat.speedup:.2f}x at batch {lat.batch_size}" for lat in report.latency_ms
        )
        print(
            f"      headline: MACs x{report.macs.ratio:.2f}; measured onnxruntime speedup {speed}"
        )
        if job.gates_passed is False:
            print("      note: a gate was missed (the model is still available)")
        paths = job.download(args.out / job.id)
        pruned = paths["model.onnx"]

        import onnxruntime as ort

        arrays = np.load(data_path)
        session = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: arrays["x_test"]})[0]
        check = float((logits.argmax(1) == arrays["y_test"]).mean())
        print(
            f"[5/5] pruned ONNX saved to {pruned} ({pruned.stat().st_size:,} bytes, original "
            f"{model_path.stat().st_size:,}); onnxruntime test accuracy {check * 100:.2f}%"
        )
        print(f"      report: {paths['report.md']}")
        return 0 if job.gates_passed is not False else 4
    finally:
        if args.keep_server:
            print(f"prunery serve keeps running (pid {server.pid}); stop it with kill {server.pid}")
        else:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            print("server stopped.")


if __name__ == "__main__":
    sys.exit(main())
