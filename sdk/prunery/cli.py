"""The `prunery` command.

`prunery prune ...` runs the engine locally (needs the worker extra: torch etc.);
every other subcommand talks to a Prunery server through the SDK (httpx only).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prune":
        try:
            from workers.engine.local import main as prune_main
        except ImportError as exc:  # the SDK alone has no engine
            print(
                f"prunery prune runs the engine locally and needs the worker extra "
                f"(pip install 'prunery-server[worker]'): {exc}",
                file=sys.stderr,
            )
            return 2
        return prune_main(argv[1:])
    from prunery.remote_cli import main as remote_main

    return remote_main(argv)


if __name__ == "__main__":
    sys.exit(main())
