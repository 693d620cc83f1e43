"""Benchmark of the service tier against the real Postgres and Redis (a benchmark: it never
asserts; it prints one Markdown table).

    .venv/bin/python benchmarks/service.py [--requests 4000] [--concurrency 32]
                                           [--submissions 200] [--upload-gb 1] [--e2e-runs 3]

It starts a real uvicorn API process (one process) and a real Celery worker, on a fresh
Postgres schema `prunery_bench` and Redis database 13, and measures

* RSS of the API process while a 1 GB multipart upload streams in (generated on the fly in
  1 MiB chunks; it is random bytes named .npz, so validation refuses it cheaply after the
  whole body has been stored — the point is the memory while streaming);
* job submission throughput (POST /v1/jobs, sequential and with 8 concurrent clients);
* GET /v1/jobs/{id} latency p50/p99 at concurrency 32 (httpx AsyncClient, same machine:
  client and server share the CPU cores);
* end-to-end wall time of a small job (digits CNN, l1_norm flops 0.5, 1 epoch) submitted
  through the service vs `engine.run` called directly in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "service"))

import servicekit  # noqa: E402

REDIS_DB = 13
SCHEMA = "prunery_bench"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def upload_rss(url: str, headers: dict[str, str], pid: int, gigabytes: float) -> dict[str, float]:
    total = int(gigabytes * 1024**3)
    boundary = "benchboundary7d1"
    chunk = os.urandom(1 << 20)

    def body():  # noqa: ANN202 - a generator of bounded memory
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        sent = 0
        while sent < total:
            n = min(len(chunk), total - sent)
            yield chunk[:n]
            sent += n
        yield f"\r\n--{boundary}--\r\n".encode()

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_kib(pid))
            time.sleep(0.02)

    base = rss_kib(pid)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/datasets",
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    stop.set()
    t.join()
    return {
        "base_mib": base / 1024,
        "peak_mib": max(samples) / 1024,
        "seconds": elapsed,
        "mib_s": total / 2**20 / elapsed,
        "status": r.status_code,
        "error": r.json().get("error", ""),
    }


def submit_throughput(
    url: str, headers: dict[str, str], spec: dict, n: int, concurrency: int
) -> tuple[float, list[str]]:
    ids: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    r = await client.post("/v1/jobs", json=spec)
                    r.raise_for_status()
                    ids.append(r.json()["id"])

            await asyncio.gather(*(one() for _ in range(n)))

    start = time.perf_counter()
    asyncio.run(run())
    return n / (time.perf_counter() - start), ids


def get_latency(
    url: str, headers: dict[str, str], job_ids: list[str], total: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []

    async def run() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=60, limits=limits
        ) as client:
            for jid in job_ids[:concurrency]:  # warm-up
                await client.get(f"/v1/jobs/{jid}")
            counter = iter(range(total))

            async def worker(k: int) -> None:
                for i in counter:
                    jid = job_ids[(i + k) % len(job_ids)]
                    t0 = time.perf_counter()
                    r = await client.get(f"/v1/jobs/{jid}")
                    latencies.append(time.perf_counter() - t0)
                    assert r.status_code == 200

            start = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            return time.perf_counter() - start

    elapsed = asyncio.run(run())
    return {
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "rps": total / elapsed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument("--upload-gb", type=float, default=1.0)
    ap.add_argument("--e2e-runs", type=int, default=3)
    args = ap.parse_args()

    from app.security import create_api_key, create_tenant
    from core.db import make_engine, make_sessionmaker, migrate, transaction
    from core.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="prunery-bench-"))
    settings = Settings(
        environment="test",
        database_url=servicekit.fresh_schema(SCHEMA),
        broker_url=servicekit.redis_url(REDIS_DB),
        storage_dir=root / "artifacts",
        worker_cache_dir=root / "cache",
        job_queue="gpu-bench",
        control_queue="control-bench",
        max_active_jobs_per_tenant=100_000,
        rate_limit_per_minute=0,
        heartbeat_interval_s=2.0,
    )
    servicekit.flush_redis(REDIS_DB)
    migrate(settings)
    engine = make_engine(settings)
    with transaction(make_sessionmaker(engine)) as s:
        _row, key = create_api_key(s, create_tenant(s, "bench"), "bench")
    headers = {"Authorization": f"Bearer {key}"}

    print("training the digits model ...", file=sys.stderr)
    arrays = servicekit.digits_arrays()
    np.savez(root / "digits.npz", **arrays)
    servicekit.train_digits_onnx(root / "digits.onnx", arrays, epochs=10)

    stack = servicekit.Stack(servicekit.settings_env(settings), root)
    rows: list[tuple[str, str, str]] = []
    try:
        stack.start_api()
        assert stack.api is not None
        print(f"streaming a {args.upload_gb:g} GB upload ...", file=sys.stderr)
        up = upload_rss(stack.url, headers, stack.api.pid, args.upload_gb)
        rows.append(
            (
                f"API RSS while streaming a {args.upload_gb:g} GB upload",
                f"{up['base_mib']:.0f} MiB before → {up['peak_mib']:.0f} MiB peak (+{up['peak_mib'] - up['base_mib']:.0f} MiB)",
                f"{up['seconds']:.1f} s ({up['mib_s']:.0f} MiB/s); answer {up['status']} {up['error']} (random bytes)",
            )
        )

        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as c:
            model_id = c.post(
                "/v1/models", files={"file": ("digits.onnx", (root / "digits.onnx").read_bytes())}
            ).json()["id"]
            data_id = c.post(
                "/v1/datasets", files={"file": ("digits.npz", (root / "digits.npz").read_bytes())}
            ).json()["id"]
        spec = {
            "model_id": model_id,
            "dataset_id": data_id,
            "method": {"name": "l1_norm"},
            "target": {"flops": 0.5},
            "recovery": {"epochs": 1},
        }

        print("submitting jobs (no worker running) ...", file=sys.stderr)
        seq, ids1 = submit_throughput(stack.url, headers, spec, args.submissions // 2, 1)
        conc, ids2 = submit_throughput(stack.url, headers, spec, args.submissions, 8)
        rows.append(
            (
                "Job submission throughput (POST /v1/jobs, commit + enqueue)",
                f"{seq:.0f} jobs/s sequential; {conc:.0f} jobs/s with 8 clients",
                f"{len(ids1) + len(ids2)} jobs into Postgres + Redis",
            )
        )

        print(f"GET /v1/jobs/{{id}} at concurrency {args.concurrency} ...", file=sys.stderr)
        lat = get_latency(stack.url, headers, ids1 + ids2, args.requests, args.concurrency)
        rows.append(
            (
                f"GET /v1/jobs/{{id}} at concurrency {args.concurrency}",
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms",
                f"{lat['rps']:.0f} req/s over {args.requests} requests; 1 uvicorn process",
            )
        )

        # Clear the benchmark's queued jobs before a worker starts.
        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as c:
            for jid in ids1 + ids2:
                c.post(f"/v1/jobs/{jid}/cancel")
        servicekit.flush_redis(REDIS_DB)

        print("end-to-end jobs through the service ...", file=sys.stderr)
        stack.start_worker()
        from prunery import Client

        client = Client(stack.url, key)
        service_times, overheads = [], []
        for _ in range(args.e2e_runs):
            t0 = time.perf_counter()
            job = client.jobs.create(spec)
            job.wait(poll_interval=0.1, timeout=600)
            wall = time.perf_counter() - t0
            engine_seconds = sum(job.report().stage_seconds.values())
            service_times.append(wall)
            overheads.append(wall - engine_seconds)

        print("the engine called directly ...", file=sys.stderr)
        from engine import run
        from prunery.spec import JobSpec

        direct_times = []
        for i in range(args.e2e_runs):
            t0 = time.perf_counter()
            run(
                JobSpec.model_validate(spec),
                root / "digits.onnx",
                root / "digits.npz",
                root / f"direct-{i}",
            )
            direct_times.append(time.perf_counter() - t0)
        s_med, d_med = statistics.median(service_times), statistics.median(direct_times)
        rows.append(
            (
                "Small job end to end (digits CNN, l1_norm flops 0.5, 1 epoch)",
                f"service {s_med:.1f} s vs engine directly {d_med:.1f} s",
                f"median of {args.e2e_runs}; service overhead outside the engine's own stages "
                f"{statistics.median(overheads):.1f} s (queueing, claiming the row, a fresh worker child, "
                "input fetch, artifact storage, 0.1 s polling)",
            )
        )
    finally:
        stack.stop()
        engine.dispose()

    print()
    print(
        f"Service benchmark ({os.cpu_count()} CPU cores, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; "
        "Postgres + Redis on localhost, torch CPU)\n"
    )
    print("| measurement | result | notes |")
    print("|---|---|---|")
    for name, result, notes in rows:
        print(f"| {name} | {result} | {notes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
