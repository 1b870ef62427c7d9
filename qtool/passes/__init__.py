"""Built-in graph passes. Importing this package registers them with :mod:`qtool.pipeline`.

Each module holds one pass (or a small family sharing one idea); see each for its math.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
