"""Prunery: structured pruning of ONNX models, as a service and as a library."""

from prunery.report import Report
from prunery.spec import JobSpec

__all__ = ["JobSpec", "Report"]
__version__ = "0.1.0"
