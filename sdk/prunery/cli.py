"""The `prunery` command.

`prunery prune ...` and `prunery analyze ...` run the engine locally (need the worker
extra: torch etc.);
every other subcommand talks to a Prunery server through the SDK (httpx only).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("prune", "analyze"):
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
