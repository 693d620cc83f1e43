"""`prunery methods` with no server reachable: the locally installed method catalogue
(entry-point group `prunery.local_methods`)."""

from __future__ import annotations

from typing import Any


def describe_all() -> list[dict[str, Any]]:
    from methods.registry import list_methods

    return [m.describe() for m in list_methods()]
