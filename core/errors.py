"""Errors the engine raises. Torch-free, so the API and the CLI can catch them by type."""

from __future__ import annotations


class EngineError(Exception):
    """A problem with the user's input or request: the message says what to fix.

    `code` is a short machine-readable reason (e.g. 'bad_model', 'bad_dataset',
    'unsupported_op', 'budget_unreachable'); the API and CLI show it with the message.
    """

    code = "engine_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class BadModel(EngineError):
    code = "bad_model"


class BadDataset(EngineError):
    code = "bad_dataset"


class BadSpec(EngineError):
    code = "bad_spec"


class NotApplicable(EngineError):
    code = "not_applicable"


class Cancelled(Exception):
    """Raised from a progress callback to stop a run between steps."""
