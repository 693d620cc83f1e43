"""The `prunery` command.

`prunery prune ...` and `prunery analyze ...` run the engine locally (need the worker
extra: torch etc.);
every other subcommand talks to a Prunery server through the SDK (httpx only).
"""

from __future__ import annotations

import sys


def _remote_model(args: list[str]) -> bool:
    """`prunery analyze mdl_...` (an uploaded model) goes to the server; a file runs locally."""
    from pathlib import Path

    model = next((a for a in args if not a.startswith("-")), "")
    return model.startswith("mdl_") and not Path(model).exists()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    local = argv and argv[0] in ("prune", "analyze")
    if local and argv[0] == "analyze" and _remote_model(argv[1:]):
        local = False  # an uploaded model id: the server runs the analysis
    if local:
        try:
            if argv[0] == "prune":
                from workers.engine.local import main as engine_main
            else:
                from workers.engine.analysis import main as engine_main
        except ImportError as exc:  # the SDK alone has no engine
            print(
                f"prunery {argv[0]} runs the engine locally and needs the worker extra "
                f"(pip install 'prunery-server[worker]'): {exc}",
                file=sys.stderr,
            )
            return 2
        return engine_main(argv[1:])
    from prunery.remote_cli import main as remote_main

    return remote_main(argv)


if __name__ == "__main__":
    sys.exit(main())
