"""Prunery: structured pruning of ONNX models, as a service and as a library."""

from prunery.report import Report
from prunery.spec import JobSpec

__all__ = ["AsyncClient", "Client", "JobSpec", "Report"]
__version__ = "0.1.0"


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # Imported lazily so `import prunery` stays as light as it was (the engine imports it).
    if name in ("Client", "AsyncClient"):
        from prunery import client

        return getattr(client, name)
    raise AttributeError(name)
