"""The commands that talk to a Prunery server through the SDK (submit, status, wait, ...)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from prunery.cli import spec_flags
from prunery.cli.listing import jobs_table, methods_text, model_names
from prunery.client import Client, Job
from prunery.report import Report
from prunery.report_text import DEFAULT_LAYERS, format_report
from prunery.types import ExitCode


def emit(obj: Any, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(obj, default=str, indent=None))
    else:
        print(text)


def job_line(job: Job) -> str:
    err = f"  {job.error.error}: {job.error.detail}" if job.error else ""
    gates = (
        "" if job.gates_passed is None else f"  gates {'passed' if job.gates_passed else 'MISSED'}"
    )
    return f"{job.id}  {job.status}  {job.stage or '-'}  {job.progress * 100:.0f}%{gates}{err}"


def summary(report: Report, job_id: str, args: argparse.Namespace) -> str:
    """The terminal summary of a job's report, the per-layer table capped by --layers."""
    return format_report(
        report,
        getattr(args, "layers", DEFAULT_LAYERS),
        more=f"`prunery report {job_id} --layers all` lists them; report.md has the full table",
    )


def outcome(job: Job) -> ExitCode:
    if job.status == "failed":
        return ExitCode.JOB_FAILED
    if job.status == "cancelled":
        return ExitCode.CANCELLED
    if job.gates_passed is False:
        return ExitCode.GATE_MISSED
    return ExitCode.OK


def wait_and_finish(job: Job, args: argparse.Namespace) -> int:
    from prunery import ci_output
    from prunery.errors import WaitTimeout

    try:
        job.wait(progress=not args.json, timeout=args.timeout, raise_on_failure=False)
    except WaitTimeout:
        ci_output.write(job, None, args.junit, args.summary, timed_out=True)
        emit(job.model_dump(mode="json"), args.json, f"timed out: {job_line(job)}")
        return ExitCode.TIMEOUT
    code = outcome(job)
    out: dict[str, Any] = {"job": job.model_dump(mode="json"), "exit_code": int(code)}
    text = [job_line(job)]
    report = job.report() if job.status == "succeeded" else None
    ci_output.write(job, report, args.junit, args.summary)
    if report is not None:
        out["report"] = report.model_dump(mode="json")
        text.append(summary(report, job.id, args))
        if getattr(args, "out", None):
            paths = job.download(args.out)
            out["files"] = {k: str(v) for k, v in paths.items()}
            text.append("saved " + ", ".join(str(p) for p in paths.values()))
    emit(out, args.json, "\n".join(text))
    return code


def _resolve_upload(client: Client, ref: str, prefix: str, task: str | None = None) -> str:
    if ref.startswith(prefix) and not Path(ref).exists():
        return ref
    if prefix == "mdl_":
        return client.models.upload(ref).id
    return client.datasets.upload(ref, task=task).id


def submit(client: Client, args: argparse.Namespace) -> int:
    body = spec_flags.spec_body(args)
    task = body.get("task") or "classification"
    body["model_id"] = _resolve_upload(client, args.model, "mdl_")
    body["dataset_id"] = _resolve_upload(client, args.data, "ds_", task)
    if args.eval_data:
        body["eval_dataset_id"] = _resolve_upload(client, args.eval_data, "ds_", task)
    spec_flags.validate(body)  # fail fast, before the server does
    job = client.jobs.create(body)
    if not args.wait:
        emit(
            job.model_dump(mode="json"),
            args.json,
            f"submitted {job.id} ({job.status}); follow it with `prunery wait {job.id}`",
        )
        return ExitCode.OK
    if not args.json:
        print(f"submitted {job.id}", file=sys.stderr)
    return wait_and_finish(job, args)


