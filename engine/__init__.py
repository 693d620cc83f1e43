"""The compression engine: ONNX in, structurally pruned, recovered and verified ONNX out.

A library with no knowledge of HTTP, SQL or Celery, and of no method: the caller passes
the method catalog (`from methods import registry`). Its one entry point:

    run(spec, model_path, data_path, out_dir, progress=None, *, catalog) -> Report

writes `model.onnx`, `report.json` and `report.md` into `out_dir` (each atomically) and
returns the `prunery.report.Report`. `progress(stage, fraction, message)` is called
between steps (fraction is overall, 0..1); raising `core.errors.Cancelled` from it
stops the run. Bad input raises a `core.errors.EngineError` subclass whose message
says what to fix. The stages `run` composes are public (engine.pipeline's docstring):
tests, benchmarks and the CLI start from `prepare()` and end with `export_and_verify()`.
"""

from typing import Any

__all__ = ["ProgressFn", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a submodule (e.g. engine.converters) stays cheap.
    if name in __all__:
        from engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
