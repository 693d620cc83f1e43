"""`prunery <command>`: talk to a Prunery server through the SDK.

Exit codes (stable, for scripts and CI):
  0  success (with --wait: the job succeeded and every gate held)
  2  bad input or an API error (the message says what to fix)
  3  the job failed
  4  the job succeeded but missed a gate (e.g. --max-accuracy-drop)
  5  the job was cancelled
  6  --timeout passed while waiting
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD_INPUT, EXIT_JOB_FAILED, EXIT_GATE_MISSED, EXIT_CANCELLED, EXIT_TIMEOUT = (
    0,
    2,
    3,
    4,
    5,
    6,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--url", help="server URL (default: PRUNERY_URL, or the one `prunery serve` wrote)"
    )
    p.add_argument(
        "--api-key", help="API key (default: PRUNERY_API_KEY, or the one `prunery serve` wrote)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    s = sub.add_parser(
        "submit", parents=[common], help="upload a model and dataset and submit a job"
    )
    s.add_argument("model", help="an .onnx file, or the id of an uploaded model (mdl_...)")
    s.add_argument(
        "--data", required=True, help="an .npz / .zip / .tar(.gz) file, or a dataset id (ds_...)"
    )
    s.add_argument("--eval-data", help="a separate evaluation dataset (file or id)")
    s.add_argument("--method", default="auto", help="a method name (see `prunery methods`); default auto")
    s.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter (VALUE parsed as JSON when it can be); repeatable",
    )
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="fraction of the MACs to keep, e.g. 0.5")
    target.add_argument("--target-params", type=float, help="fraction of the parameters to keep")
    target.add_argument(
        "--target-latency", type=float, help="fraction of the measured latency to keep, e.g. 0.5"
    )
    s.add_argument("--latency-batch", type=int, help="batch size of --target-latency (default 1)")
    s.add_argument(
        "--round-to", type=int, help="channel multiple (default: chosen per layer by timing it)"
    )
    s.add_argument(
        "--min-speedup",
        help="gate: smallest measured speedup at every batch size (default 1.0; null disables)",
    )
    s.add_argument(
        "--task", default="classification", choices=["classification", "language_modeling"]
    )
    s.add_argument("--epochs", type=int, help="recovery epochs")
    s.add_argument("--recovery", choices=["finetune", "scratch", "none"], help="recovery mode")
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument(
        "--max-accuracy-drop", type=float, help="gate: largest allowed top-1 drop (points)"
    )
    s.add_argument("--wait", action="store_true", help="wait for the job and exit by its outcome")
    s.add_argument("--out", help="with --wait: download the artifacts into this directory")
    s.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    _ci_flags(s)

    for name, text in (
        ("status", "show a job"),
        ("cancel", "cancel a job"),
    ):
        c = sub.add_parser(name, parents=[common], help=text)
        c.add_argument("job")
    r = sub.add_parser("report", parents=[common], help="print a job's report (--open: the HTML page)")
    r.add_argument("job")
    r.add_argument("--html", metavar="FILE", help="save the HTML report (inline plots) to FILE")
    r.add_argument("--open", action="store_true", help="open the HTML report in a browser")
    w = sub.add_parser("wait", parents=[common], help="wait for a job and exit by its outcome")
    w.add_argument("job")
    w.add_argument("--timeout", type=float)
    w.add_argument("--out", help="download the artifacts here once it succeeds")
    _ci_flags(w)
    a = sub.add_parser(
        "analyze",
        parents=[common],
        help="what can be pruned in a model: MODEL.onnx locally (worker extra), or an uploaded mdl_... on the server",
    )
    a.add_argument("model", help="an uploaded model id (mdl_...); a local .onnx file runs locally")
    a.add_argument("--data", help="a dataset id (ds_...) whose samples drive the probes")
    a.add_argument("--task", default="classification", choices=["classification", "language_modeling"])
    a.add_argument("--round-to", type=int, default=1)
    a.add_argument("--timeout", type=float, default=600.0)
    d = sub.add_parser("download", parents=[common], help="download a job's artifacts")
    d.add_argument("job")
    d.add_argument("--out", default=".", help="directory (default: .)")
    e = sub.add_parser("events", parents=[common], help="print a job's events")
    e.add_argument("job")
    e.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    j = sub.add_parser("jobs", parents=[common], help="list jobs")
    j.add_argument("--status", action="append")
    j.add_argument("--limit", type=int, default=20)
    sub.add_parser("methods", parents=[common], help="list pruning methods")
    sub.add_parser(
        "prune",
        add_help=False,
        help="prune an ONNX model locally, no server (worker extra); `prunery prune --help`",
    )
    sub.add_parser(
        "serve",
        add_help=False,
        help="run the embedded server (API + worker); `prunery serve --help`",
    )
    return p


def _ci_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--junit",
        metavar="FILE",
        help="write a JUnit XML file: one test case for the job, the target and each gate",
    )
    p.add_argument(
        "--summary",
        metavar="FILE",
        help="write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY when set)",
    )


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param {text!r}: use KEY=VALUE")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _print(obj: Any, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(obj, default=str, indent=None))
    else:
        print(text)


def format_report(report: Any) -> str:
    """A short human summary of a prunery.report.Report."""
    lines = [
        f"method {report.method.get('name')}  target {report.target.kind} "
        f"{report.target.requested} → achieved {report.target.achieved:.3f} "
        f"({'met' if report.target.met else 'NOT met'})"
    ]
    if report.accuracy:
        a = report.accuracy
        lines.append(
            f"accuracy  {a.before * 100:.2f}% → {a.after * 100:.2f}%  (drop {a.drop:.2f} points, {a.samples} samples)"
        )
    lines.append(
        f"MACs      {report.macs.before:,.0f} → {report.macs.after:,.0f}  ({report.macs.ratio:.3f}×)"
    )
    lines.append(
        f"params    {report.params.before:,.0f} → {report.params.after:,.0f}  ({report.params.ratio:.3f}×)"
    )
    lines.append(
        f"file      {report.file_bytes.before:,.0f} → {report.file_bytes.after:,.0f} bytes"
    )
    for lat in report.latency_ms:
        lines.append(
            f"latency   batch {lat.batch_size}: {lat.before:.3f} → {lat.after:.3f} ms median (speedup {lat.speedup:.2f}×)"
        )
    for g in report.gates:
        lines.append(
            f"gate      {g.name}: {g.value:g} (limit {g.limit:g}) {'passed' if g.passed else 'MISSED'}"
            + (f" ({g.message})" if g.message and not g.passed else "")
        )
    lines.append(f"device    {report.device}")
    return "\n".join(lines)


def _job_line(job: Any) -> str:
    err = f"  {job.error.error}: {job.error.detail}" if job.error else ""
    gates = (
        "" if job.gates_passed is None else f"  gates {'passed' if job.gates_passed else 'MISSED'}"
    )
    return f"{job.id}  {job.status}  {job.stage or '-'}  {job.progress * 100:.0f}%{gates}{err}"


def _outcome(job: Any) -> int:
    if job.status == "failed":
        return EXIT_JOB_FAILED
    if job.status == "cancelled":
        return EXIT_CANCELLED
    if job.gates_passed is False:
        return EXIT_GATE_MISSED
    return EXIT_OK


def _wait_and_finish(job: Any, args: argparse.Namespace) -> int:
    from prunery import ci_output
    from prunery.errors import WaitTimeout

    try:
        job.wait(progress=not args.json, timeout=args.timeout, raise_on_failure=False)
    except WaitTimeout:
        ci_output.write(job, None, args.junit, args.summary, timed_out=True)
        _print(job.model_dump(mode="json"), args.json, f"timed out: {_job_line(job)}")
        return EXIT_TIMEOUT
    code = _outcome(job)
    out: dict[str, Any] = {"job": job.model_dump(mode="json"), "exit_code": code}
    text = [_job_line(job)]
    report = job.report() if job.status == "succeeded" else None
    ci_output.write(job, report, args.junit, args.summary)
    if report is not None:
        out["report"] = report.model_dump(mode="json")
        text.append(format_report(report))
        if getattr(args, "out", None):
            paths = job.download(args.out)
            out["files"] = {k: str(v) for k, v in paths.items()}
            text.append("saved " + ", ".join(str(p) for p in paths.values()))
    _print(out, args.json, "\n".join(text))
    return code


def _local_methods(args: argparse.Namespace, why: Exception) -> int:
    """`prunery methods` with no server: the registry of the locally installed engine."""
    try:
        from workers.methods.catalog import list_methods
    except ImportError:
        print(
            f"error: {why}; listing methods without a server needs the server package "
            "(pip install prunery-server)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    methods = [m.describe() for m in list_methods()]
    if not args.json:
        print("(no server reachable: the methods of the locally installed engine)", file=sys.stderr)
    _print(
        methods,
        args.json,
        "\n".join(f"{m['name']:16s} {m['summary']}\n{'':16s} {m['paper']}" for m in methods),
    )
    return EXIT_OK


def _html_report(job: Any, args: argparse.Namespace) -> int:
    import tempfile
    import webbrowser

    html = job.report_html()
    if args.html:
        path = Path(args.html)
    else:
        fd, name = tempfile.mkstemp(prefix=f"prunery-{job.id}-", suffix=".html")
        os.close(fd)
        path = Path(name)
    path.write_text(html, encoding="utf-8")
    print(f"wrote {path}")
    if args.open:
        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def _resolve_upload(client: Any, namespace: Any, ref: str, prefix: str, **kw: Any) -> str:
    if ref.startswith(prefix) and not Path(ref).exists():
        return ref
    return namespace.upload(ref, **kw).id


def _target(args: argparse.Namespace) -> dict[str, Any]:
    if args.target_flops is not None:
        return {"flops": args.target_flops}
    if args.target_params is not None:
        return {"params": args.target_params}
    target: dict[str, Any] = {"latency": args.target_latency}
    if args.latency_batch is not None:
        target["latency_batch"] = args.latency_batch
    return target


def _min_speedup(text: str) -> float | None:
    if text.strip().lower() in ("null", "none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"--min-speedup {text!r}: give a number such as 1.0, or null to disable the gate"
        ) from None


def _submit(client: Any, args: argparse.Namespace) -> int:
    from prunery.spec import JobSpec

    model_id = _resolve_upload(client, client.models, args.model, "mdl_")
    data_id = _resolve_upload(client, client.datasets, args.data, "ds_", task=args.task)
    eval_id = (
        _resolve_upload(client, client.datasets, args.eval_data, "ds_", task=args.task)
        if args.eval_data
        else None
    )
    params = dict(_parse_param(p) for p in args.param)
    recovery: dict[str, Any] = {}
    for key, value in (
        ("epochs", args.epochs),
        ("mode", args.recovery),
        ("lr", args.lr),
        ("batch_size", args.batch_size),
    ):
        if value is not None:
            recovery[key] = value
    spec: dict[str, Any] = {
        "model_id": model_id,
        "dataset_id": data_id,
        "task": args.task,
        "method": {"name": args.method, "params": params},
        "target": _target(args),
        "recovery": recovery,
    }
    if eval_id:
        spec["eval_dataset_id"] = eval_id
    if args.round_to is not None:
        spec["export"] = {"round_to": args.round_to}
    gates: dict[str, Any] = {}
    if args.max_accuracy_drop is not None:
        gates["max_accuracy_drop"] = args.max_accuracy_drop
    if args.min_speedup is not None:
        gates["min_speedup"] = _min_speedup(args.min_speedup)
    if gates:
        spec["gates"] = gates
    if args.seed is not None:
        spec["seed"] = args.seed
    JobSpec.model_validate(spec)  # fail fast, before the server does
    job = client.jobs.create(spec)
    if not args.wait:
        _print(
            job.model_dump(mode="json"),
            args.json,
            f"submitted {job.id} ({job.status}); follow it with `prunery wait {job.id}`",
        )
        return EXIT_OK
    if not args.json:
        print(f"submitted {job.id}", file=sys.stderr)
    return _wait_and_finish(job, args)


def _run(args: argparse.Namespace) -> int:
    from prunery.client import Client

    client = Client(args.url, args.api_key)
    with client:
        if args.command == "submit":
            return _submit(client, args)
        if args.command == "methods":
            methods = client.methods.list()
            _print(
                [m.model_dump() for m in methods],
                args.json,
                "\n".join(f"{m.name:16s} {m.summary}\n{'':16s} {m.paper}" for m in methods),
            )
            return EXIT_OK
        if args.command == "jobs":
            page = client.jobs.list(status=args.status, limit=args.limit)
            _print(
                {"data": [j.model_dump(mode="json") for j in page.data], "count": page.count},
                args.json,
                "\n".join(_job_line(j) for j in page.data) or "no jobs",
            )
            return EXIT_OK
        if args.command == "analyze":
            from prunery.analysis import render_text

            result = client.models.analyze(
                args.model, args.data, task=args.task, round_to=args.round_to, timeout=args.timeout
            )
            _print(result.model_dump(mode="json"), args.json, render_text(result))
            return EXIT_OK
        job = client.jobs.get(args.job)
        if args.command == "status":
            _print(job.model_dump(mode="json"), args.json, _job_line(job))
            return EXIT_OK
        if args.command == "cancel":
            job.cancel()
            _print(job.model_dump(mode="json"), args.json, _job_line(job))
            return EXIT_OK
        if args.command == "wait":
            return _wait_and_finish(job, args)
        if args.command == "report":
            if args.html or args.open:
                return _html_report(job, args)
            report = job.report()
            _print(report.model_dump(mode="json"), args.json, format_report(report))
            return EXIT_OK
        if args.command == "download":
            paths = job.download(args.out)
            _print(
                {k: str(v) for k, v in paths.items()},
                args.json,
                "\n".join(str(p) for p in paths.values()),
            )
            return EXIT_OK
        if args.command == "events":
            for ev in job.events(follow=args.follow):
                _print(
                    ev.model_dump(mode="json"),
                    args.json,
                    f"{ev.at:%H:%M:%S} {ev.kind:8s} {ev.status or '':10s} {ev.stage or '':8s} "
                    f"{(ev.progress or 0) * 100:5.1f}% {ev.message or ''}",
                )
            return EXIT_OK
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        try:
            from app.serve import main as serve_main
        except ImportError as exc:
            print(
                f"prunery serve needs the server extras (pip install 'prunery-server[worker]'): {exc}",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    from prunery.errors import APIError, ConfigError, ConnectionFailed

    try:
        return _run(args)
    except (APIError, ConfigError, ConnectionFailed, FileNotFoundError, ValueError) as exc:
        if args.command == "methods" and isinstance(exc, (ConfigError, ConnectionFailed)):
            return _local_methods(args, exc)
        if getattr(args, "json", False):
            body = {
                "error": getattr(exc, "code", type(exc).__name__),
                "detail": getattr(exc, "detail", str(exc)),
            }
            print(json.dumps(body))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
