"""The compression engine: ONNX in, structurally pruned, recovered and verified ONNX out.

A library with no knowledge of HTTP, SQL or Celery. Its one entry point:

    run(spec, model_path, data_path, out_dir, progress=None) -> Report

writes `model.onnx`, `report.json` and `report.md` into `out_dir` (each atomically) and
returns the `prunery.report.Report`. `progress(stage, fraction, message)` is called
between steps (fraction is overall, 0..1); raising `workers.errors.Cancelled` from it
stops the run. Bad input raises a `workers.errors.EngineError` subclass whose message
says what to fix.
"""

from typing import Any

__all__ = ["ProgressFn", "run"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a submodule (e.g. workers.engine.converters) stays cheap.
    if name in __all__:
        from workers.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
