"""Commands that installed distributions add to `prunery` (entry-point group
`prunery.commands`): the server (prunery-server) adds `prune`, `analyze` (of a local
.onnx file) and `serve`. The SDK knows them only by this protocol, never by import."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

GROUP = "prunery.commands"
LOCAL_METHODS_GROUP = "prunery.local_methods"

# What the SDK says when a command of the server is asked for without the server.
SERVER_COMMANDS = {
    "prune": "prune an ONNX model locally, no server",
    "serve": "run the embedded server (API + worker)",
}
INSTALL_HINT = "pip install 'prunery-server[worker]'"


@dataclass(frozen=True)
class Command:
    """A `prunery <name>` subcommand: `configure` adds its arguments, `run` runs it."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None

    def parser(self, name: str) -> argparse.ArgumentParser:
        """A standalone parser (`prunery <name> ...` without the top-level one)."""
        p = argparse.ArgumentParser(
            prog=f"prunery {name}",
            description=self.description or self.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.configure(p)
        return p

    def main(self, name: str, argv: list[str] | None = None) -> int:
        return self.run(self.parser(name).parse_args(argv))


def installed_commands() -> dict[str, Command]:
    """Every command of the `prunery.commands` entry points (first one of a name wins)."""
    found: dict[str, Command] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            continue
        command = ep.load()
        if isinstance(command, Command):
            found[ep.name] = command
    return found


def local_methods() -> list[dict[str, Any]] | None:
    """The method catalogue of a locally installed server (for `prunery methods` without a
    server); None when none is installed."""
    for ep in entry_points(group=LOCAL_METHODS_GROUP):
        describe: Callable[[], list[dict[str, Any]]] = ep.load()
        return describe()
    return None
