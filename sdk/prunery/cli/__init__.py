"""`prunery <command>`: one parser. The SDK's commands talk to a Prunery server (httpx
only); an installed server adds `prune`, `analyze MODEL.onnx` and `serve` (entry-point
group `prunery.commands`, see prunery.cli.plugins).

Exit codes (stable, for scripts and CI; prunery.types.ExitCode):
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

from prunery.cli.plugins import INSTALL_HINT, SERVER_COMMANDS, Command, installed_commands
from prunery.cli.spec_flags import add_spec_flags
from prunery.report_text import DEFAULT_LAYERS
from prunery.types import ExitCode

__all__ = ["Command", "build_parser", "main"]


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


def layers_count(value: str) -> int | None:
    """`--layers N|all`: how many rows of the per-layer table to print (None: all)."""
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("expected a number >= 0 or 'all'")
    return n


def _layers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layers",
        type=layers_count,
        default=DEFAULT_LAYERS,
        metavar="N|all",
        help=f"rows of the per-layer table in the summary: the N layers whose MACs changed most "
        f"(default {DEFAULT_LAYERS}), or all",
    )


def _submit_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    s = sub.add_parser(
        "submit", parents=[common], help="upload a model and dataset and submit a job"
    )
    s.add_argument("model", help="an .onnx file, or the id of an uploaded model (mdl_...)")
    s.add_argument(
        "--data", required=True, help="an .npz / .zip / .tar(.gz) file, or a dataset id (ds_...)"
    )
    s.add_argument("--eval-data", help="a separate evaluation dataset (file or id)")
    add_spec_flags(s)
    s.add_argument("--wait", action="store_true", help="wait for the job and exit by its outcome")
    s.add_argument("--out", help="with --wait: download the artifacts into this directory")
    s.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    _layers_flag(s)
    _ci_flags(s)


def _job_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    for name, text in (("status", "show a job"), ("cancel", "cancel a job")):
        sub.add_parser(name, parents=[common], help=text).add_argument("job")
    r = sub.add_parser(
        "report", parents=[common], help="print a job's report (--open: the HTML page)"
    )
    r.add_argument("job")
    r.add_argument("--html", metavar="FILE", help="save the HTML report (inline plots) to FILE")
    r.add_argument("--open", action="store_true", help="open the HTML report in a browser")
    _layers_flag(r)
    w = sub.add_parser("wait", parents=[common], help="wait for a job and exit by its outcome")
    w.add_argument("job")
    w.add_argument("--timeout", type=float)
    w.add_argument("--out", help="download the artifacts here once it succeeds")
    _layers_flag(w)
    _ci_flags(w)
    d = sub.add_parser("download", parents=[common], help="download a job's artifacts")
    d.add_argument("job")
    d.add_argument("--out", default=".", help="directory (default: .)")
    e = sub.add_parser("events", parents=[common], help="print a job's events")
    e.add_argument("job")
    e.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    j = sub.add_parser(
        "jobs",
        parents=[common],
        help="list jobs, newest first: status, progress, method, target, model, times",
    )
    j.add_argument(
        "--status", action="append", help="only jobs in this state (repeatable), e.g. running"
    )
    j.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    sub.add_parser(
        "methods",
        parents=[common],
        help="list pruning methods (no server needed when the server package is installed)",
    )


def _analyze_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    a = sub.add_parser(
        "analyze",
        parents=[common],
        help="what can be pruned in a model: MODEL.onnx locally (server installed), or an uploaded mdl_... on the server",
    )
    a.add_argument("model", help="an uploaded model id (mdl_...); a local .onnx file runs locally")
    a.add_argument("--data", help="a dataset id (ds_...) whose samples drive the probes")
    a.add_argument(
        "--task", default="classification", choices=["classification", "language_modeling"]
    )
    a.add_argument("--round-to", type=int, default=1)
    a.add_argument("--timeout", type=float, default=600.0)
    est = a.add_argument_group("job-time estimate (with --data)")
    est.add_argument("--spec", help="a job spec (JSON file, as submitted) to estimate")
    est.add_argument("--method", help="the method to estimate (overrides the spec's)")
    est.add_argument("--epochs", type=int, help="recovery epochs (overrides the spec's)")
    est.add_argument("--batch-size", type=int, help="recovery batch size (overrides the spec's)")


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    """The one parser: the SDK's commands and the installed ones (`commands`)."""
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
    _submit_parser(sub, common)
    _job_parsers(sub, common)
    _analyze_parser(sub, common)
    for name, command in commands.items():
        if name in sub.choices:
            continue  # `analyze` of a local file: dispatched before parsing (see main)
        c = sub.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(c)
    for name, text in SERVER_COMMANDS.items():
        if name not in commands:  # listed, so `prunery prune` can say how to get it
            sub.add_parser(name, add_help=False, help=f"{text} (needs the server: {INSTALL_HINT})")
    return p


def _local_model(args: list[str]) -> bool:
    """`prunery analyze mdl_...` (an uploaded model) goes to the server; a file runs locally."""
    model = next((a for a in args if not a.startswith("-")), "")
    return not (model.startswith("mdl_") and not Path(model).exists())


def _not_installed(name: str) -> int:
    print(
        f"prunery {name} runs the engine on this machine and needs the server installed: "
        f"{INSTALL_HINT}",
        file=sys.stderr,
    )
    return ExitCode.BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `prunery methods | head`: the reader left, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = installed_commands()
    if (
        argv
        and argv[0] == "analyze"
        and _local_model(argv[1:])
        and "-h" not in argv
        and "--help" not in argv
    ):
        if "analyze" not in commands:
            return _not_installed("analyze")
        return commands["analyze"].main("analyze", argv[1:])
    if argv and argv[0] in SERVER_COMMANDS and argv[0] not in commands:
        return _not_installed(argv[0])
    args = build_parser(commands).parse_args(argv)
    if args.command in commands and args.command != "analyze":
        return commands[args.command].run(args)
    return _remote(args)


def _remote(args: argparse.Namespace) -> int:
    from prunery.cli import remote
    from prunery.errors import APIError, ConfigError, ConnectionFailed

    try:
        return remote.run(args)
    except (APIError, ConfigError, ConnectionFailed, FileNotFoundError, ValueError) as exc:
        if args.command == "methods" and isinstance(exc, (ConfigError, ConnectionFailed)):
            return remote.local_methods(args, exc)
        if getattr(args, "json", False):
            body = {
                "error": getattr(exc, "code", type(exc).__name__),
                "detail": getattr(exc, "detail", str(exc)),
            }
            print(json.dumps(body))
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        return 130