def local_methods(args: argparse.Namespace, why: Exception) -> int:
    """`prunery methods` with no server: the catalogue of a locally installed server."""
    from prunery.cli.plugins import INSTALL_HINT
    from prunery.cli.plugins import local_methods as installed

    methods = installed()
    if methods is None:
        print(
            f"error: {why}; listing methods without a server needs the server package "
            f"({INSTALL_HINT})",
            file=sys.stderr,
        )
        return ExitCode.BAD_INPUT
    if not args.json:
        print("(no server reachable: the methods of the locally installed engine)", file=sys.stderr)
    emit(
        methods,
        args.json,
        methods_text([(m["name"], m["summary"], m["paper"]) for m in methods]),
    )
    return ExitCode.OK


def _html_report(job: Job, args: argparse.Namespace) -> int:
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
    return ExitCode.OK


def _listing(client: Client, args: argparse.Namespace) -> int:
    if args.command == "methods":
        methods = client.methods.list()
        emit(
            [m.model_dump() for m in methods],
            args.json,
            methods_text([(m.name, m.summary, m.paper) for m in methods]),
        )
        return ExitCode.OK
    if args.command == "jobs":
        page = client.jobs.list(status=args.status, limit=args.limit)
        if args.json:
            emit(
                {"data": [j.model_dump(mode="json") for j in page.data], "count": page.count},
                True,
                "",
            )
        else:
            print(jobs_table(page.data, page.count, model_names(client, page.data)))
        return ExitCode.OK
    from prunery.analysis import render_text

    result = client.models.analyze(
        args.model,
        args.data,
        task=args.task,
        round_to=args.round_to,
        spec=estimate_body(args),
        timeout=args.timeout,
    )
    emit(result.model_dump(mode="json"), args.json, render_text(result))
    return ExitCode.OK


def estimate_body(args: argparse.Namespace) -> dict[str, Any] | None:
    """The analysis request's `spec` (the parts a job-time estimate reads): --spec's method,
    target, recovery and export, with --method/--epochs/--batch-size on top; None when none
    of them is given (the server estimates the job defaults)."""
    body: dict[str, Any] = {}
    if args.spec:
        try:
            loaded = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            raise spec_flags.SpecError(f"--spec {args.spec}: {exc}") from None
        if not isinstance(loaded, dict):
            raise spec_flags.SpecError(f"--spec {args.spec}: a JSON object is needed")
        body = {k: loaded[k] for k in ("method", "target", "recovery", "export") if k in loaded}
    if args.method:
        body["method"] = {"name": args.method}
    if args.epochs is not None or args.batch_size is not None:
        rec = dict(body.get("recovery") or {})
        if args.epochs is not None:
            rec["epochs"] = args.epochs
        if args.batch_size is not None:
            rec["batch_size"] = args.batch_size
        body["recovery"] = rec
    return body or None


def _on_job(job: Job, args: argparse.Namespace) -> int:
    if args.command in ("status", "cancel"):
        if args.command == "cancel":
            job.cancel()
        emit(job.model_dump(mode="json"), args.json, job_line(job))
    elif args.command == "wait":
        return wait_and_finish(job, args)
    elif args.command == "report":
        if args.html or args.open:
            return _html_report(job, args)
        report = job.report()
        emit(report.model_dump(mode="json"), args.json, summary(report, job.id, args))
    elif args.command == "download":
        paths = job.download(args.out)
        emit(
            {k: str(v) for k, v in paths.items()},
            args.json,
            "\n".join(str(p) for p in paths.values()),
        )
    elif args.command == "events":
        for ev in job.events(follow=args.follow):
            emit(
                ev.model_dump(mode="json"),
                args.json,
                f"{ev.at:%H:%M:%S} {ev.kind:8s} {ev.status or '':10s} {ev.stage or '':8s} "
                f"{(ev.progress or 0) * 100:5.1f}% {ev.message or ''}",
            )
    return ExitCode.OK


def run(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key) as client:
        if args.command == "submit":
            return submit(client, args)
        if args.command in ("methods", "jobs", "analyze"):
            return _listing(client, args)
        return _on_job(client.jobs.get(args.job), args)
