"""Abuse benchmark: a real uvicorn API and a real Celery worker against the real Postgres and
Redis (loopback only, bounded in time), with every limit at its production default.

Over 400 lines on purpose: one script, one scenario function per abuse (slow clients, bombs,
queue churn, hostile set) printed as one table; splitting it would only spread the table.

    PYTHONPATH=$PWD:$PWD/sdk flock /tmp/prunery-service.lock \\
        python -m benchmarks.abuse [--stalled 60] [--streams 100] [--churn 200]

Prints one table:
* other tenants' GET latency (p50/p99) while `--stalled` uploads stall mid-body and `--streams`
  event streams stay open (spread over 10 attacker tenants, so the per-tenant caps admit most);
* the API process's peak RSS (VmHWM) after the decompression/decode bombs are uploaded;
* tenant B's queue delay (submit → running) while tenant A churns `--churn` submit+cancel,
  with the queued-jobs cap switched off so only the worker's no-op fast path is measured;
* how long a cancel takes to land while the engine sits in a stage that never checks for it
  (loading a `--cancel-nodes` chain model): the hard stop's bound is heartbeat + grace;
* the number of 5xx answers to the hostile request set.

PRUNERY_ENVIRONMENT is `test` only because the development Postgres has no password (which
production refuses); every limit has its production default.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import statistics
import sys
import tarfile
import time
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(REPO),
    str(REPO / "sdk"),
    str(REPO / "tests" / "service"),
    str(REPO / "tests" / "api"),
]

import hostile  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import servicekit  # noqa: E402

SCHEMA = "prunery_abuse_bench"
REDIS_DB = 13


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ bombs (built streaming)


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self.left)
        b[:n] = b"\0" * n
        self.left -= n
        return n


def targz_bomb(member_bytes: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("train/a/0.png")
        info.size = member_bytes
        tf.addfile(info, io.BufferedReader(_Zeros(member_bytes), 1 << 20))
    return buf.getvalue()


def png_zip(side: int) -> bytes:
    from PIL import Image

    img = io.BytesIO()
    Image.new("L", (side, side)).save(img, format="PNG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/a/0.png", img.getvalue())
        zf.writestr("test/a/0.png", img.getvalue())
    return buf.getvalue()


@functools.cache
def bombs() -> dict[str, tuple[str, bytes]]:
    return {
        "tar.gz, 1 GiB member": ("b.tar.gz", targz_bomb(1 << 30)),
        "zip, two 9000x9000 PNGs": ("b.zip", png_zip(9000)),
        "npz, savez_compressed 1 GiB": ("b.npz", hostile.npz_bomb(1024)),
        "npz, header 10^12 elements": ("c.npz", hostile.npz_declaring(10**12)),
    }


# ------------------------------------------------------------------ hostile set


def hostile_requests(key: str, job_id: str) -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    h = {"Authorization": f"Bearer {key}"}
    big = str(2**63)
    reqs: list[tuple[str, str, dict]] = [  # type: ignore[type-arg]
        ("GET", "/v1/models", {"headers": h, "params": {"offset": big}}),
        ("GET", "/v1/jobs", {"headers": h, "params": {"offset": big, "limit": 1}}),
        (
            "GET",
            f"/v1/jobs/{job_id}/events",
            {"headers": {**h, "Accept": "application/json"}, "params": {"after": big}},
        ),
        (
            "GET",
            f"/v1/jobs/{job_id}/events",
            {"headers": {**h, "Accept": "application/json", "Last-Event-ID": big}},
        ),
        (
            "GET",
            f"/v1/jobs/{job_id}/events",
            {"headers": {**h, "Accept": "application/json", "Last-Event-ID": "9" * 5000}},
        ),
        (
            "GET",
            f"/v1/jobs/{job_id}/events",
            {"headers": {**h, "Accept": "application/json", "Last-Event-ID": "١٢".encode()}},
        ),
        ("GET", "/v1/jobs/job_%00", {"headers": h}),
        ("GET", "/v1/models/%00", {"headers": h}),
        ("DELETE", "/v1/datasets/a%00", {"headers": h}),
        ("POST", "/v1/jobs/x%00/cancel", {"headers": h}),
        ("GET", "/v1/models", {"headers": {"Authorization": "Bearer \x7f" + "x" * 5000}}),
        ("FROBNICATE", "/v1/models", {"headers": h}),
        ("GET", "/" + "a" * 5000, {}),
    ]
    spec = {
        "model_id": "mdl_x",
        "dataset_id": "ds_x",
        "method": {"name": "l1_norm"},
        "target": {"flops": 0.5},
    }
    jh = {**h, "Content-Type": "application/json"}
    for body in (
        json.dumps({**spec, "model_id": "a\u0000"}),
        json.dumps({**spec, "data": {"mean": [0.5]}}).replace("0.5", "NaN"),
        json.dumps({**spec, "data": {"mean": [0.5]}}).replace("0.5", "-Infinity"),
        json.dumps({**spec, "data": {"image_size": [0, 0]}}),
        json.dumps({**spec, "data": {"image_size": [-5, 3]}}),
        json.dumps({**spec, "data": {"image_size": [10**9, 10**9]}}),
        json.dumps({**spec, "method": {"name": "l1_norm", "params": {"a": 1e400}}}).replace(
            "inf", "Infinity"
        ),
        json.dumps({**spec, "seed": 2**70}),
        "[" * 10_000 + "]" * 10_000,
        "{" + '"a":' * 1000,
    ):
        reqs.append(("POST", "/v1/jobs", {"headers": jh, "content": body.encode()}))
    boundary = "b" * 300
    reqs.append(
        (
            "POST",
            "/v1/models",
            {
                "headers": {**h, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                "content": f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n\r\nx\r\n--{boundary}--\r\n'.encode(),
            },
        )
    )
    for size in ("0,0", "-1,-1", "100000,100000"):
        reqs.append(
            (
                "POST",
                "/v1/datasets",
                {
                    "headers": h,
                    "files": {"file": ("i.zip", hostile.tiny_png_zip())},
                    "data": {"image_size": size},
                },
            )
        )
    return reqs


# ------------------------------------------------------------------ slow clients


async def stalled_upload(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    writer.write(
        (
            f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {100 * 1024 * 1024}\r\n\r\n"
        ).encode()
        + head
        + b"\0" * 1024
    )
    await writer.drain()
    return reader, writer


async def open_stream(
    client: httpx.AsyncClient, key: str, job_id: str, opened: list, stop: asyncio.Event
) -> None:  # type: ignore[type-arg]
    try:
        async with client.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            headers={"Authorization": f"Bearer {key}", "Accept": "text/event-stream"},
        ) as r:
            opened.append(r.status_code)
            if r.status_code != 200:
                return
            async for _ in r.aiter_raw():
                if stop.is_set():
                    return
    except (httpx.HTTPError, asyncio.CancelledError):
        return


async def slow_clients_phase(
    stack, attackers: list[dict], victim: dict, n_uploads: int, n_streams: int
) -> dict:  # type: ignore[no-untyped-def, type-arg]
    sockets = []
    for i in range(n_uploads):
        sockets.append(await stalled_upload(stack.port, attackers[i % len(attackers)]["key"]))
    stop = asyncio.Event()
    opened: list[int] = []
    limits = httpx.Limits(max_connections=n_streams + 10)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:
        tasks = [
            asyncio.create_task(
                open_stream(
                    client,
                    attackers[i % len(attackers)]["key"],
                    attackers[i % len(attackers)]["job"],
                    opened,
                    stop,
                )
            )
            for i in range(n_streams)
        ]
        await asyncio.sleep(3.0)  # everything connected and waiting
        # Which uploads were answered at once (429 past the per-tenant cap)?
        refused = 0
        for reader, _w in sockets:
            try:
                line = await asyncio.wait_for(reader.readline(), 0.05)
                if b" 429 " in line:
                    refused += 1
            except TimeoutError:
                pass
        latencies = []
        codes: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as victim_client:
            for _ in range(200):
                t0 = time.perf_counter()
                r = await victim_client.get(
                    "/v1/models", headers={"Authorization": f"Bearer {victim['key']}"}
                )
                latencies.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
        db_held = 0
        for _ in range(5):  # a poll's own transaction lasts milliseconds; a held one, seconds
            db_held = max(db_held, servicekit_idle_in_transaction())
            await asyncio.sleep(0.3)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for _r, w in sockets:
        w.close()
    latencies.sort()
    return {
        "uploads_open": n_uploads - refused,
        "uploads_429": refused,
        "streams_open": sum(1 for c in opened if c == 200),
        "streams_429": sum(1 for c in opened if c == 429),
        "p50": statistics.median(latencies),
        "p99": latencies[int(0.99 * (len(latencies) - 1))],
        "victim_codes": codes,
        "idle_in_transaction": db_held,
    }


def servicekit_idle_in_transaction() -> int:
    import psycopg

    with psycopg.connect(servicekit.PG_URL.replace("postgresql+psycopg", "postgresql")) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND application_name = %s AND state_change < now() - interval '1 second'",
            (SCHEMA,),
        ).fetchone()[0]


# ------------------------------------------------------------------ main


def make_tenant(factory, name: str) -> str:  # type: ignore[no-untyped-def]
    from app.security import create_api_key, create_tenant
    from core.db import transaction

    with transaction(factory) as s:
        tenant = create_tenant(s, f"{name}-{uuid.uuid4().hex[:6]}")
        _row, key = create_api_key(s, tenant, "bench")
    return key


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--stalled", type=int, default=60)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--churn", type=int, default=200)
    ap.add_argument(
        "--cancel-nodes",
        type=int,
        default=6000,
        help="elementwise nodes of the model whose load is cancelled",
    )
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from core.db import make_engine, make_sessionmaker, migrate
    from core.settings import Settings

    root = Path(f"/tmp/prunery-abuse-{os.getpid()}")
    root.mkdir()
    settings = Settings(
        environment="test",
        # application_name lets pg_stat_activity tell this run's connections from others'
        database_url=servicekit.fresh_schema(SCHEMA) + f"&application_name={SCHEMA}",
        broker_url=servicekit.redis_url(REDIS_DB),
        storage_dir=root / "artifacts",
        worker_cache_dir=root / "cache",
        job_queue="gpu-abuse-bench",
        control_queue="control-abuse-bench",
    )
    servicekit.flush_redis(REDIS_DB)
    migrate(settings)
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    victim = {"key": make_tenant(factory, "victim")}
    attackers = [{"key": make_tenant(factory, f"attacker{i}")} for i in range(10)]
    churner = make_tenant(factory, "churner")

    env = servicekit.settings_env(settings)
    stack = servicekit.Stack(env, root)
    rows: list[tuple[str, str, str]] = []
    try:
        stack.start_api()
        api_pid = stack.api.pid  # type: ignore[union-attr]
        arrays = servicekit.digits_arrays()
        np.savez(root / "digits.npz", **arrays)
        servicekit.train_digits_onnx(root / "digits.onnx", arrays, epochs=2)
        c = httpx.Client(base_url=stack.url, timeout=120)

        def upload(key: str) -> tuple[str, str]:
            h = {"Authorization": f"Bearer {key}"}
            m = c.post(
                "/v1/models",
                headers=h,
                files={"file": ("d.onnx", (root / "digits.onnx").read_bytes())},
            )
            d = c.post(
                "/v1/datasets",
                headers=h,
                files={"file": ("d.npz", (root / "digits.npz").read_bytes())},
            )
            assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
            return m.json()["id"], d.json()["id"]

        def spec(m: str, d: str) -> dict:  # type: ignore[type-arg]
            return {
                "model_id": m,
                "dataset_id": d,
                "method": {"name": "l1_norm"},
                "target": {"flops": 0.5},
                "recovery": {"epochs": 1},
            }

        # --- bombs
        rss0 = rss_mb(api_pid)
        bomb_codes = {}
        for label, (name, data) in bombs().items():
            r = c.post(
                "/v1/datasets",
                headers={"Authorization": f"Bearer {victim['key']}"},
                files={"file": (name, data)},
            )
            bomb_codes[label] = r.status_code
        peak = peak_rss_mb(api_pid)
        rows.append(
            (
                "API RSS before bombs / peak after bombs",
                f"{rss0:.0f} MB / {peak:.0f} MB",
                "< 400 MB",
            )
        )
        rows.append(("bomb answers", ", ".join(f"{k}: {v}" for k, v in bomb_codes.items()), "4xx"))

        # --- slow clients (no worker yet: the attackers' jobs stay queued)
        for a in attackers:
            m, d = upload(a["key"])
            a["job"] = c.post(
                "/v1/jobs", headers={"Authorization": f"Bearer {a['key']}"}, json=spec(m, d)
            ).json()["id"]
        res = asyncio.run(slow_clients_phase(stack, attackers, victim, args.stalled, args.streams))
        rows.append(
            (
                f"victim GET /v1/models p50 / p99 ({args.stalled} stalled uploads, {args.streams} streams)",
                f"{res['p50'] * 1000:.0f} ms / {res['p99'] * 1000:.0f} ms",
                "p99 < 1 s",
            )
        )
        rows.append(("victim status codes", str(res["victim_codes"]), "all 200"))
        rows.append(
            (
                "uploads held open / refused 429 (cap 4 per tenant)",
                f"{res['uploads_open']} / {res['uploads_429']}",
                "",
            )
        )
        rows.append(
            (
                "streams open / refused 429 (cap 20 per tenant)",
                f"{res['streams_open']} / {res['streams_429']}",
                "",
            )
        )
        rows.append(
            (
                "this API's connections idle in transaction > 1 s (max of 5 samples)",
                str(res["idle_in_transaction"]),
                "0",
            )
        )
        rows.append(
            ("API peak RSS after slow clients", f"{peak_rss_mb(api_pid):.0f} MB", "< 400 MB")
        )

        # --- queue churn: a second API process without the queued-jobs cap
        churn_env = {**env, "PRUNERY_MAX_QUEUED_JOBS_PER_TENANT": "0"}
        churn_api = servicekit.Stack(churn_env, root)
        churn_api.start_api()
        stack.start_worker()
        cc = httpx.Client(base_url=churn_api.url, timeout=60)
        # the attackers' queued jobs are cancelled first, so B waits only behind the churn
        for a in attackers:
            cc.post(f"/v1/jobs/{a['job']}/cancel", headers={"Authorization": f"Bearer {a['key']}"})
        ma, da = upload(churner)
        mb, db = upload(victim["key"])
        ha = {"Authorization": f"Bearer {churner}"}
        t0 = time.perf_counter()
        accepted = 0
        for _ in range(args.churn):
            r = cc.post("/v1/jobs", headers=ha, json=spec(ma, da))
            if r.status_code == 202:
                accepted += 1
                cc.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=ha)
        churn_s = time.perf_counter() - t0
        hb = {"Authorization": f"Bearer {victim['key']}"}
        job = cc.post("/v1/jobs", headers=hb, json=spec(mb, db)).json()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            job = cc.get(f"/v1/jobs/{job['id']}", headers=hb).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        from datetime import datetime

        def ts(v: str) -> float:
            return datetime.fromisoformat(v).timestamp()

        delay = (
            ts(job["started_at"]) - ts(job["created_at"]) if job.get("started_at") else float("nan")
        )
        duration = (
            ts(job["finished_at"]) - ts(job["started_at"])
            if job.get("finished_at") and job.get("started_at")
            else float("nan")
        )
        rows.append((f"tenant A churn: {accepted} submit+cancel in", f"{churn_s:.1f} s", ""))
        rows.append(
            (
                "tenant B queue delay (submit → running) / its job's duration",
                f"{delay:.1f} s / {duration:.1f} s ({job['status']})",
                "delay < one job",
            )
        )
        churn_api.stop()

        # --- a cancel during a stage that never checks (a long, silent model load)
        hostile.chain_model(root / "chain.onnx", args.cancel_nodes)
        mc = c.post(
            "/v1/models",
            headers=hb,
            files={"file": ("chain.onnx", (root / "chain.onnx").read_bytes())},
        )
        assert mc.status_code == 201, mc.text
        job = c.post("/v1/jobs", headers=hb, json=spec(mc.json()["id"], db)).json()
        deadline = time.monotonic() + 300
        while c.get(f"/v1/jobs/{job['id']}", headers=hb).json()["status"] != "running":
            assert time.monotonic() < deadline, "the chain job never started"
            time.sleep(0.3)
        time.sleep(3.0)
        t0 = time.monotonic()
        c.post(f"/v1/jobs/{job['id']}/cancel", headers=hb)
        while (state := c.get(f"/v1/jobs/{job['id']}", headers=hb).json())["status"] not in (
            "cancelled",
            "failed",
            "succeeded",
        ):
            assert time.monotonic() - t0 < 300, "the cancel never landed"
            time.sleep(0.2)
        landed = time.monotonic() - t0
        bound = settings.heartbeat_interval_s + settings.cancel_grace_s
        rows.append(
            (
                f"cancel during a silent {args.cancel_nodes}-node load: until {state['status']}",
                f"{landed:.1f} s (bound {bound:g} s = heartbeat + grace)",
                "< 30 s",
            )
        )

        # --- hostile set
        fivexx = 0
        total = 0
        statuses: dict[int, int] = {}
        for method, path, kw in hostile_requests(victim["key"], job["id"]):
            try:
                r = c.request(method, path, **kw)
                code = r.status_code
            except httpx.HTTPError:
                code = 599  # a dropped connection counts as a server error
            total += 1
            statuses[code] = statuses.get(code, 0) + 1
            fivexx += code >= 500
        for name, data in bombs().values():
            total += 1
            code = c.post(
                "/v1/datasets",
                headers={"Authorization": f"Bearer {victim['key']}"},
                files={"file": (name, data)},
            ).status_code
            statuses[code] = statuses.get(code, 0) + 1
            fivexx += code >= 500
        rows.append(
            (
                f"5xx from the hostile set ({total} requests)",
                f"{fivexx}  {dict(sorted(statuses.items()))}",
                "0",
            )
        )
        rows.append(
            ("API peak RSS over the whole run", f"{peak_rss_mb(api_pid):.0f} MB", "< 400 MB")
        )
    finally:
        stack.stop()
        engine.dispose()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'result':<40}  target")
    print("-" * (width + 52))
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<40}  {target}")


if __name__ == "__main__":
    main()
