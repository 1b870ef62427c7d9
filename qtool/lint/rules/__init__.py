"""Built-in lint rules, one module per family. Importing this package registers them.

* :mod:`qtool.lint.rules.readiness` (``QT0xx``): is a float model ready to be quantized?
* :mod:`qtool.lint.rules.qdq` (``QT1xx``): is a QDQ model valid, and valid for a backend?
"""

from qtool.lint.rules import qdq, readiness  # noqa: F401  (registers the rules)
