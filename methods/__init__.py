"""The pruning methods: one folder each, `methods/<name>/`.

Importing this package imports every subpackage's `__init__.py` (torch-free: params and
registration), so that `methods.registry` lists every method. A folder's `impl.py` (torch)
is imported by the engine only when a job runs that method. Folders that register nothing
(`base`: shared templates) are imported too, harmlessly.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")
