"""The server's commands of `prunery` (registered in pyproject.toml under the entry-point
group `prunery.commands`): `prune` and `analyze` run the engine on this machine, `serve`
runs the embedded API + worker. The SDK (`prunery.cli`) lists and dispatches them without
importing the server."""
